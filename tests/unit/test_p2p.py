"""The p2p crossing's protocol on CPU: the shared-memory twin of the GPU path runs the same
buffers, flags, counters, step plans and server loop (transport/p2p.py, ffn/p2p_server.py)."""

from __future__ import annotations

import math
import time

import pytest
from crosspool_scheduler.pipeline import SUBMIT, layer_pipeline

from sglang_crosspool import Engine
from sglang_crosspool.engine.request import EngineRequest
from sglang_crosspool.engine.sampling_params import SamplingParams
from sglang_crosspool.ffn.p2p_executor import P2PFFNExecutor, P2PProtocolError
from sglang_crosspool.transport.errors import FFNServerError
from sglang_crosspool.models.common import Routing
from sglang_crosspool.testing.faults import failed_cleanly, kill_ffn_server_mid_run
from sglang_crosspool.testing.multimodel import GREEDY, PROMPTS, run_all
from sglang_crosspool.transport import messages as m
from sglang_crosspool.transport.links import P2PLink
from sglang_crosspool.transport.p2p import P2PLayout, crossing_order

def test_layout_sections_are_aligned_and_disjoint():
    layout = P2PLayout(servers=3, slots=2, max_tokens=17, hidden=40, max_top_k=4,
                       dtype="bfloat16")
    spans = []
    for name, (offset, size, shape, dtype) in layout.sections().items():
        assert size == dtype.itemsize * math.prod(shape), name
        assert offset % 256 == 0, name
        spans.append((offset, offset + size))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert layout.nbytes == spans[-1][1]


def test_both_sides_cross_in_the_pipeline_order():
    order = list(crossing_order((3, 1, 2)))
    assert order == [(op.mb, op.layer) for op in layer_pipeline([3, 1, 2]) if op.kind == SUBMIT]
    assert sorted(order) == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1)]


@pytest.mark.parametrize("servers, microbatches", [(1, 1), (2, 2), (3, 2)])
def test_p2p_servers_match_monolithic_and_hold_only_ffn(arch_paths, monolithic_reference, servers,
                                                        microbatches):
    outputs, stats = run_all(arch_paths, pool_mode="crosspool", ffn_transport="p2p",
                             ffn_servers=servers, pipeline_microbatches=microbatches)
    assert outputs == monolithic_reference[0]
    assert stats["ffn_bytes_here"] == 0
    per_server = stats["ffn_bytes_per_server"]
    assert len(per_server) == servers and all(b > 0 for b in per_server)
    assert sum(per_server) == monolithic_reference[1]["ffn_bytes_here"]
    assert stats["kv"]["used_pages"] == 0


def test_one_message_per_server_per_step_whatever_the_layer_count(tiny_models, monkeypatch):
    sent = []
    original = P2PLink.step
    monkeypatch.setattr(P2PLink, "step", lambda self, msg: (sent.append(msg),
                                                            original(self, msg))[1])
    engine = Engine(tiny_models["qwen3_moe"], pool_mode="crosspool", ffn_transport="p2p",
                    ffn_servers=2)
    try:
        layers = engine.core.config.models[0].spec.num_layers
        assert layers >= 2
        steps = 0
        core = engine.core
        params = SamplingParams.from_dict(GREEDY)
        for i, prompt in enumerate(PROMPTS):
            core.add_request(EngineRequest(f"r{i}", "qwen3_moe", prompt, params))
        while core.has_work():
            core.step()
            steps += 1
        assert steps > 1
        assert all(isinstance(msg, m.Step) for msg in sent)
        assert len(sent) == 2 * steps  # not 2 * steps * layers
    finally:
        engine.shutdown()


def test_crossings_off_the_plan_are_caught_and_break_the_link(tiny_models):
    import torch

    engine = Engine(tiny_models["olmoe"], pool_mode="crosspool", ffn_transport="p2p")
    try:
        ex = engine.core.ffn
        assert isinstance(ex, P2PFFNExecutor)
        spec = engine.core.config.models[0].spec
        h = torch.zeros(2, spec.hidden_size)
        routing = Routing(torch.zeros(2, spec.top_k, dtype=torch.int64),
                          torch.zeros(2, spec.top_k))
        ex.begin_step([("olmoe", 2)])
        with pytest.raises(P2PProtocolError, match="plan's next is olmoe:0"):
            ex.submit("olmoe", 1, h, routing)
        # That step stopped midway: the servers are out of step, so the link is given up.
        with pytest.raises(FFNServerError, match="stopped midway"):
            ex.begin_step([("olmoe", 2)])
        with pytest.raises(FFNServerError, match="stopped midway"):
            ex.begin_step([("olmoe", 2)])
        assert ex.failure()
    finally:
        engine.shutdown()


def test_killed_p2p_server_ends_requests_within_seconds_and_refuses_new_ones(tiny_models):
    engine = Engine(tiny_models["qwen2_moe"], pool_mode="crosspool", ffn_servers=2,
                    ffn_transport="p2p")
    core = engine.core
    try:
        start = time.monotonic()
        states = kill_ffn_server_mid_run(core, "qwen2_moe", server=1)
        assert time.monotonic() - start < 8  # the watchdog, not the 20 s wait bound
        assert failed_cleanly(core, states, "qwen2_moe", server=1) == []
    finally:
        engine.shutdown()
