"""The p2p crossing on two GPUs: attention on GPU 0, FFN servers on GPU 1, decode steps as CUDA
graphs on both sides with one Step message per step.

- greedy tokens equal monolithic's in float32, with and without graphs, with 1 and 2
  micro-batches (the two-micro-batch graph pipelines them);
- a captured decode step makes no host synchronisation (CUDA's sync debug mode raises on one)
  and sends one message per FFN server per step, whatever the layer count;
- a server killed during captured decode steps ends the requests with an error naming it
  within seconds, and the engine refuses new work (503 in the server).

One FFN server (p2p takes a GPU per server; several servers are covered on CPU). A process
makes one p2p pool on CUDA, so run one test per process, as `benchmark/p2p_gpu_run.sh`
(STAGE=final) does; a second pool in one process fails with a message saying so. Marked `gpu`;
skipped without two GPUs or pyzmq.
"""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = pytest.mark.gpu

if torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA GPUs", allow_module_level=True)
pytest.importorskip("zmq")

from sglang_crosspool import Engine  # noqa: E402
from sglang_crosspool.engine.request import EngineRequest  # noqa: E402
from sglang_crosspool.engine.sampling_params import SamplingParams  # noqa: E402
from sglang_crosspool.testing import multimodel  # noqa: E402
from sglang_crosspool.testing.faults import failed_cleanly, kill_ffn_server_mid_run  # noqa: E402
from sglang_crosspool.transport.links import P2PLink  # noqa: E402

P2P = dict(pool_mode="crosspool", ffn_servers=1, ffn_transport="p2p", ffn_device="cuda:1",
           attention_backend="triton")


def run_all(paths, graphs: bool, **options):
    return multimodel.run_all(paths, device="cuda:0", dtype="float32",
                              disable_cuda_graph=not graphs, cuda_graph_max_bs=8, **options)


@pytest.fixture(scope="module")
def reference(arch_paths):
    return run_all(arch_paths, graphs=True, pool_mode="monolithic", attention_backend="triton")


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("microbatches", [1, 2])
def test_p2p_on_gpu_1_matches_monolithic(arch_paths, reference, graphs, microbatches):
    outputs, stats = run_all(arch_paths, graphs=graphs, pipeline_microbatches=microbatches, **P2P)
    assert outputs == reference[0]
    assert stats["ffn_bytes_here"] == 0
    assert sum(stats["ffn_bytes_per_server"]) == reference[1]["ffn_bytes_here"]
    runs = sum(g["runs"] for g in stats["cuda_graphs"].values())
    if graphs:
        assert runs > 0
        assert {g["microbatches"] for g in stats["cuda_graphs"].values()} == {microbatches}
    else:
        assert runs == 0


def test_a_captured_step_has_no_host_sync_and_one_message_per_server(tiny_models,
                                                                    monkeypatch):
    sent = []
    original = P2PLink.step
    monkeypatch.setattr(P2PLink, "step", lambda self, msg: (sent.append(msg),
                                                            original(self, msg))[1])
    engine = Engine(tiny_models["qwen3_moe"], device="cuda:0", dtype="bfloat16",
                    cuda_graph_max_bs=4, pipeline_microbatches=2, **P2P)
    core = engine.core
    try:
        graphs = core.graphs["qwen3_moe"]
        layers = core.config.models[0].spec.num_layers
        assert layers > 1
        params = SamplingParams.from_dict({"max_new_tokens": 8, "ignore_eos": True})
        for i in range(3):
            core.add_request(EngineRequest(f"r{i}", "qwen3_moe", [1, 2, 3 + i], params))
        core.step()  # prefill: eager
        run = graphs.run

        def strict_run(*args):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return run(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        graphs.run = strict_run
        sent.clear()
        before = graphs.runs
        for _ in range(4):
            core.step()
        assert graphs.runs - before == 4
        # One Step message per step (one server, 4 steps), none per layer.
        steps = [msg for msg in sent if type(msg).__name__ == "Step"]
        assert len(sent) == len(steps) == 4
        assert all(msg.graph for msg in steps)
    finally:
        engine.shutdown()


def test_killed_p2p_server_during_graph_decode_ends_requests_within_seconds(tiny_models):
    engine = Engine(tiny_models["qwen2_moe"], device="cuda:0", dtype="float32",
                    cuda_graph_max_bs=4, **P2P)
    core = engine.core
    try:
        assert core.graphs["qwen2_moe"].graphs
        start = time.monotonic()
        states = kill_ffn_server_mid_run(core, "qwen2_moe", server=0)
        assert time.monotonic() - start < 10
        assert failed_cleanly(core, states, "qwen2_moe", server=0) == []
        assert (torch.ones(4, device="cuda:0") * 2).sum().item() == 8
    finally:
        engine.shutdown()
