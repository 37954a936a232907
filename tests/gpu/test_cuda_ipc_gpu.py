"""FFN servers as processes on a CUDA GPU: the cuda-ipc transport (and shm staged through the
host, and nccl where there are two GPUs) gives monolithic's greedy tokens on the same GPU, and
a killed FFN server ends requests with an error, as on CPU. cuda-ipc across GPUs is refused
(the p2p transport is that path: test_p2p_gpu.py).

Marked `gpu`; skipped without CUDA or pyzmq. Attention runs on GPU 0; FFN servers on GPU 0
beside it (nccl: on GPU 1). Exact comparisons run in float32 with decode
graphs off everywhere (so every run takes the same eager kernels); bf16 is compared with
crosspool-local, which has the same expert split and sums in the same order.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("zmq")

from sglang_crosspool import Engine  # noqa: E402
from sglang_crosspool.testing import multimodel  # noqa: E402
from sglang_crosspool.testing.faults import failed_cleanly, kill_ffn_server_mid_run  # noqa: E402

TWO_GPUS = torch.cuda.device_count() >= 2
FFN_GPUS = ["cuda:0"]
needs_two = pytest.mark.skipif(not TWO_GPUS, reason="needs 2 GPUs")


def run_all(paths, dtype="float32", **options):
    return multimodel.run_all(paths, device="cuda:0", dtype=dtype, disable_cuda_graph=True,
                              **options)


@pytest.fixture(scope="module")
def reference(arch_paths):
    return run_all(arch_paths, pool_mode="monolithic")


@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("transport, ffn_device", [
    *[("cuda-ipc", d) for d in FFN_GPUS],
    ("shm", "cuda:0"),
    pytest.param("nccl", "cuda:1", marks=needs_two),
])
def test_ffn_server_processes_on_gpu_match_monolithic(arch_paths, reference, transport, ffn_device,
                                                      microbatches):
    outputs, stats = run_all(arch_paths, pool_mode="crosspool", ffn_servers=2,
                             ffn_transport=transport, ffn_device=ffn_device,
                             pipeline_microbatches=microbatches)
    assert outputs == reference[0]
    assert stats["ffn_bytes_here"] == 0
    assert sum(stats["ffn_bytes_per_server"]) == reference[1]["ffn_bytes_here"]
    if microbatches > 1:
        assert stats["pipeline"]["steps"] > 0


@pytest.mark.parametrize("ffn_device", FFN_GPUS)
def test_cuda_ipc_in_bf16_matches_the_same_split_in_process(arch_paths, ffn_device):
    local, _ = run_all(arch_paths, dtype="bfloat16", pool_mode="crosspool", ffn_servers=2,
                       ffn_transport="local", pipeline_microbatches=2)
    remote, _ = run_all(arch_paths, dtype="bfloat16", pool_mode="crosspool", ffn_servers=2,
                        ffn_transport="cuda-ipc", ffn_device=ffn_device,
                        pipeline_microbatches=2)
    assert remote == local


@needs_two
def test_cuda_ipc_across_gpus_is_refused_with_a_pointer_to_p2p(arch_paths):
    with pytest.raises(ValueError, match="across GPUs use 'p2p'"):
        Engine(arch_paths[0], device="cuda:0", pool_mode="crosspool", ffn_transport="cuda-ipc",
               ffn_device="cuda:1")


@pytest.mark.parametrize("ffn_device", FFN_GPUS)
def test_killed_cuda_ipc_server_ends_requests_with_an_error(tiny_models, ffn_device):
    engine = Engine(tiny_models["qwen2_moe"], device="cuda:0", dtype="float32",
                    pool_mode="crosspool", ffn_servers=2, ffn_transport="cuda-ipc",
                    ffn_device=ffn_device, disable_cuda_graph=True)
    core = engine.core
    try:
        states = kill_ffn_server_mid_run(core, "qwen2_moe", server=1)
        assert failed_cleanly(core, states, "qwen2_moe", server=1) == []
        # This process's GPU work still runs after the server's death.
        assert (torch.ones(4, device="cuda:0") * 2).sum().item() == 8
    finally:
        engine.shutdown()
