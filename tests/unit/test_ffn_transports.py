"""FFN transports: which links each device allows (refused at config time, before any FFN
server starts), the launch flag's choices, and a model-less echo server round trip over the
CPU transports (the path the crossing benchmark times, at two hidden sizes in one pool)."""

from __future__ import annotations

import pytest
import torch

from sglang_crosspool.config import EngineConfig
from sglang_crosspool.models.common import Routing
from sglang_crosspool.options import FFN_TRANSPORTS
from sglang_crosspool.server_args import build_parser


@pytest.fixture(scope="module")
def path(tiny_models):
    return tiny_models["olmoe"]


def crosspool(path, **options) -> EngineConfig:
    return EngineConfig.build(path, **{"pool_mode": "crosspool", "ffn_servers": 2, **options})


def test_launch_flag_offers_every_transport():
    assert {"cuda-ipc", "nccl"} <= set(FFN_TRANSPORTS)
    for transport in FFN_TRANSPORTS:
        args = build_parser().parse_args(["--model-path", "x", "--ffn-transport", transport])
        assert args.ffn_transport == transport


@pytest.mark.parametrize("devices", [{}, {"ffn_device": "cuda:0"},
                                     {"device": "cuda", "ffn_device": "cpu"}])
def test_cuda_ipc_is_refused_off_cuda(path, devices):
    with pytest.raises(ValueError, match="'cuda-ipc' .* needs CUDA devices.*use 'shm'"):
        crosspool(path, ffn_transport="cuda-ipc", **devices)


def test_cuda_ipc_builds_on_one_gpu_and_is_refused_across_gpus(path):
    # Building a config touches no GPU, so this runs on CPU machines too.
    for ffn_device in (None, "cuda:0"):
        config = crosspool(path, ffn_transport="cuda-ipc", device="cuda", ffn_device=ffn_device)
        assert config.ffn_transport == "cuda-ipc"
        assert config.ffn_device == (ffn_device or "cuda")
    with pytest.raises(ValueError, match="across GPUs use 'p2p'"):
        crosspool(path, ffn_transport="cuda-ipc", device="cuda", ffn_device="cuda:1")


def test_p2p_is_the_default_across_gpus_and_needs_a_gpu_per_server(path):
    config = crosspool(path, device="cuda:0", ffn_device="cuda:1", ffn_servers=1)
    assert config.ffn_transport == "p2p"
    assert crosspool(path, device="cuda:0").ffn_transport == "local"
    assert crosspool(path).ffn_transport == "local"  # CPU: in process unless asked
    with pytest.raises(ValueError, match="another GPU than attention"):
        crosspool(path, ffn_transport="p2p", device="cuda:0", ffn_device="cuda:0")
    with pytest.raises(ValueError, match="one FFN server per GPU"):
        crosspool(path, ffn_transport="p2p", device="cuda:0", ffn_device="cuda:1",
                  ffn_servers=2)
    with pytest.raises(ValueError, match="both sides on CUDA or both on CPU"):
        crosspool(path, ffn_transport="p2p", device="cpu", ffn_device="cuda:1")


def test_nccl_is_refused_on_cpu_and_points_to_dist(path):
    with pytest.raises(ValueError, match="NCCL needs CUDA devices.*ffn_transport='dist'"):
        crosspool(path, ffn_transport="nccl")
    with pytest.raises(ValueError, match="NCCL needs CUDA"):
        crosspool(path, ffn_transport="dist", dist_backend="nccl")


def test_nccl_needs_two_gpus_and_forces_its_backend(path):
    with pytest.raises(ValueError, match="NCCL cannot join two processes on one GPU.*cuda-ipc"):
        crosspool(path, ffn_transport="nccl", device="cuda:0", ffn_device="cuda")
    with pytest.raises(ValueError, match="contradicts ffn_transport 'nccl'"):
        crosspool(path, ffn_transport="nccl", dist_backend="gloo", device="cuda",
                  ffn_device="cuda:1")
    config = crosspool(path, ffn_transport="nccl", device="cuda", ffn_device="cuda:1")
    assert (config.ffn_transport, config.dist_backend) == ("nccl", "nccl")


def test_dist_keeps_gloo_on_cpu_and_may_stage_gloo_on_a_gpu(path):
    assert crosspool(path, ffn_transport="dist").dist_backend == "gloo"
    config = crosspool(path, ffn_transport="dist", device="cuda", dist_backend="gloo")
    assert config.dist_backend == "gloo"
    with pytest.raises(ValueError, match="one GPU"):  # GPU default backend: nccl
        crosspool(path, ffn_transport="dist", device="cuda")


def test_transport_checks_apply_only_to_crosspool(path):
    config = EngineConfig.build(path, pool_mode="monolithic", ffn_transport="cuda-ipc")
    assert config.pool_mode == "monolithic"


@pytest.mark.parametrize("transport", ["shm", "dist"])
def test_echo_servers_return_their_input_at_two_widths(transport):
    pytest.importorskip("zmq")
    from sglang_crosspool.ffn.remote import FFNServerPool, PoolSpec

    spec = PoolSpec(models={}, placement={"echo": [[0], [1]]}, device="cpu", dtype="float32",
                    transport=transport, max_tokens=8, hidden=64, max_top_k=4,
                    echo={"wide": 64, "narrow": 24}, start_timeout_s=60)
    pool = FFNServerPool(spec)
    try:
        assert [r.ffn_bytes for r in pool.ready] == [0, 0]
        sent = {}
        for slot, (model, width, n, k) in enumerate([("wide", 64, 8, 4), ("narrow", 24, 3, 2)]):
            sent[slot] = torch.randn(n, width)
            routing = Routing(torch.randint(0, 8, (n, k)), torch.rand(n, k))
            for link in pool.links:
                link.submit(slot, model, 0, sent[slot], routing)
        for slot, hidden in sent.items():  # both slots were in flight on each link
            for link in pool.links:
                torch.testing.assert_close(link.wait(slot), hidden, rtol=0, atol=0)
    finally:
        pool.close()
