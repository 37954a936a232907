"""Engine behaviour: many models at once, KV pressure, sampling options, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sglang_crosspool import Engine
from sglang_crosspool.engine.sampling_params import InvalidRequest
from sglang_crosspool.testing.checkpoints import ARCHS

GREEDY = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
PROMPTS = [[7, 8, 9], list(range(30, 55)), [500, 501, 502, 503, 504, 505], [11] * 13]


@pytest.fixture(scope="module")
def four_model_engine(tiny_models):
    return Engine([tiny_models[a] for a in ARCHS], served_model_name=list(ARCHS),
                  chunked_prefill_size=32)


def test_four_models_interleaved_equal_each_model_alone(four_model_engine, tiny_models):
    # Interleave: request i goes to model i % 4, and every model sees several prompts.
    prompts = PROMPTS * 2
    models = [ARCHS[i % 4] for i in range(len(prompts))]
    together = four_model_engine.generate(input_ids=prompts, sampling_params=GREEDY, model=models)
    for arch in ARCHS:
        alone = Engine(tiny_models[arch])
        mine = [p for p, m in zip(prompts, models) if m == arch]
        expected = alone.generate(input_ids=mine, sampling_params=GREEDY)
        got = [o for o, m in zip(together, models) if m == arch]
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in expected]
        assert all(o["meta_info"]["model"] == arch for o in got)
    stats = four_model_engine.stats()["kv"]
    assert stats["used_pages"] == 0
    assert all(m["pages_in_use"] == 0 for m in stats["models"].values())


def test_kv_pressure_retracts_and_recomputes_without_loss(tiny_models):
    paths = [tiny_models["qwen3_moe"], tiny_models["olmoe"]]
    names = ["a", "b"]
    prompts = [list(range(i * 20 + 1, i * 20 + 15)) for i in range(6)]
    models = [names[i % 2] for i in range(len(prompts))]
    params = dict(GREEDY, max_new_tokens=40)
    relaxed = Engine(paths, served_model_name=names)
    expected = relaxed.generate(input_ids=prompts, sampling_params=params, model=models)
    assert relaxed.stats()["scheduler"]["retractions"] == 0
    # 128-byte K slots per layer: 32 tokens a block; a block costs 2 * layers pages. The budget
    # fits one request of either model at its longest (54 tokens: 2 blocks of olmoe = 16 pages)
    # but far from six.
    tight = Engine(paths, served_model_name=names, kv_pages=24)
    got = tight.generate(input_ids=prompts, sampling_params=params, model=models)
    assert tight.stats()["scheduler"]["retractions"] > 0
    assert sum(o["meta_info"]["retractions"] for o in got) > 0
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in expected]
    stats = tight.stats()["kv"]
    assert stats["used_pages"] == 0 and stats["free_pages"] == 24


def test_request_larger_than_the_whole_pool_is_refused(tiny_models):
    engine = Engine(tiny_models["mixtral"], kv_pages=4)  # 1 block of 32 tokens
    with pytest.raises(InvalidRequest, match="KV"):
        engine.generate(input_ids=list(range(1, 30)), sampling_params={"max_new_tokens": 10})
    out = engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 5})
    assert out["meta_info"]["completion_tokens"] == 5


def test_seeded_sampling_is_reproducible_across_batches(tiny_models):
    engine = Engine(tiny_models["qwen2_moe"])
    params = {"max_new_tokens": 20, "temperature": 0.9, "top_p": 0.95, "seed": 1234,
              "ignore_eos": True}
    alone = engine.generate(input_ids=[4, 5, 6], sampling_params=params)
    batch = engine.generate(input_ids=[[9, 9], [4, 5, 6], [1]],
                            sampling_params=[dict(params, seed=1), params, {"max_new_tokens": 7}])
    assert batch[1]["output_ids"] == alone["output_ids"]
    other_seed = engine.generate(input_ids=[4, 5, 6], sampling_params=dict(params, seed=99))
    assert other_seed["output_ids"] != alone["output_ids"]


def test_top_k_one_equals_greedy(tiny_models):
    engine = Engine(tiny_models["olmoe"])
    greedy = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    top1 = engine.generate(input_ids=PROMPTS,
                           sampling_params=dict(GREEDY, temperature=1.3, top_k=1, seed=5))
    assert [o["output_ids"] for o in top1] == [o["output_ids"] for o in greedy]


def test_sampling_respects_top_k_and_min_p(tiny_models):
    engine = Engine(tiny_models["qwen3_moe"])
    prompt = [3, 1, 4, 1, 5]
    out = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 0},
                          return_logprob=True, logprob_start_len=len(prompt))
    assert out["meta_info"]["input_token_logprobs"] == []
    # Each first token sampled with top_k=3 is among the 3 most likely.
    top = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 1},
                          return_logprob=True, top_logprobs_num=3)
    allowed = {t for _, t, _ in top["meta_info"]["output_top_logprobs"][0]}
    for seed in range(12):
        o = engine.generate(input_ids=prompt,
                            sampling_params={"max_new_tokens": 1, "top_k": 3, "seed": seed})
        assert o["output_ids"][0] in allowed
        o = engine.generate(input_ids=prompt,
                            sampling_params={"max_new_tokens": 1, "min_p": 1.0, "seed": seed})
        assert o["output_ids"][0] == top["meta_info"]["output_top_logprobs"][0][0][1]


def test_repetition_penalty_prevents_repeats(tiny_models):
    engine = Engine(tiny_models["mixtral"])
    prompt = [20, 21, 22]
    plain = engine.generate(input_ids=prompt, sampling_params=GREEDY)["output_ids"]
    assert len(set(plain)) < len(plain)  # a random tiny model repeats itself when greedy
    params = dict(GREEDY, repetition_penalty=1e6)
    out = engine.generate(input_ids=prompt, sampling_params=params)["output_ids"]
    assert len(set(out)) == len(out) and not set(out) & set(prompt)
    out = engine.generate(input_ids=prompt,
                          sampling_params=dict(GREEDY, presence_penalty=2.0,
                                               frequency_penalty=2.0))["output_ids"]
    assert out != plain


def test_stop_strings_cut_the_text_exactly(tiny_models):
    engine = Engine(tiny_models["qwen3_moe"])
    base = engine.generate(prompt="Hello there", sampling_params=GREEDY)
    text = base["text"]
    assert len(text) > 6
    stop = text[3:6]
    cut = engine.generate(prompt="Hello there", sampling_params=dict(GREEDY, stop=[stop, "@@@"]))
    assert cut["text"] == text[: text.index(stop)]
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    # Output ids stop at the token that completed the stop string.
    assert cut["output_ids"] == base["output_ids"][: len(cut["output_ids"])]
    stop_id = base["output_ids"][4]
    by_id = engine.generate(prompt="Hello there",
                            sampling_params=dict(GREEDY, stop_token_ids=[stop_id]))
    first = base["output_ids"].index(stop_id)
    assert by_id["output_ids"] == base["output_ids"][: first + 1]
    assert by_id["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}


def test_eos_stops_unless_ignored(tiny_models, tmp_path):
    # Copy a checkpoint and declare its first greedy token to be EOS in generation_config.json.
    src = Path(tiny_models["olmoe"])
    prompt = [15, 16, 17]
    first = Engine(str(src)).generate(input_ids=prompt, sampling_params=GREEDY)["output_ids"][0]
    dst = tmp_path / "olmoe-eos"
    shutil.copytree(src, dst)
    gen = json.loads((dst / "generation_config.json").read_text())
    gen["eos_token_id"] = [first]
    (dst / "generation_config.json").write_text(json.dumps(gen))
    engine = Engine(str(dst))
    params = {"max_new_tokens": 6, "temperature": 0}
    out = engine.generate(input_ids=prompt, sampling_params=params)
    assert out["output_ids"] == [first]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}
    out = engine.generate(input_ids=prompt, sampling_params=dict(params, ignore_eos=True))
    assert len(out["output_ids"]) == 6


def test_text_prompts_batches_and_n(tiny_models):
    engine = Engine(tiny_models["qwen2_moe"])
    outs = engine.generate(prompt=["one", "two words"], sampling_params={"max_new_tokens": 3,
                                                                      "n": 2, "seed": 3})
    assert len(outs) == 4
    assert all(o["meta_info"]["completion_tokens"] == 3 for o in outs)
    tok = engine.tokenizer()
    assert outs[0]["meta_info"]["prompt_tokens"] == len(tok.encode("one",
                                                                   add_special_tokens=False))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="hi", model="nope"), "not served"),
        (dict(prompt=""), "empty"),
        (dict(input_ids=[]), "empty"),
        (dict(prompt="hi", sampling_params={"max_new_tokens": -1}), "max_new_tokens"),
        (dict(prompt="hi", sampling_params={"temperature": -0.5}), "temperature"),
        (dict(prompt="hi", sampling_params={"top_p": 0}), "top_p"),
        (dict(prompt="hi", sampling_params={"bogus": 1}), "bogus"),
        (dict(input_ids=list(range(1, 600))), "context length"),
        (dict(input_ids=[1, 2, 99999]), "input_ids"),
        (dict(input_ids=[1, 2], logprob_start_len=7), "logprob_start_len"),
    ],
)
def test_bad_input_raises_and_the_engine_keeps_serving(four_model_engine, kwargs, message):
    kwargs.setdefault("model", "mixtral")
    with pytest.raises(InvalidRequest, match=message):
        four_model_engine.generate(**kwargs)
    out = four_model_engine.generate(prompt="still here", model="mixtral",
                                     sampling_params={"max_new_tokens": 2})
    assert out["meta_info"]["completion_tokens"] == 2
    assert four_model_engine.stats()["kv"]["used_pages"] == 0
    assert not four_model_engine.core.has_work()


def test_one_bad_request_in_a_batch_queues_none(four_model_engine):
    with pytest.raises(InvalidRequest):
        four_model_engine.generate(input_ids=[[1, 2], []], model="olmoe")
    assert not four_model_engine.core.has_work()


def test_max_new_tokens_is_clipped_to_the_context(tiny_models):
    engine = Engine(tiny_models["mixtral"], context_length=40)
    out = engine.generate(input_ids=list(range(1, 31)), sampling_params=dict(GREEDY,
                                                                             max_new_tokens=100))
    assert out["meta_info"]["completion_tokens"] == 10
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 10}
