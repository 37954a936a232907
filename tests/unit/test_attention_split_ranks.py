"""Attention split over 2-3 worker processes (gloo) gives one process's greedy tokens (issue
16): the sequence split for a GQA model (Qwen3-MoE) and an MLA model (DeepSeek-V2), each
request's KV pages spread over the ranks (experts divided over them too); the head split
(tensor parallelism with the KV heads divided) for GQA. Small KV pages, so every request spans
blocks on every rank."""

from __future__ import annotations

import pytest

from sglang_crosspool.engine.engine import Engine
from sglang_crosspool.testing.checkpoints import make_model

PROMPTS = [list(range(5, 90, 3)), [7, 8, 10], [11, 400, 12, 13, 600, 14, 15, 16, 17, 18, 19]]
GREEDY = {"max_new_tokens": 10, "temperature": 0}
# 1 KiB pages: 8 tokens of the tiny Qwen3 (2 KV heads x 16 dims), 4 of DeepSeek's latent; chunks
# of 16 make the longest prompt's prefill continue over KV already spread over the ranks.
OPTIONS = {"dtype": "float32", "kv_page_bytes": 1024, "chunked_prefill_size": 16}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    return {
        "qwen3_moe": str(make_model(root / "qwen3", "qwen3_moe", seed=1)),
        "deepseek_v2": str(make_model(root / "ds", "deepseek_v2", seed=1)),
        # 3 KV heads (6 q heads), so that 3 ranks divide them
        "qwen3_kv3": str(make_model(root / "qwen3_kv3", "qwen3_moe", seed=2,
                                    num_attention_heads=6, num_key_value_heads=3)),
    }


def _tokens(path: str, **options) -> tuple[list, dict]:
    engine = Engine(path, **{**OPTIONS, **options})
    try:
        out = [o["output_ids"] for o in engine.generate(input_ids=PROMPTS,
                                                        sampling_params=GREEDY)]
        return out, engine.stats()
    finally:
        engine.shutdown()


@pytest.mark.parametrize(("arch", "ranks"), [("qwen3_moe", 2), ("qwen3_moe", 3),
                                             ("deepseek_v2", 2), ("deepseek_v2", 3)])
def test_sequence_split_gives_one_process_tokens(models, arch, ranks):
    want, _ = _tokens(models[arch])
    got, stats = _tokens(models[arch], attention_split="seq", attention_split_size=ranks)
    assert got == want
    per_rank = stats["parallel"]["kv_pages_per_rank"]
    assert len(per_rank) == ranks and all(r["used_pages"] for r in per_rank)  # cached prefixes
    # Experts divided over the ranks, except where DeepSeek's shared experts (32 wide) cannot
    # be cut in 3: its FFN stays whole on every rank.
    expert_parallel = not (arch == "deepseek_v2" and ranks == 3)
    assert list(stats["parallel"]["ffn_expert_parallel"].values()) == [expert_parallel]


@pytest.mark.parametrize(("arch", "ranks", "extra"), [("qwen3_moe", 2, {}),
                                                      ("qwen3_kv3", 3, {"ep_size": 3})])
def test_head_split_gives_one_process_tokens(models, arch, ranks, extra):
    if arch == "qwen3_kv3":  # 3 KV heads x 16 floats: 192 bytes a token and layer
        extra = {**extra, "kv_page_bytes": 1536}
    want, _ = _tokens(models[arch], kv_page_bytes=extra.get("kv_page_bytes", 1024))
    got, stats = _tokens(models[arch], attention_split="head", attention_split_size=ranks,
                         **extra)
    assert got == want
    model = next(iter(stats["parallel"]["models"].values()))
    assert model["kv_replicas"] == 1  # no KV head kept twice


def test_head_split_of_a_latent_cache_is_refused(models):
    with pytest.raises(ValueError, match="use attention_split seq"):
        Engine(models["deepseek_v2"], attention_split="head", attention_split_size=2)


def test_launcher_flags_reach_the_engine_config(models):
    from sglang_crosspool.server_args import ServerArgs

    seq = ServerArgs.from_cli(["--model", f"ds={models['deepseek_v2']}", "--attention-split",
                               "seq", "--attention-split-size", "3"]).engine_config()
    assert (seq.attention_split, seq.attention_split_size, seq.tp_size) == ("seq", 3, 1)
    head = ServerArgs.from_cli(["--model", f"q={models['qwen3_moe']}", "--attention-split",
                                "head", "--attention-split-size", "2"]).engine_config()
    assert (head.attention_split, head.tp_size) == ("head", 2)
    with pytest.raises(ValueError, match="pool_mode 'static'"):
        Engine(models["qwen3_moe"], pool_mode="static", attention_split="seq",
               attention_split_size=2)


@pytest.mark.parametrize("transport", ["local", "shm"])
def test_sequence_split_with_the_weights_pool(models, transport):
    # Crosspool: the experts in the FFN servers, reached by rank 0, whose output every rank
    # gets by broadcast; the KV-pool ranks hold attention and their share of the KV only.
    path = models["deepseek_v2"]
    want, _ = _tokens(path)
    got, stats = _tokens(path, pool_mode="crosspool", ffn_transport=transport,
                         attention_split="seq", attention_split_size=2)
    assert got == want
    assert stats["ffn_bytes_here"] == (stats["ffn_bytes_per_server"][0]
                                       if transport == "local" else 0)
    assert all(r["used_pages"] for r in stats["parallel"]["kv_pages_per_rank"])


def test_sequence_split_reuses_cached_prefixes(models):
    # Prompts sharing a 24-token prefix, twice: the second round starts from cached blocks
    # that sit on both ranks, and new blocks go wherever pages are free.
    prefix = list(range(100, 124))
    prompts = [prefix + [7, 8], prefix + [9, 10, 11], prefix]
    path = models["qwen3_moe"]

    def rounds(**options):
        engine = Engine(path, **{**OPTIONS, **options})
        try:
            results = [engine.generate(input_ids=prompts, sampling_params=GREEDY)
                       for _ in range(2)]
            cached = sum(o["meta_info"]["cached_tokens"] for o in results[1])
            return [[o["output_ids"] for o in r] for r in results], cached
        finally:
            engine.shutdown()

    want, _ = rounds()
    got, cached = rounds(attention_split="seq", attention_split_size=2)
    assert got == want and got[0] == got[1]
    assert cached >= 3 * 16  # whole 8-token blocks of the shared prefix, per prompt
