"""`python -m sglang_crosspool.launch --tp-size 2 --ep-size 2`: the scheduler process is rank 0
and spawns its follower; every model's greedy tokens equal an in-process TP-1 engine's, the
stats report the ranks, and the follower goes when the server stops."""

from __future__ import annotations

import time

import pytest

from sglang_crosspool import Engine
from sglang_crosspool.ffn.remote import process_running
from sglang_crosspool.testing.faults import child_pids

PROMPTS = [[5, 6, 7, 8], list(range(40, 58))]
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


def test_server_at_tp2_gives_tp1_tokens(model_paths, launch_server):
    with Engine(list(model_paths.values()), served_model_name=list(model_paths),
                device="cpu") as engine:
        want = {name: [o["output_ids"] for o in engine.generate(
            input_ids=PROMPTS, sampling_params=GREEDY, model=name)] for name in model_paths}
    server = launch_server(model_paths, "--tp-size", "2", "--ep-size", "2")
    for name in model_paths:
        r = server.post("/generate", json={"model": name, "input_ids": PROMPTS,
                                           "sampling_params": GREEDY})
        assert r.status_code == 200, r.text
        assert [o["output_ids"] for o in r.json()] == want[name], name
    parallel = server.internal_state()["parallel"]
    assert (parallel["tp_size"], parallel["ep_size"]) == (2, 2)
    metrics = server.get("/metrics").text
    assert 'sglang_crosspool:kv_head_replicas{model_name="qwen-a"} 1.0' in metrics
    assert "sglang_crosspool:kv_replicated_bytes" in metrics
    # The launcher's child is the scheduler (rank 0); its own children include the follower.
    followers = {p for s in child_pids(server.proc.pid) for p in child_pids(s)}
    assert followers, "no follower process found under the scheduler"
    server.proc.terminate()
    server.proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while any(process_running(p) for p in followers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(process_running(p) for p in followers), "a follower outlived its server"


@pytest.mark.parametrize("flags, message", [
    (["--tp-size", "3"], "cannot be split over tp_size 3"),
    (["--tp-size", "2", "--pool-mode", "crosspool", "--ffn-transport", "dist"], "dist"),
])
def test_launcher_refuses(model_paths, flags, message):
    from sglang_crosspool.server_args import ServerArgs

    args = ServerArgs.from_cli(["--model-path", model_paths["qwen-a"], *flags])
    with pytest.raises(ValueError, match=message):
        args.engine_config()
