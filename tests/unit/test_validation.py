"""No request can kill the engine: numeric fields are range-checked with errors naming the
field, a request that fails in a step ends alone with an error, and an exception escaping a step
ends the requests in flight while the scheduler loop serves on.
"""

from __future__ import annotations

import math

import pytest

from sglang_crosspool import Engine
from sglang_crosspool.engine import core as core_module
from sglang_crosspool.engine.request import EngineRequest
from sglang_crosspool.engine.sampling_params import InvalidRequest, SamplingParams
from sglang_crosspool.server.messages import AddRequests, AddResults, BatchOutput
from sglang_crosspool.server.sampling import engine_params

BAD = [
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": math.nan}, "top_p"),
    ({"repetition_penalty": 1e-45}, "repetition_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"frequency_penalty": math.inf}, "frequency_penalty"),
    ({"presence_penalty": -math.inf}, "presence_penalty"),
    ({"min_p": math.nan}, "min_p"),
]


@pytest.mark.parametrize("params,field", BAD, ids=[f"{f}={p[f]}" for p, f in BAD])
def test_bad_numbers_are_refused_by_name(params, field):
    with pytest.raises(InvalidRequest, match=f"sampling_params.{field}:"):
        SamplingParams.from_dict(params)


def test_seeds_fit_64_bits_and_n_samples_wrap():
    top = SamplingParams.from_dict({"seed": 2**64 - 1, "n": 3})
    assert [top.for_sample(k).seed for k in range(3)] == [2**64 - 1, 0, 1]
    assert SamplingParams.from_dict({"seed": -1}).seed == 2**64 - 1  # int64 as uint64
    assert SamplingParams.from_dict({"seed": 7}).for_sample(0).seed == 7


def test_tiny_temperature_is_greedy():
    assert SamplingParams.from_dict({"temperature": 1e-40}).greedy
    assert not SamplingParams.from_dict({"temperature": 0.5}).greedy


def test_n_is_bounded():
    assert engine_params({"n": 4}, max_n=4).n == 4
    with pytest.raises(InvalidRequest, match=r"sampling_params\.n: .*--max-n"):
        engine_params({"n": 100_000}, max_n=4)


def test_extreme_values_generate_or_are_refused(tiny_models):
    """What used to kill the scheduler: each is refused up front or generates normally."""
    engine = Engine(tiny_models["qwen3_moe"])
    for params in ({"temperature": 1e-40}, {"repetition_penalty": 1e-6, "temperature": 1e-5},
                   {"repetition_penalty": 1e6, "frequency_penalty": 2, "presence_penalty": -2},
                   {"seed": 2**64 - 1, "n": 2}, {"seed": -(2**63)}):
        out = engine.generate(input_ids=[[3, 4, 5]], sampling_params=dict(
            params, max_new_tokens=4, ignore_eos=True))
        assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in out), params


def _greedy(rid: str, seed: int | None = None) -> EngineRequest:
    params = SamplingParams.from_dict({"max_new_tokens": 6, "ignore_eos": True,
                                       "temperature": 0, "seed": seed})
    return EngineRequest(rid, "m", [5, 6, 7], params)


def _run(core) -> None:
    while core.has_work():
        core.step()


def test_a_request_failing_in_sampling_ends_alone(tiny_models, monkeypatch):
    engine = Engine(tiny_models["olmoe"], served_model_name="m")
    core = engine.core
    clean = [core.add_request(_greedy(f"clean-{i}")) for i in range(2)]
    _run(core)
    real_choose = core_module.choose

    def choose(row, sampling, generator):
        if sampling.params.seed == 666 and len(sampling.output_counts) == 0:
            raise RuntimeError("probability tensor contains nan")
        return real_choose(row, sampling, generator)

    monkeypatch.setattr(core_module, "choose", choose)
    states = [core.add_request(_greedy("ok-0")), core.add_request(_greedy("bad", seed=666)),
              core.add_request(_greedy("ok-1"))]
    _run(core)
    ok0, bad, ok1 = states
    assert bad.finish_reason["type"] == "abort" and bad.finish_reason["status_code"] == 500
    assert "nan" in bad.finish_reason["message"]
    for s, c in ((ok0, clean[0]), (ok1, clean[1])):
        assert s.finish_reason["type"] == "length"
        assert s.output_ids == c.output_ids
    assert core.kv_pool.stats()["used_pages"] == 0
    assert core.unavailable is None


class _Transport:
    def __init__(self):
        self.inbox: list = []
        self.sent: list = []

    def recv(self, timeout_ms):
        return self.inbox.pop(0) if self.inbox else None

    def send(self, msg) -> None:
        self.sent.append(msg)


def test_an_exception_escaping_the_step_ends_requests_in_flight_not_the_loop(tiny_models,
                                                                             monkeypatch):
    from sglang_crosspool.server.messages import TokenizedRequest
    from sglang_crosspool.server.scheduler_loop import SchedulerLoop

    engine = Engine(tiny_models["olmoe"], served_model_name="m")
    transport = _Transport()
    loop = SchedulerLoop(engine.core, transport)

    def add(rid):
        r = _greedy(rid)
        transport.inbox.append(AddRequests([TokenizedRequest(rid, "m", r.input_ids, r.params)]))

    def finishes() -> dict:
        out = {}
        for msg in transport.sent:
            if isinstance(msg, BatchOutput):
                out.update({u.rid: u.finish_reason for u in msg.updates if u.finish_reason})
        return out

    real_step = engine.core.step
    monkeypatch.setattr(engine.core, "step", lambda: 1 / 0)
    add("doomed")
    loop.run_once()
    assert [m.error for m in transport.sent if isinstance(m, AddResults)] == [None]
    reason = finishes()["doomed"]
    assert reason["type"] == "abort" and reason["status_code"] == 500
    assert "ZeroDivisionError" in reason["message"]
    assert engine.core.kv_pool.stats()["used_pages"] == 0
    monkeypatch.setattr(engine.core, "step", real_step)
    add("fine")
    for _ in range(20):
        loop.run_once()
    assert finishes()["fine"]["type"] == "length"
    assert not loop.states


def test_a_failing_handler_answers_with_an_error(tiny_models, monkeypatch):
    from sglang_crosspool.server.messages import ControlRequest, ControlResult
    from sglang_crosspool.server.scheduler_loop import SchedulerLoop

    engine = Engine(tiny_models["olmoe"], served_model_name="m")
    transport = _Transport()
    loop = SchedulerLoop(engine.core, transport)
    monkeypatch.setattr(engine.core, "stats", lambda: {}["boom"])
    transport.inbox.append(ControlRequest(1, "stats"))
    loop.run_once()
    result = next(m for m in transport.sent if isinstance(m, ControlResult)).result
    assert "KeyError" in result["error"]
    monkeypatch.undo()
    transport.inbox.append(ControlRequest(2, "health"))
    loop.run_once()
    assert [m for m in transport.sent if isinstance(m, ControlResult)][-1].result == {
        "unavailable": None}


# -- request bodies --------------------------------------------------------------------------


@pytest.mark.parametrize("raw,words", [
    (b'{"text": "\\ud800"}', ["lone surrogate", "ud800"]),
    (b'{"text": ["a", "b\\udfff"]}', ["lone surrogate"]),
    (b'{"\\ud801": 1}', ["lone surrogate"]),
    (b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ["nests too deep"]),
    (b'{"text": "\xff"}', ["not valid JSON"]),
])
def test_bad_bodies_are_400(raw, words):
    pytest.importorskip("fastapi")
    from sglang_crosspool.server.http_server import parse_json_body
    from sglang_crosspool.server.request_manager import ApiError

    with pytest.raises(ApiError) as e:
        parse_json_body(raw)
    assert e.value.status == 400
    for word in words:
        assert word in e.value.message


def test_surrogate_pairs_are_fine():
    pytest.importorskip("fastapi")
    from sglang_crosspool.server.http_server import parse_json_body

    assert parse_json_body(b'{"text": "\\ud83d\\ude00 \\\\ud800"}') == {
        "text": "\U0001f600 \\ud800"}
