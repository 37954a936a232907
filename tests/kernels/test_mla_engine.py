"""DeepSeek-V2 through the Triton MLA path (the one CUDA runs) under the interpreter: the same
greedy tokens as the torch path, eagerly and through the padded static decode-graph buffers,
and the logits of a decode step close to transformers' own model."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 on CPU", allow_module_level=True)

from sglang_crosspool import Engine  # noqa: E402
from sglang_crosspool.engine.attention_mla import (  # noqa: E402
    LatentAttention,
    TritonLatentAttention,
)
from sglang_crosspool.engine.cuda_graph import DecodeGraphs  # noqa: E402
from sglang_crosspool.testing.checkpoints import hf_reference, make_model  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(1, 41)), [900]]
GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> str:
    return str(make_model(tmp_path_factory.mktemp("mla") / "ds", "deepseek_v2", seed=1))


def _generate(engine):
    return [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


def test_triton_path_gives_the_torch_paths_tokens(deepseek):
    torch_engine = Engine(deepseek, attention_backend="torch", chunked_prefill_size=16)
    runner = next(iter(torch_engine.core.runners.values()))
    assert type(runner.backend) is LatentAttention
    expected = _generate(torch_engine)

    engine = Engine(deepseek, attention_backend="triton", chunked_prefill_size=16,
                    max_running_requests=4)
    core = engine.core
    name = core.config.model_names[0]
    assert isinstance(core.runners[name].backend, TritonLatentAttention)
    assert _generate(engine) == expected
    # The graph path on CPU: the same padded static buffers, run eagerly (3 rows in bucket 4).
    core.graphs[name] = DecodeGraphs(core.runners[name], core.kv_pool, [1, 4], max_blocks=8,
                                     capture=False)
    assert _generate(engine) == expected
    assert core.graphs[name].runs >= GREEDY["max_new_tokens"] - 1
    assert core.stats()["kv"]["used_pages"] == 0  # pages left are the prefix cache's


def test_triton_decode_logits_match_transformers(deepseek):
    engine = Engine(deepseek, attention_backend="triton", dtype="float32")
    rows: list[torch.Tensor] = []
    engine.core.logits_observer = lambda rid, row: rows.append(row.clone())
    prompt = PROMPTS[1]
    out = engine.generate(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 3})
    hf = hf_reference(deepseek)
    ids = torch.tensor([prompt + out["output_ids"]])
    with torch.no_grad():
        ref = hf(ids).logits[0, len(prompt) - 1 : len(prompt) + 2].float()
    # rows[0] is the prefill's (torch path); rows[1:] are decode steps through the kernel.
    assert torch.allclose(torch.stack(rows), ref, atol=1e-4, rtol=1e-4)
