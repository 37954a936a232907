"""One server over several devices (`--devices`): an attention worker process per device, the
models placed over them (by size, or by a plan), each worker with its own KV pool; CPU
processes stand in for GPUs.

Every pool mode gives, for every model, the greedy tokens of a one-device server; the stats
and `/metrics` report each device; with `--plan`, the workers hold what the plan says, device
by device (`GET /plan`); a worker killed mid-request ends its requests with an error
naming it while the other worker keeps serving, and its models get 503.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sglang_crosspool.testing.checkpoints import make_model

MODELS = {"qwen": ("qwen3_moe", 1), "mixtral": ("mixtral", 2), "olmoe": ("olmoe", 3)}
PROMPTS = [[5, 6, 7, 8], list(range(40, 58))]
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def three_models(model_paths, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("device-models")
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
def one_device(three_models, launch_module_server):
    return outputs(launch_module_server(three_models))


@pytest.mark.parametrize("devices, mode", [
    ("cpu,cpu", ["--pool-mode", "monolithic"]),
    ("cpu,cpu,cpu", ["--pool-mode", "monolithic"]),
    ("cpu,cpu", ["--pool-mode", "static"]),
    ("cpu,cpu,cpu", ["--pool-mode", "static"]),
    ("cpu,cpu", ["--pool-mode", "crosspool", "--ffn-transport", "shm"]),
    ("cpu,cpu,cpu", ["--pool-mode", "crosspool", "--ffn-transport", "shm"]),
], ids=["monolithic-2", "monolithic-3", "static-2", "static-3", "crosspool-shm-2",
        "crosspool-shm-3"])
def test_models_spread_over_devices_give_one_devices_tokens(three_models, one_device,
                                                            launch_server, devices, mode):
    server = launch_server(three_models, "--devices", devices, *mode)
    assert outputs(server) == one_device
    _load_on_the_least_loaded_worker(server, three_models, one_device, mode)
    state = server.internal_state()
    workers = state["workers"]
    n = len(devices.split(","))
    assert len(workers) == n
    placed = sorted(name for w in workers for name in w["models"])
    assert placed == sorted(MODELS)  # every model on exactly one worker
    # Each worker has its own KV pool; the server's pool is their sum.
    assert state["kv"]["total_pages"] == sum(w["kv"]["total_pages"] for w in workers)
    assert all(w["kv"]["total_pages"] > 0 and w["attention_bytes"] > 0 for w in workers)
    if "crosspool" in mode:
        assert all(w["ffn_bytes_here"] == 0 for w in workers)
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    gpus = {s.labels["gpu"] for s in families["sglang_crosspool:gpu_kv_pages_total"].samples}
    assert gpus == {f"cpu#{i}" for i in range(n)}
    # Measured memory: on CPU stand-ins only the KV pages mapped (the allocator's are GPU's).
    memory = {(s.labels["gpu"], s.labels["kind"]): s.value
              for s in families["sglang_crosspool:gpu_memory_bytes"].samples}
    assert {gpu for gpu, kind in memory if kind == "kv_mapped"} == gpus
    assert not any(kind == "allocated" for _, kind in memory)


def _load_on_the_least_loaded_worker(server, three_models, one_device, mode) -> None:
    """load_model goes to the worker holding the fewest weight bytes (or, where it has no
    room, the next) and serves there; unload_model takes it away (static mode: refused)."""
    def load(name: str, model: str):
        return server.post("/load_model", json={"model_path": three_models[model],
                                                "served_model_name": name})

    def held(w):
        return w["attention_bytes"] + max(w["ffn_bytes_here"], sum(w["ffn_bytes_per_server"]))

    workers = server.internal_state()["workers"]
    r = load("extra", "mixtral")  # fits any worker's FFN transport buffers
    if "static" in mode:
        assert r.status_code == 501, r.text
        return
    assert r.status_code == 200, r.text
    lightest = min(workers, key=lambda w: (held(w), w["index"]))["index"]
    after = {w["index"]: w["models"] for w in server.internal_state()["workers"]}
    assert [i for i, models in after.items() if "extra" in models] == [lightest]
    # qwen's top-k 4 overflows the buffers of a crosspool worker holding mixtral alone (507):
    # it goes to the next worker.
    assert load("extra2", "qwen").status_code == 200
    for name, model in (("extra", "mixtral"), ("extra2", "qwen")):
        r = server.post("/generate", json={"model": name, "input_ids": PROMPTS,
                                           "sampling_params": GREEDY})
        assert [o["output_ids"] for o in r.json()] == one_device[model]  # same checkpoints
        assert server.post("/unload_model", json={"served_model_name": name}).status_code == 200
    assert server.post("/rebalance", json={}).status_code == 501
    assert all(not {"extra", "extra2"} & set(w["models"])
               for w in server.internal_state()["workers"])
    assert server.post("/generate", json={"model": "extra", "input_ids": [1, 2]}
                       ).status_code == 404


def test_a_killed_worker_fails_its_requests_and_the_other_serves_on(three_models,
                                                                    launch_server):
    server = launch_server(three_models, "--devices", "cpu,cpu")
    no_plan = server.get("/plan")
    assert no_plan.status_code == 404 and "without --plan" in no_plan.text
    workers = server.internal_state()["workers"]
    victim = next(w for w in workers if w["index"] == 1)
    survivor_model = next(w for w in workers if w["index"] == 0)["models"][0]
    victim_model = victim["models"][0]
    context = server.get(f"/model_info?model={victim_model}").json()["context_length"]
    long = {"max_new_tokens": context - 8, "temperature": 0, "ignore_eos": True}
    started, chunks = threading.Event(), []

    def stream_victim() -> None:
        body = {"model": victim_model, "input_ids": [3, 4, 5], "sampling_params": long,
                "stream": True}
        with httpx.stream("POST", server.url + "/generate", json=body, timeout=120) as r:
            for line in r.iter_lines():
                chunks.append(line)
                started.set()

    thread = threading.Thread(target=stream_victim)
    thread.start()
    assert started.wait(60)
    os.kill(victim["pid"], signal.SIGKILL)
    ok = server.post("/generate", json={"model": survivor_model, "input_ids": [3, 4, 5],
                                        "sampling_params": GREEDY})
    thread.join(timeout=120)
    streamed = "\n".join(chunks)
    assert "attention worker 1" in streamed and '"abort"' in streamed, streamed[-2000:]
    assert ok.status_code == 200 and len(ok.json()["output_ids"]) == GREEDY["max_new_tokens"]
    late = server.post("/generate", json={"model": victim_model, "input_ids": [1, 2],
                                          "sampling_params": GREEDY})
    assert late.status_code == 503 and "attention worker 1" in late.text
    again = server.post("/generate", json={"model": survivor_model, "input_ids": [1, 2],
                                           "sampling_params": GREEDY})
    assert again.status_code == 200


PLAN_TRAFFIC = '{"default": {"mean_context": 128, "max_context": 256, "max_running": 2}}'


def make_plan(three_models, tmp_path, devices: int, memory: int = 4 << 20) -> Path:
    traffic = tmp_path / "traffic.json"
    traffic.write_text(PLAN_TRAFFIC)
    out = tmp_path / f"plan-{devices}.json"
    cmd = [sys.executable, "-m", "sglang_crosspool.plan", "--devices", str(devices),
           "--device-memory", str(memory), "--dtype", "float32", "--kv-page-bytes", "4096",
           "--traffic", str(traffic), "--out", str(out), "--brief"]
    for name, path in three_models.items():
        cmd += ["--model-path", path, "--served-model-name", name]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return out


@pytest.mark.parametrize("devices, mode, workers", [
    ("cpu,cpu", "monolithic", 2), ("cpu,cpu,cpu", "monolithic", 3),
    ("cpu,cpu", "static", 2), ("cpu,cpu", "crosspool", 1),
])
def test_the_plan_places_models_and_the_workers_hold_what_it_says(
        three_models, one_device, launch_server, tmp_path, devices, mode, workers):
    plan_file = make_plan(three_models, tmp_path, len(devices.split(",")))
    plan = json.loads(plan_file.read_text())[mode]
    extra = ["--ffn-transport", "shm"] if mode == "crosspool" else []  # FFN servers: processes
    server = launch_server({}, "--plan", str(plan_file), "--pool-mode", mode,
                           "--devices", devices, *extra)
    assert outputs(server) == one_device
    state = server.internal_state()
    assert len(state.get("workers", [])) == workers
    report = server.get("/plan").json()
    assert report["mode"] == mode and report["served"] == sorted(MODELS, key=list(
        MODELS).index)
    for device in report["devices"]:
        planned, got = device["planned"], device["reported"]
        if not planned["models"]:
            assert got is None  # a device the plan leaves empty gets no worker
            continue
        # Weight bytes as the plan computed them from config.json, and as the workers and
        # FFN servers hold them in tensors: within 5% (here they are the same count).
        assert abs(device["weights_ratio"] - 1) <= 0.05, device
        if planned["role"] != "weights":
            assert got["kv_pages"] == planned["kv_pages"], device
            assert sorted(got["models"]) == sorted(planned["models"])
    by_index = {d["index"]: d for d in report["devices"]}
    for d in plan["devices"]:
        assert by_index[d["index"]]["planned"]["weights_bytes"] == d["weights_bytes"]["value"]


def test_a_plan_the_server_cannot_run_is_refused_with_its_reason(three_models, tmp_path):
    plan_file = make_plan(three_models, tmp_path, 3)  # crosspool: 2 KV-pool devices
    r = subprocess.run([sys.executable, "-m", "sglang_crosspool.launch", "--plan",
                        str(plan_file), "--devices", "cpu,cpu,cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "2 KV-pool devices" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "sglang_crosspool.launch", "--plan",
                        str(plan_file), "--devices", "cpu,cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "the plan is for 3 devices, got 2" in r.stderr, r.stderr
