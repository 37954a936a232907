"""Constrained decoding in the engine (engine/grammar.py): regex, JSON-schema and EBNF outputs
checked with `re`, `json` + `jsonschema` and Python's parser; mixed batches; bad grammars;
the grammar cache; requests waiting for their grammar; padded vocabularies; the scheduler's
`ready` flag.
"""

from __future__ import annotations

import ast
import json
import re
import threading

import pytest
import torch
from crosspool_scheduler import GlobalScheduler, SchedReq, SchedulerLimits

from sglang_crosspool import Engine
from sglang_crosspool.engine.grammar import GrammarKey, RequestGrammar, mask_rows
from sglang_crosspool.engine.request import EngineRequest
from sglang_crosspool.engine.sampling_params import InvalidRequest, SamplingParams
from sglang_crosspool.testing.checkpoints import make_model

jsonschema = pytest.importorskip("jsonschema")

SEEDS = range(6)

REGEXES = [
    r"((25[0-5]|2[0-4]\d|[01]?\d\d?)\.){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)",  # an IPv4 address
    r"\(\d{3}\) \d{3}-\d{4}",
    r"(yes|no|maybe)",
    r"[A-Z][a-z]{1,6}( [A-Z][a-z]{1,6}){0,2}\.",
    r"-?(0|[1-9]\d{0,3})(\.\d{1,3})?",
]

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                               "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
            },
        },
        "required": ["name", "age", "address"],
    },
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "size": {"type": "string", "enum": ["S", "M", "L"]},
                       "ok": {"type": "boolean"}},
        "required": ["color", "size", "ok"],
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                     "minItems": 1, "maxItems": 4},
            "pairs": {"type": "array", "maxItems": 2, "items": {
                "type": "object", "properties": {"k": {"enum": ["a", "b"]},
                                                 "v": {"type": "boolean"}},
                "required": ["k", "v"]}},
        },
        "required": ["tags", "pairs"],
    },
    "numbers": {
        "type": "object",
        "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1},
                       "n": {"type": "integer", "exclusiveMinimum": 10, "maximum": 99},
                       "t": {"type": "integer", "minimum": -40, "maximum": -10}},
        "required": ["x", "n", "t"],
    },
}

# Sums and products of small numbers, parenthesised at will.
ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor ("*" factor)*
factor ::= number | "(" expr ")"
number ::= [1-9] [0-9]?
"""


@pytest.fixture(scope="module")
def path(tiny_models) -> str:
    return tiny_models["qwen3_moe"]


@pytest.fixture(scope="module")
def engine(path):
    with Engine(path) as e:
        yield e


@pytest.fixture(scope="module")
def compact(path):
    """JSON schemas with compact separators only: a random model wanders in whitespace."""
    with Engine(path, constrained_json_disable_any_whitespace=True) as e:
        yield e


def _samples(engine, prompt: str, params: dict, seeds=SEEDS) -> list[dict]:
    return engine.generate(prompt=[prompt] * len(seeds),
                           sampling_params=[{**params, "seed": s} for s in seeds])


def _finish(out: dict) -> str:
    return out["meta_info"]["finish_reason"]["type"]


@pytest.mark.parametrize("regex", REGEXES)
def test_every_output_under_a_regex_matches_it(engine, regex):
    outs = _samples(engine, "Answer:", {"regex": regex, "max_new_tokens": 64})
    outs.append(engine.generate(prompt="Answer:", sampling_params={
        "regex": regex, "max_new_tokens": 64, "temperature": 0}))
    for out in outs:
        assert _finish(out) == "stop", out
        assert re.fullmatch(regex, out["text"]), out["text"]


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_output_under_a_json_schema_parses_and_validates(compact, name):
    schema = SCHEMAS[name]
    outs = _samples(compact, "Give JSON:", {"json_schema": json.dumps(schema),
                                            "max_new_tokens": 200})
    for out in outs:
        assert _finish(out) == "stop", out
        jsonschema.validate(json.loads(out["text"]), schema)


def test_json_with_any_whitespace_is_valid_json_too(engine):
    """SGLang's default: any whitespace between JSON tokens."""
    schema = SCHEMAS["enums"]
    outs = _samples(engine, "Give JSON:", {"json_schema": json.dumps(schema),
                                           "max_new_tokens": 400})
    finished = [o for o in outs if _finish(o) == "stop"]
    assert finished
    for out in finished:
        jsonschema.validate(json.loads(out["text"]), schema)


def test_ebnf_arithmetic(engine):
    outs = _samples(engine, "1+2*3 =", {"ebnf": ARITHMETIC, "max_new_tokens": 96})
    for out in outs:
        assert _finish(out) == "stop", out
        text = out["text"]
        assert re.fullmatch(r"[0-9+\-*()]+", text), text
        tree = ast.parse(text, mode="eval")  # a well-formed expression
        assert isinstance(eval(compile(tree, "<ebnf>", "eval")), int)


def test_mixed_batch_constrained_and_free(engine):
    """One call mixing constrained and free requests: the free ones are not masked (greedy
    output equals the same request alone) and the constrained ones follow their grammars."""
    free = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    alone = engine.generate(prompt="Once upon a time", sampling_params=free)
    regex = r"[0-9]{4}-[0-9]{2}"
    schema = SCHEMAS["enums"]
    outs = engine.generate(
        prompt=["Once upon a time", "Date:", "JSON:", "Hello", "Yes or no?"],
        sampling_params=[free, {"regex": regex, "seed": 1},
                         {"json_schema": json.dumps(schema), "seed": 2, "max_new_tokens": 400},
                         {"max_new_tokens": 10, "seed": 3},
                         {"ebnf": 'root ::= "yes" | "no"', "temperature": 0}])
    assert outs[0]["output_ids"] == alone["output_ids"]
    assert re.fullmatch(regex, outs[1]["text"])
    if _finish(outs[2]) == "stop":
        jsonschema.validate(json.loads(outs[2]["text"]), schema)
    assert _finish(outs[3]) == "length" and outs[3]["meta_info"]["completion_tokens"] == 10
    assert outs[4]["text"] in ("yes", "no") and _finish(outs[4]) == "stop"


def test_unfinished_grammar_ends_with_length(engine):
    out = engine.generate(prompt="Spell:", sampling_params={
        "regex": "[a-z]{40}", "max_new_tokens": 5, "seed": 0})
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    assert out["meta_info"]["completion_tokens"] == 5
    assert re.fullmatch("[a-z]*", out["text"]) and len(out["text"]) < 40


def test_grammar_end_stops_even_with_ignore_eos(engine):
    out = engine.generate(prompt="Pick:", sampling_params={
        "regex": "(left|right)", "ignore_eos": True, "max_new_tokens": 32, "temperature": 0})
    assert out["text"] in ("left", "right") and _finish(out) == "stop"
    assert out["meta_info"]["completion_tokens"] < 32


def test_logprobs_under_a_grammar(engine):
    out = engine.generate(prompt="Digits:", sampling_params={"regex": "[0-9]{3}", "seed": 0},
                          return_logprob=True, top_logprobs_num=2)
    lps = out["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in lps] == out["output_ids"]
    assert all(lp is not None and lp <= 0 and lp > float("-inf") for lp, _, _ in lps)


@pytest.mark.parametrize("params, message", [
    ({"regex": "(abc"}, "The parenthesis is not closed"),
    ({"regex": "[z-a]"}, "sampling_params.regex: invalid regex"),
    ({"json_schema": "{not json"}, "sampling_params.json_schema: not valid JSON"),
    ({"json_schema": '{"type": "nonsense"}'}, 'Unsupported type "nonsense"'),
    ({"json_schema": "[1, 2]"}, "a JSON schema is an object"),
    ({"ebnf": "root ::= missing"}, 'Rule "missing" is not defined'),
    ({"ebnf": 'root ::= "a" |'}, "sampling_params.ebnf: invalid EBNF grammar"),
])
def test_bad_grammars_are_refused_with_the_compilers_message(engine, params, message):
    before = engine.stats()["grammar"]["compiled"]
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        engine.generate(prompt="x", sampling_params=params)
    assert engine.stats()["grammar"]["compiled"] == before  # nothing was queued
    assert not engine.core.has_work()
    ok = engine.generate(prompt="x", sampling_params={"regex": "[ab]{3}", "seed": 0})
    assert re.fullmatch("[ab]{3}", ok["text"])


def test_one_bad_grammar_refuses_its_whole_batch(engine):
    with pytest.raises(InvalidRequest):
        engine.generate(prompt=["a", "b"], sampling_params=[{"regex": "[ab]"}, {"regex": "("}])
    assert not engine.core.has_work()


def test_at_most_one_constraint():
    with pytest.raises(InvalidRequest, match="at most one of regex, json_schema and ebnf"):
        SamplingParams.from_dict({"regex": "a", "json_schema": "{}"})
    with pytest.raises(InvalidRequest, match="sampling_params.regex: must be a string"):
        SamplingParams.from_dict({"regex": 5})


def test_grammar_backend_none_refuses_constraints(path):
    with Engine(path, grammar_backend="none") as e:
        with pytest.raises(InvalidRequest, match="--grammar-backend none"):
            e.generate(prompt="x", sampling_params={"regex": "a"})
        assert e.generate(prompt="x", sampling_params={"max_new_tokens": 2})["text"] is not None


def test_the_same_grammar_compiles_once(engine):
    regex = r"cache-[0-9]{2}"
    before = engine.stats()["grammar"]
    outs = _samples(engine, "id:", {"regex": regex}, seeds=range(3))
    engine.generate(prompt="id:", sampling_params={"regex": regex, "seed": 9})
    after = engine.stats()["grammar"]
    assert after["compiled"] == before["compiled"] + 1
    assert after["cache_hits"] == before["cache_hits"] + 3
    assert all(re.fullmatch(regex, o["text"]) for o in outs)


def test_a_request_waits_for_its_grammar_while_others_decode(path):
    """The compile is held on the worker thread: the free request decodes to the end, the
    constrained one is not admitted; once released, it runs and matches."""
    with Engine(path) as e:
        core = e.core
        release = threading.Event()
        compile_ = core.grammars._compile

        def slow(model, key):
            assert release.wait(30)
            return compile_(model, key)

        core.grammars._compile = slow
        free = core.add_request(EngineRequest("free", e.models[0], [5, 6, 7], SamplingParams(
            max_new_tokens=6, temperature=0, ignore_eos=True)))
        held = core.add_request(EngineRequest("held", e.models[0], [5, 6, 7], SamplingParams(
            regex="[0-9]{3}", temperature=0)))
        for _ in range(50):
            core.step()
            if free.finished:
                break
        assert free.finished and len(free.output_ids) == 6
        assert not held.finished and not held.output_ids and not held.sched.ready
        assert core.stats()["grammar"]["waiting"] == 1
        release.set()
        for _ in range(200):
            core.step()
            if held.finished:
                break
        assert held.finish_reason["type"] == "stop" and re.fullmatch("[0-9]{3}", held.text)
        assert core.stats()["grammar"]["waiting"] == 0


def test_a_grammar_that_fails_to_compile_ends_its_request(path):
    with Engine(path) as e:
        core = e.core

        def broken(model, key):
            raise RuntimeError("[12:00:00] /src/compiler.cc:1: out of luck")

        core.grammars._compile = broken
        state = core.add_request(EngineRequest("r", e.models[0], [5, 6], SamplingParams(
            regex="[0-9]")))
        done = []
        for _ in range(100):
            done += core.step()
            if state.finished:
                break
        assert state in done
        assert state.finish_reason == {
            "type": "abort", "message": "the grammar failed to compile: out of luck",
            "status_code": 400}
        assert not core.has_work()


def test_aborting_a_request_that_waits_for_its_grammar(path):
    with Engine(path) as e:
        core = e.core
        release = threading.Event()
        compile_ = core.grammars._compile
        core.grammars._compile = lambda m, k: release.wait(30) and compile_(m, k)
        core.add_request(EngineRequest("r", e.models[0], [5], SamplingParams(regex="[0-9]")))
        core.abort("r")
        release.set()
        assert not core.has_work() and not core.grammar_waiting


def test_ids_past_the_tokenizers_vocabulary_are_never_chosen(tmp_path):
    """The model's logits are wider than the tokenizer (padding rows): a grammar is compiled
    for the logits' width, and the padding rows are masked too, even where they score best."""
    path = make_model(tmp_path / "padded", "qwen3_moe", vocab_size=1088, seed=3)
    with Engine(str(path)) as e:
        width = e.config.models[0].spec.vocab_size
        tokenizer_vocab = len(e.tokenizer())
        assert tokenizer_vocab < width == 1088
        outs = _samples(e, "Number:", {"regex": "[0-9]{2,4}", "max_new_tokens": 8})
        for out in outs:
            assert all(t < tokenizer_vocab for t in out["output_ids"])
            assert re.fullmatch("[0-9]{2,4}", out["text"]), out["text"]
        key = GrammarKey("regex", "[0-9]+")
        grammar = RequestGrammar(e.core.grammars.compile(e.models[0], key))
        grammar.future.result(timeout=30)
        assert grammar.poll()
        logits = torch.zeros(3, width)
        logits[:, tokenizer_vocab:] = 1e4
        masked, allowed = mask_rows(logits, [1], [grammar])
        assert allowed == [True] and masked.shape == (1, width)
        assert torch.isinf(masked[0, tokenizer_vocab:]).all()
        digits = [i for i in range(tokenizer_vocab) if e.tokenizer().decode([i]).isdigit()]
        assert torch.isfinite(masked[0, digits]).all()
        assert torch.isfinite(masked[0]).sum() == len(digits)
        assert (logits[:, tokenizer_vocab:] == 1e4).all()  # the step's logits are untouched


def test_jump_forward_appends_forced_tokens_unsampled(path):
    """With --grammar-jump-forward the tokens a grammar forces (JSON keys, punctuation, the rest
    of an enum value) are appended without a step each: fewer steps, same guarantees."""
    schema = SCHEMAS["nested"]
    params = {"json_schema": json.dumps(schema), "max_new_tokens": 200}
    with Engine(path, constrained_json_disable_any_whitespace=True,
                grammar_jump_forward=True) as e:
        steps = [0]
        step = e.core.step

        def counted():
            steps[0] += 1
            return step()

        e.core.step = counted
        outs = _samples(e, "Give JSON:", params, seeds=range(4))
        tokens = max(o["meta_info"]["completion_tokens"] for o in outs)
        assert steps[0] < tokens / 2  # most of the JSON was forced
        for out in outs:
            assert _finish(out) == "stop", out
            jsonschema.validate(json.loads(out["text"]), schema)
        out = e.generate(prompt="Digits:", sampling_params={"regex": r"ab[0-9]{2}cd", "seed": 0})
        assert re.fullmatch(r"ab[0-9]{2}cd", out["text"])
        # Requests that want logprobs sample every token (each has its logprob).
        out = e.generate(prompt="Give JSON:", sampling_params={**params, "seed": 0},
                         return_logprob=True)
        lps = out["meta_info"]["output_token_logprobs"]
        assert [t for _, t, _ in lps] == out["output_ids"]
        jsonschema.validate(json.loads(out["text"]), schema)
        short = e.generate(prompt="Give JSON:", sampling_params={**params, "max_new_tokens": 7})
        assert short["meta_info"]["finish_reason"] == {"type": "length", "length": 7}
        assert short["meta_info"]["completion_tokens"] == 7


# -- the scheduler's `ready` flag (pure Python) --------------------------------------------------


class _KV:
    def block_tokens(self, model):
        return 4

    def max_blocks(self, model):
        return 100

    def can_alloc(self, model, n):
        return True

    def alloc_blocks(self, model, n):
        return list(range(n))

    def free_blocks(self, model, blocks):
        pass


def test_scheduler_passes_over_requests_that_are_not_ready():
    sched = GlobalScheduler(_KV(), ["m"], SchedulerLimits(8, 64))
    waiting = SchedReq("grammar", "m", [1, 2, 3], 4)
    waiting.ready = False
    sched.add(waiting)
    sched.add(SchedReq("free", "m", [1, 2], 4))
    batch = sched.schedule()
    assert [s.req.rid for s in batch.seqs] == ["free"]
    assert sched.has_work()
    waiting.ready = True
    batch = sched.schedule()
    assert sorted(s.req.rid for s in batch.seqs) == ["free", "grammar"]


def test_scheduler_with_only_unready_requests_schedules_nothing():
    sched = GlobalScheduler(_KV(), ["m"], SchedulerLimits(8, 64))
    req = SchedReq("grammar", "m", [1, 2, 3], 4)
    req.ready = False
    sched.add(req)
    assert sched.schedule() is None and sched.has_work()
    sched.abort("grammar")
    assert not sched.has_work()
