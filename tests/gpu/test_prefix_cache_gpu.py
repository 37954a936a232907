"""The prefix cache on a GPU with the CUDA VMM page backend: a cached block is mapped once
(requests that reuse it map only their own blocks), flushing unmaps every page, and greedy
outputs (decode through CUDA graphs) equal those without the cache.

Marked `gpu`; skipped without CUDA or where the device has no VMM.
"""

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from sglang_crosspool import Engine  # noqa: E402
from sglang_crosspool.memory import cuda_vmm  # noqa: E402
from sglang_crosspool.testing.checkpoints import make_config_only  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "model-configs"

DEV = torch.device("cuda", torch.cuda.current_device())
_REASON = cuda_vmm.vmm_unavailable_reason(DEV)
if _REASON is not None:
    pytest.skip(_REASON, allow_module_level=True)

GREEDY = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}


def test_cached_blocks_are_mapped_once_and_flush_unmaps_them(tmp_path):
    # OLMoE's attention shape (16 KV heads of 128) in two layers, random weights made on the
    # GPU: a block (one 2 MiB page per layer and K/V) holds 256 tokens in fp32.
    path = str(make_config_only(tmp_path / "m", CONFIGS / "OLMoE-1B-7B-0924",
                                num_hidden_layers=2))
    options = dict(device=str(DEV), dtype="float32", kv_page_backend="vmm", kv_reserve_pages=0,
                   chunked_prefill_size=128, load_format="dummy")
    engine = Engine(path, **options)
    core = engine.core
    backend = core.kv_pool.backend
    per_block = core.kv_pool.pages_per_block(engine.models[0])
    block = core.kv_pool.block_tokens(engine.models[0])
    system = [100 + (i * 7) % 900 for i in range(2 * block + 100)]
    prompts = [system + [1, 2, 3], system + [4, 5], system + list(range(900, 960))]
    cold = Engine(path, disable_radix_cache=True, **options)
    want = [cold.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] for p in prompts]
    cold.shutdown()
    first = engine.generate(input_ids=prompts[0], sampling_params=GREEDY)
    maps = backend.map_calls
    rest = [engine.generate(input_ids=p, sampling_params=GREEDY) for p in prompts[1:]]
    assert [first["output_ids"]] + [o["output_ids"] for o in rest] == want
    cached = [o["meta_info"]["cached_tokens"] for o in rest]
    assert cached[0] == len(system) // block * block > 0
    # Only blocks past the cached prefix were mapped for the later requests.
    new_blocks = sum(-(-(len(p) + GREEDY["max_new_tokens"]) // block) - c // block
                     for p, c in zip(prompts[1:], cached))
    assert backend.map_calls - maps <= new_blocks * per_block
    kv = engine.stats()["kv"]
    assert kv["used_pages"] == 0 and kv["mapped_pages"] == kv["cached_pages"] > 0
    assert engine.flush_cache()
    assert backend.unmap_calls == backend.map_calls
    assert engine.stats()["kv"]["mapped_pages"] == 0
    engine.shutdown()
