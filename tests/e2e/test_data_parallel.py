"""Data-parallel attention (`--dp-size N`): N attention workers, one per device, each serving
every model with its own KV pool; in crosspool they share one set of FFN server processes, so
each expert is held once. CPU processes stand in for the GPUs.

Greedy tokens equal one device's, requests spread over the replicas, the FFN servers exist once
whatever N is, and a killed replica ends only its own requests: the other serves every model on.
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from sglang_crosspool.server_args import ServerArgs
from sglang_crosspool.testing.checkpoints import make_model
from sglang_crosspool.testing.faults import ffn_server_pids

MODELS = {"qwen": ("qwen3_moe", 1), "olmoe": ("olmoe", 3)}
PROMPTS = [[5, 6, 7, 8], list(range(40, 58))]
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
CROSSPOOL = ["--pool-mode", "crosspool", "--ffn-transport", "shm", "--ffn-servers", "2"]


@pytest.fixture(scope="module")
def two_models(model_paths, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dp-models")
    return {name: str(make_model(root / name, arch, seed=seed))
            for name, (arch, seed) in MODELS.items()}


def outputs(server) -> dict:
    got = {}
    for name in MODELS:
        r = server.post("/generate", json={"model": name, "input_ids": PROMPTS,
                                           "sampling_params": GREEDY})
        assert r.status_code == 200, r.text
        got[name] = [o["output_ids"] for o in r.json()]
    return got


@pytest.fixture(scope="module")
def one_device(two_models, launch_module_server):
    return outputs(launch_module_server(two_models, *CROSSPOOL))


def ffn_servers(server) -> list[int]:
    """The FFN server processes under every attention worker."""
    return [pid for w in server.internal_state()["workers"] for pid in ffn_server_pids(w["pid"])]


def spread_requests(server, n: int = 8) -> list[list[int]]:
    """`n` concurrent greedy requests per model; their output ids."""
    def one(i: int):
        name = list(MODELS)[i % len(MODELS)]
        r = server.post("/generate", json={"model": name, "input_ids": PROMPTS[i % 2],
                                           "sampling_params": GREEDY})
        assert r.status_code == 200, r.text
        return name, i % 2, r.json()["output_ids"]

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


@pytest.mark.parametrize("devices, mode", [
    ("cpu,cpu", CROSSPOOL),
    ("cpu,cpu,cpu", CROSSPOOL),
    ("cpu,cpu", ["--pool-mode", "monolithic"]),
], ids=["crosspool-2", "crosspool-3", "monolithic-2"])
def test_replicas_give_one_devices_tokens_and_share_the_ffn_servers(
        two_models, one_device, launch_server, devices, mode):
    n = len(devices.split(","))
    server = launch_server(two_models, "--devices", devices, "--dp-size", str(n), *mode)
    assert outputs(server) == one_device
    for name, prompt, ids in spread_requests(server, 4 * n):
        assert ids == one_device[name][prompt]
    workers = server.internal_state()["workers"]
    assert len(workers) == n
    assert all(sorted(w["models"]) == sorted(MODELS) for w in workers)  # every model, each
    assert all(w["kv"]["total_pages"] > 0 for w in workers)  # a KV pool of its own
    if "crosspool" in mode:
        # One set of FFN servers, whatever n is: each replica sees the same servers' bytes.
        assert len(ffn_servers(server)) == 2
        per_server = workers[0]["ffn_bytes_per_server"]
        assert sum(per_server) > 0
        assert all(w["ffn_bytes_per_server"] == per_server and w["ffn_bytes_here"] == 0
                   for w in workers)
        r = server.post("/load_model", json={"model_path": two_models["qwen"],
                                             "served_model_name": "extra"})
        assert r.status_code == 501 and "--dp-size" in r.text, r.text
    else:  # monolithic: a model loaded later lives on one worker, and unloads from it
        r = server.post("/load_model", json={"model_path": two_models["qwen"],
                                             "served_model_name": "extra"})
        assert r.status_code == 200, r.text
        homes = [w["index"] for w in server.internal_state()["workers"]
                 if "extra" in w["models"]]
        assert len(homes) == 1
        assert server.post("/unload_model", json={"served_model_name": "extra"}
                           ).status_code == 200
    r = server.post("/unload_model", json={"served_model_name": "qwen"})
    assert r.status_code == 501 and "data-parallel replicas" in r.text, r.text
    assert server.post("/generate", json={"model": "qwen", "input_ids": [1, 2],
                                          "sampling_params": GREEDY}).status_code == 200


def test_requests_spread_over_the_replicas(two_models, launch_server):
    server = launch_server(two_models, "--devices", "cpu,cpu", "--dp-size", "2", *CROSSPOOL)
    long = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
    seen: dict[int, int] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for w in server.internal_state()["workers"]:
                seen[w["index"]] = max(seen.get(w["index"], 0), w["in_flight"])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda i: server.post("/generate", json={
                "model": "qwen", "input_ids": [3, 4, 5 + i], "sampling_params": long}
            ).status_code, range(6)))
    finally:
        stop.set()
        watcher.join()
    assert codes == [200] * 6
    assert seen.get(0, 0) > 0 and seen.get(1, 0) > 0, seen  # both replicas served the model


def test_a_killed_replica_ends_its_requests_and_the_other_serves_every_model(
        two_models, launch_server):
    server = launch_server(two_models, "--devices", "cpu,cpu", "--dp-size", "2", *CROSSPOOL)
    victim = next(w for w in server.internal_state()["workers"] if w["index"] == 1)
    context = server.get("/model_info?model=qwen").json()["context_length"]

    def stream(tokens: int, sink: list, started: threading.Event) -> None:
        body = {"model": "qwen", "input_ids": [3, 4, 5], "stream": True,
                "sampling_params": {"max_new_tokens": tokens, "temperature": 0,
                                    "ignore_eos": True}}
        with httpx.stream("POST", server.url + "/generate", json=body, timeout=300) as r:
            for line in r.iter_lines():
                sink.append(line)
                started.set()

    # The first request goes to worker 0 and keeps it busy; the second to worker 1.
    kept, kept_started = [], threading.Event()
    holder = threading.Thread(target=stream, args=(200, kept, kept_started))
    holder.start()
    assert kept_started.wait(60)
    lost, lost_started = [], threading.Event()
    on_victim = threading.Thread(target=stream, args=(context - 8, lost, lost_started))
    on_victim.start()
    assert lost_started.wait(60)
    os.kill(victim["pid"], signal.SIGKILL)
    on_victim.join(timeout=120)
    streamed = "\n".join(lost)
    assert "attention worker 1" in streamed and "is gone" in streamed, streamed[-2000:]
    for name in MODELS:  # the survivor serves every model, through the same FFN servers
        ok = server.post("/generate", json={"model": name, "input_ids": [1, 2],
                                            "sampling_params": GREEDY})
        assert ok.status_code == 200 and len(ok.json()["output_ids"]) == 8, ok.text
    assert server.get("/health").status_code == 200  # every model still has a live replica
    holder.join(timeout=300)
    done = [line for line in kept if '"finish_reason": {"type": "length"' in line]
    assert done and "is gone" not in "\n".join(kept), kept[-3:]  # worker 0's request ended well


def test_replica_0_takes_the_shared_ffn_servers_and_the_other_replicas_with_it(
        two_models, launch_server):
    server = launch_server(two_models, "--devices", "cpu,cpu", "--dp-size", "2", *CROSSPOOL)
    dup = server.post("/generate", json={"model": "qwen", "input_ids": [[1, 2], [3, 4]],
                                         "rid": ["a", "a"], "sampling_params": GREEDY})
    assert dup.status_code == 400 and "must differ" in dup.text, dup.text
    owner = next(w for w in server.internal_state()["workers"] if w["index"] == 0)
    os.kill(owner["pid"], signal.SIGKILL)
    # Nothing is left to serve: the server says so and exits, rather than routing requests to
    # a replica whose FFN servers are gone.
    server.proc.wait(timeout=60)
    assert server.proc.returncode not in (None, 0)
    assert "replica 0" in server.log.read_text()


@pytest.mark.parametrize("argv, message", [
    (["--dp-size", "3", "--devices", "cpu,cpu"], "needs --devices with 3 entries"),
    (["--dp-size", "2", "--devices", "cpu,cpu", "--pool-mode", "crosspool"],
     "--ffn-transport shm (or cuda-ipc on one GPU)"),
    (["--dp-size", "0"], "must be >= 1"),
    (["--dp-size", "2", "--devices", "cuda:0,cuda:1", "--pool-mode", "crosspool",
      "--ffn-transport", "cuda-ipc", "--ffn-device", "cuda:1"], "links processes on one GPU"),
    (["--dp-size", "2", "--devices", "cpu,cpu", "--tp-size", "2"], "--dp-size with --tp-size"),
])
def test_a_dp_size_the_server_cannot_run_is_refused(two_models, argv, message, capsys):
    with pytest.raises(SystemExit):
        ServerArgs.from_cli(["--model", f"qwen={two_models['qwen']}", *argv], make_demo=False)
    assert message in capsys.readouterr().err
