"""Server messages and the scheduler loop: the serializer round-trips every message; the loop,
fed messages by a fake transport, drives a real EngineCore and its deltas rebuild exactly what
the engine produced; bad requests change nothing; an idle loop blocks instead of spinning.
"""

from __future__ import annotations

import pytest

from sglang_crosspool.engine.sampling_params import SamplingParams
from sglang_crosspool.server import messages as m
from sglang_crosspool.server.scheduler_loop import SchedulerLoop


def sample_messages():
    req = m.TokenizedRequest("r1", "a", [1, 2, 3], SamplingParams(max_new_tokens=4, stop=("x",)),
                             True, 0, 2)
    upd = m.RequestUpdate("r1", [5, 6], 0, "hi", 2, {"type": "stop", "matched": 6}, 1,
                          [(None, 1, None), (-1.5, 2, None)], [None, [(-0.1, 2, None)]],
                          [(-0.2, 5, None)], [[(-0.2, 5, None)]])
    return [m.AddRequests([req]), m.AbortRequest("r1", "bye"), m.AbortRequest(None, abort_all=True),
            m.ControlRequest(3, "stats"), m.Ready(12, ["a"], {"kv": {}}),
            m.AddResults(["r1"], "bad", 400), m.BatchOutput([upd], {"kv": {"used_pages": 0}}),
            m.ControlResult(3, {"ok": True}), m.SchedulerError("boom")]


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda x: type(x).__name__)
def test_serializer_round_trip(msg):
    data = m.dumps(msg)
    assert isinstance(data, bytes)
    assert m.loads(data) == msg


class FakeTransport:
    def __init__(self):
        self.inbox: list = []
        self.sent: list = []
        self.recv_timeouts: list = []

    def recv(self, timeout_ms):
        self.recv_timeouts.append(timeout_ms)
        return self.inbox.pop(0) if self.inbox else None

    def send(self, msg):
        self.sent.append(m.loads(m.dumps(msg)))  # through the wire format, as in production


@pytest.fixture
def loop(tiny_models):
    from sglang_crosspool.config import EngineConfig
    from sglang_crosspool.engine.core import EngineCore

    cfg = EngineConfig.build([tiny_models["qwen3_moe"], tiny_models["mixtral"]],
                             served_model_name=["a", "b"])
    core = EngineCore(cfg)
    yield SchedulerLoop(core, FakeTransport())
    core.shutdown()


def run_until_idle(loop, limit=500):
    for _ in range(limit):
        loop.run_once()
        if not loop.core.has_work() and not loop.transport.inbox:
            return
    raise AssertionError("the loop did not finish")


def updates(loop):
    return [u for msg in loop.transport.sent if isinstance(msg, m.BatchOutput)
            for u in msg.updates]


def test_deltas_rebuild_the_engine_result(loop, tiny_models):
    params = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    reqs = [m.TokenizedRequest("x", "a", [5, 6, 7, 8], params, True, 0, 2),
            m.TokenizedRequest("y", "b", [9, 10], params)]
    loop.transport.inbox.append(m.AddRequests(reqs))
    run_until_idle(loop)
    assert isinstance(loop.transport.sent[0], m.AddResults)
    assert loop.transport.sent[0].error is None
    rebuilt = {}
    for u in updates(loop):
        r = rebuilt.setdefault(u.rid, {"ids": [], "text": "", "in": [], "out": [], "fin": None})
        r["ids"] += u.new_ids
        r["text"] = r["text"][: u.text_offset] + u.text_delta
        r["in"] += u.input_token_logprobs
        r["out"] += u.output_token_logprobs
        r["fin"] = u.finish_reason
        assert u.completion_tokens == len(r["ids"])
    from sglang_crosspool import Engine

    with Engine([tiny_models["qwen3_moe"]], served_model_name=["a"]) as engine:
        ref = engine.generate(input_ids=[5, 6, 7, 8], sampling_params={
            "max_new_tokens": 10, "temperature": 0.0, "ignore_eos": True},
            return_logprob=True, logprob_start_len=0, top_logprobs_num=2)
    x = rebuilt["x"]
    assert x["ids"] == ref["output_ids"] and x["text"] == ref["text"]
    assert x["fin"] == {"type": "length", "length": 10}
    assert [e[1] for e in x["in"]] == [5, 6, 7, 8] and x["in"][0][0] is None
    assert [e[1] for e in x["out"]] == ref["output_ids"]
    assert len(rebuilt["y"]["ids"]) == 10
    last = loop.transport.sent[-1]
    assert last.stats["kv"]["used_pages"] == 0  # stats after the final step: all freed


def test_stop_string_cut_is_sent_as_an_offset(loop):
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    loop.transport.inbox.append(m.AddRequests([m.TokenizedRequest("s", "a", [5, 6], params)]))
    run_until_idle(loop)
    full = "".join(u.text_delta for u in updates(loop))
    stop = full[4:6]
    loop.transport.sent.clear()
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, stop=(stop,))
    loop.transport.inbox.append(m.AddRequests([m.TokenizedRequest("t", "a", [5, 6], params)]))
    run_until_idle(loop)
    text = ""
    for u in updates(loop):
        text = text[: u.text_offset] + u.text_delta
    assert text == full[: full.index(stop)]
    assert updates(loop)[-1].finish_reason == {"type": "stop", "matched": stop}


def test_bad_batch_changes_nothing(loop):
    good = m.TokenizedRequest("g", "a", [1, 2], SamplingParams(max_new_tokens=2))
    bad = m.TokenizedRequest("h", "a", [1, 10**6], SamplingParams(max_new_tokens=2))
    loop.transport.inbox.append(m.AddRequests([good, bad]))
    loop.run_once()
    result = loop.transport.sent[0]
    assert isinstance(result, m.AddResults) and "input_ids" in result.error
    assert result.status == 400
    assert not loop.core.has_work() and loop.states == {}
    unknown = m.TokenizedRequest("u", "zzz", [1], SamplingParams())
    loop.transport.inbox.append(m.AddRequests([unknown]))
    loop.run_once()
    assert "not served" in loop.transport.sent[-1].error


def test_abort_and_control(loop):
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    loop.transport.inbox.append(m.AddRequests([m.TokenizedRequest("k", "b", [3, 4], params)]))
    loop.run_once()
    loop.run_once()
    assert loop.core.stats()["kv"]["used_pages"] > 0
    loop.transport.inbox += [m.ControlRequest(1, "flush_cache"), m.AbortRequest("k", "stop it"),
                             m.ControlRequest(2, "stats"), m.ControlRequest(3, "flush_cache")]
    loop.run_once()
    sent = loop.transport.sent
    controls = {c.cid: c.result for c in sent if isinstance(c, m.ControlResult)}
    assert controls[1]["success"] is False  # busy
    assert controls[3]["success"] is True
    assert controls[2]["in_flight"] == 0 and controls[2]["kv"]["used_pages"] == 0
    final = updates(loop)[-1]
    assert final.rid == "k" and final.finish_reason == {"type": "abort", "message": "stop it"}
    assert sent[-1].stats["kv"]["used_pages"] == 0


def test_idle_loop_blocks_on_the_transport(loop):
    loop.transport.recv_timeouts.clear()
    for _ in range(3):
        loop.run_once()
    assert loop.transport.recv_timeouts == [1000, 1000, 1000]  # a blocking wait, not a spin
    assert loop.transport.sent == []
