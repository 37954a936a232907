"""Builds the FFN executor that the engine's pool mode asks for.

- `static`, `monolithic`: every model's whole FFN in this process (next to attention).
- `crosspool` + `local`: the weights pool's expert placement, as in-process FFN servers.
- `crosspool` + `shm` / `cuda-ipc` / `dist` / `nccl`: FFN server processes (the attention side
  loads no FFN bytes). With data-parallel attention (`dp_size` > 1, shm or cuda-ipc), replica 0
  starts them and the other replicas attach to the same servers.
"""

from __future__ import annotations

import torch

from sglang_crosspool.config import DTYPES, EngineConfig
from sglang_crosspool.ffn.executor import FFNExecutor, LocalFFNExecutor
from sglang_crosspool.ffn.placement import balanced_placement
from sglang_crosspool.models.checkpoint import open_checkpoint
from sglang_crosspool.models.registry import resolve


def make_ffn_executor(config: EngineConfig) -> FFNExecutor:
    servers = config.ffn_servers if config.pool_mode == "crosspool" else 1
    if config.pool_mode == "crosspool" and config.ffn_placement is not None:
        placement = {name: [list(e) for e in shares] for name, shares in config.ffn_placement}
    else:
        placement = balanced_placement({m.name: m.spec.num_experts for m in config.models},
                                       servers)
    if config.pool_mode == "crosspool" and config.ffn_transport != "local":
        # Imported here: ZeroMQ is needed only when FFN servers are processes.
        from sglang_crosspool.ffn.remote import FFNServerPool, PoolSpec, RemoteFFNExecutor

        # A step's tokens: a prefill chunk, or a decode batch padded to its graph bucket.
        max_tokens = max(config.chunked_prefill_size, *(config.cuda_graph_bs or ()),
                         min(config.cuda_graph_max_bs, config.max_running_requests))
        spec = PoolSpec(
            models={m.name: m.path for m in config.models}, placement=placement,
            device=config.ffn_device, dtype=config.dtype, transport=config.ffn_transport,
            max_tokens=max_tokens, hidden=max(m.spec.hidden_size for m in config.models),
            max_top_k=max(m.spec.top_k for m in config.models), dist_backend=config.dist_backend,
            slots=max(2, config.pipeline_microbatches), attention_device=config.device,
            load_format=config.load_format, replicas=config.dp_size,
            link_dir=config.ffn_link_dir)
        if config.dp_rank > 0:  # data-parallel attention: replica 0 started the servers
            from sglang_crosspool.ffn.remote import AttachedFFNPool

            return RemoteFFNExecutor(AttachedFFNPool(spec, config.dp_rank))
        if config.ffn_transport == "p2p":
            from sglang_crosspool.ffn.p2p_executor import P2PFFNExecutor

            layers = {m.name: m.spec.num_layers for m in config.models}
            return P2PFFNExecutor(FFNServerPool(spec), layers)
        return RemoteFFNExecutor(FFNServerPool(spec))
    device = torch.device(config.ffn_device)
    halves = {entry.name: build_halves(entry.path, placement[entry.name], device, config.dtype,
                                       config.load_format, config.moe_small_batch)
              for entry in config.models}
    return LocalFFNExecutor(halves, device)


def build_halves(path: str, shares: list[list[int]], device, dtype: str,
                 load_format: str, moe_small_batch: str = "auto") -> list:
    """One model's FFN, as one half per expert share (the first with the shared experts and
    dense MLPs), read from its checkpoint onto `device`."""
    spec, arch = resolve(path)
    files = open_checkpoint(path, load_format, device)
    return [arch.ffn_cls(spec, files, torch.device(device), DTYPES[dtype], experts=share,
                         with_shared=i == 0, moe_small_batch=moe_small_batch)
            for i, share in enumerate(shares)]
