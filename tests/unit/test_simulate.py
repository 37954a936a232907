"""benchmark/simulate.py: the replay's accounting on hand-computable cases, preemption when KV
runs out, determinism, and the cost model's fit against the committed GPU figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from crosspool_scheduler import GlobalScheduler, SchedulerLimits

from benchmark import simulate
from benchmark.sim_costs import CostModel, Placement, Shape

REPO = Path(__file__).resolve().parents[2]
FLEET = REPO / "benchmark" / "results" / "fleet-2xh200"


class FixedCost:
    """Steps cost `decode` seconds when every sequence computes one token, else `prefill`."""

    def __init__(self, decode: float, prefill: float):
        self.decode, self.prefill = decode, prefill

    def step(self, shape, batch, place) -> float:
        return self.decode if batch.decode_only else self.prefill

    def vmm(self, mapped: int, unmapped: int) -> float:
        return 0.0


def one_worker(pages: int, block_tokens: int = 4, running: int = 8) -> simulate.Layout:
    kv = simulate.SimKV({0: pages})
    kv.add("a", (0,), block_tokens, 1, virtual_blocks=pages)
    shape = Shape("a", "olmoe", 1, 1, 8, 1, 8, 2, 1, 0, 0, 0, 0, 0)
    w = simulate.Worker("w", (0,), kv, keys={"a": (shape, Placement())})
    w.sched = GlobalScheduler(kv, ["a"], SchedulerLimits(running, 512))
    return simulate.Layout("monolithic", [w], {"a": [(w, "a")]}, {"a": 10_000})


def rec(i: int, t: float, prompt: int, output: int) -> dict:
    return {"id": i, "t": t, "model": "a", "prompt_len": prompt, "output_len": output}


def test_two_requests_known_ttft_and_tbt():
    trace = [rec(0, 0.0, 4, 3), rec(1, 0.0, 4, 3), rec(2, 0.5, 4, 1)]
    res = simulate.replay(one_worker(100), trace, FixedCost(decode=0.1, prefill=1.0))
    r0, r1, r2 = res["records"]
    # step 1 [0, 1.0): both prompts (one batch); step 2 [1.0, 2.0): their decodes and r2's
    # prompt, a mixed step at the prefill cost; step 3 [2.0, 2.1): the last decodes.
    assert r0["ttft"] == pytest.approx(1.0) and r1["ttft"] == pytest.approx(1.0)
    assert r0["gaps"] == pytest.approx([1.0, 0.1]) and r1["gaps"] == pytest.approx([1.0, 0.1])
    assert r2["ttft"] == pytest.approx(1.5) and r2["gaps"] == []
    assert all(r["ok"] and r["completion_tokens"] in (3, 1) for r in res["records"])
    assert res["duration"] == pytest.approx(2.1)
    assert res["workers"][0]["steps"] == 3
    assert res["workers"][0]["busy_s"] == pytest.approx(2.1)
    s = simulate.summarize(res, slo_ttft=1.2, slo_tbt=None)
    assert s["goodput_requests"] == 2 and s["preempted"] == 0


def test_preemption_when_kv_runs_out_and_everything_completes():
    # 3 pages of 4 tokens: two requests of 4 + 6 tokens fit alone (3 blocks) but not together.
    layout = one_worker(3)
    trace = [rec(0, 0.0, 4, 6), rec(1, 0.0, 4, 6)]
    res = simulate.replay(layout, trace, FixedCost(decode=0.01, prefill=0.1))
    s = simulate.summarize(res, None, None)
    assert s["preempted"] >= 1
    assert s["completed"] == 2 and s["rejected"] == 0
    assert res["records"][1]["retractions"] >= 1  # the newer request is the one retracted
    assert res["kv_pages_peak"] <= 3
    assert layout.workers[0].kv.used_pages == 0  # everything freed at the end


class TokenCost(FixedCost):
    """A step costs 1 ms per token computed (so a cached prefix saves time)."""

    def step(self, shape, batch, place) -> float:
        return 1e-3 * sum(batch.tokens)


def test_a_replayed_prompt_hits_the_prefix_cache():
    layout = one_worker(100)
    for w in layout.workers:
        w.sched = GlobalScheduler(w.kv, ["a"], SchedulerLimits(8, 512),
                                  cache=simulate.PrefixCache(w.kv, ["a"]))
    trace = [dict(rec(0, 0.0, 40, 2), prompt_seed=7)]
    first = simulate.replay(layout, trace, TokenCost(0, 0), tag="one/")
    again = simulate.replay(layout, [dict(trace[0], t=10.0)], TokenCost(0, 0), tag="two/")
    assert first["records"][0]["cached_tokens"] == 0
    assert again["records"][0]["cached_tokens"] == 36  # whole 4-token blocks, not the last token
    assert first["records"][0]["ttft"] == pytest.approx(0.040)
    assert again["records"][0]["ttft"] == pytest.approx(0.004)
    assert simulate._pages_in_use(layout) == 0  # cached pages left are evictable: free


def test_refusals_too_long_and_unknown_model():
    trace = [rec(0, 0.0, 20_000, 4), dict(rec(1, 0.0, 4, 4), model="nope"), rec(2, 0.0, 4, 2)]
    res = simulate.replay(one_worker(100), trace, FixedCost(0.01, 0.1))
    s = simulate.summarize(res, None, None)
    assert s["rejected"] == 2 and s["completed"] == 1


@pytest.mark.skipif(not (FLEET / "plan.json").exists(), reason="fleet results not present")
def test_fleet_plan_layout_and_determinism():
    from sglang_crosspool.planner import load_plan

    plan = load_plan(FLEET / "plan.json")
    limits = SchedulerLimits(32, 2048)
    mono = simulate.build_layout(plan, "monolithic", limits)
    cross = simulate.build_layout(plan, "crosspool", limits)
    assert sorted(len(w.keys) for w in mono.workers) == [2, 3]
    assert len(cross.workers) == 1 and len(cross.workers[0].keys) == 5
    trace = [json.loads(x) for x in (FLEET / "crosspool" / "burst.jsonl").read_text().split("\n")
             if x.strip()][:10]
    cost = CostModel(graph_max_bs=16)
    a = simulate.run_modes(plan, trace, cost, limits, ["monolithic", "crosspool"], 2.0, 0.1)
    b = simulate.run_modes(plan, trace, cost, limits, ["monolithic", "crosspool"], 2.0, 0.1)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert a["crosspool"]["summary"]["completed"] == 10


def test_decode_fit_stays_close_to_the_measured_cells():
    fit = CostModel().fit
    assert all(abs(c["error"]) < 0.15 for c in fit["cells"])
    assert 2e12 < fit["bw_w"] < 5e12  # H200 HBM is 4.2-4.3 TB/s measured


def test_no_torch_at_run_time():
    code = ("import sys; import benchmark.simulate; from benchmark.sim_costs import CostModel; "
            "CostModel(); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'scheduler'}"})


def test_pair_graph_step_overlaps_two_models():
    from benchmark.sim_costs import StepBatch, shapes_from_configs

    cost = CostModel(graph_max_bs=16)
    shapes = shapes_from_configs()
    place = Placement(crosspool=True)
    batch = StepBatch((1,) * 4, (1024,) * 4)
    qwen3, olmoe = shapes["qwen3_moe"], shapes["olmoe"]
    alone = [cost.step(s, batch, place) for s in (qwen3, olmoe)]
    pair = cost.pair_step(qwen3, batch, place, olmoe, batch, place)
    assert max(alone) < pair < sum(alone)
    assert not cost.pair_fits(batch, StepBatch((8,), (1024,)))  # a prefill: no pair graph


@pytest.mark.skipif(not (FLEET / "plan.json").exists(), reason="fleet results not present")
def test_pipeline_models_takes_two_models_a_step():
    from sglang_crosspool.planner import load_plan

    plan = load_plan(FLEET / "plan.json")
    trace = [json.loads(x) for x in (FLEET / "crosspool" / "burst.jsonl").read_text().split("\n")
             if x.strip()]
    cost, limits = CostModel(graph_max_bs=16), SchedulerLimits(32, 2048)
    one = simulate.simulate(plan, "crosspool", trace, cost, limits)
    two = simulate.simulate(plan, "crosspool", trace, cost, limits, pipeline_models=True)
    assert two["workers"][0]["steps"] < one["workers"][0]["steps"]
    assert simulate.summarize(two, None, None)["tbt_p50"] < \
        simulate.summarize(one, None, None)["tbt_p50"]


HEADLINE = REPO / "benchmark" / "results" / "headline-2xh200-partial"


@pytest.mark.skipif(not (HEADLINE / "crosspool-files" / "balanced.jsonl").exists(),
                    reason="headline results not present")
def test_trace_mapping_matches_the_gpu_runs_mapped_trace():
    from benchmark.trace import clamp, read_trace
    from sglang_crosspool.planner import load_plan

    plan = load_plan(HEADLINE / "plan.json")
    ours = simulate.map_models(read_trace(HEADLINE / "balanced.jsonl"),
                               [m.name for m in plan.models])
    theirs = read_trace(HEADLINE / "crosspool-files" / "balanced.jsonl")  # fleet_gpu_run's
    context = {m.name: m.max_position_embeddings for m in plan.models}
    for a, b in zip(ours, theirs, strict=True):
        assert a["model"] == b["model"]
        assert clamp(a["prompt_len"], a["output_len"], context[a["model"]] - 1, None) == \
            (b["prompt_len"], b["output_len"])
