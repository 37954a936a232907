"""`launch --plan plan.json`: the plan's models, FFN servers, placement and KV pages reach the
engine, and the engine serves the same tokens as without a plan."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sglang_crosspool.engine.core import EngineCore
from sglang_crosspool.server_args import ServerArgs, ServerArgsError


@pytest.fixture(scope="module")
def plan_file(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    subprocess.run([sys.executable, "-m", "sglang_crosspool.plan",
                    "--model-path", tiny_models["qwen2_moe"], "--model-path", tiny_models["olmoe"],
                    "--devices", "3", "--device-memory", "64MB", "--out", str(out), "--brief"],
                   check=True, capture_output=True)
    return out


def generate(config, model: str) -> list[int]:
    from sglang_crosspool.engine.request import EngineRequest
    from sglang_crosspool.engine.sampling_params import SamplingParams

    core = EngineCore(config)
    params = SamplingParams.from_dict({"max_new_tokens": 8, "temperature": 0, "ignore_eos": True})
    state = core.add_request(EngineRequest("r", model, [4, 5, 6, 7], params))
    while not state.finished:
        core.step()
    core.shutdown()
    return state.output_ids


def test_plan_sets_models_servers_placement_and_pages(plan_file):
    plan = json.loads(plan_file.read_text())["crosspool"]
    args = ServerArgs.from_cli(["--plan", str(plan_file), "--pipeline-microbatches", "2"])
    assert args.pool_mode == "crosspool"
    assert args.model_names == list(plan["served"])
    assert args.ffn_servers == len(plan["weights_devices"])
    kv_device = next(d for d in plan["devices"] if d["index"] in plan["kv_devices"])
    assert args.kv_pages == kv_device["kv_pages"]["value"]
    config = args.engine_config()
    placement = dict(config.ffn_placement)
    for model in plan["placement"]["models"]:
        assert [list(e) for e in placement[model["name"]]] == model["experts"]
    assert config.pipeline_microbatches == 2


def test_planned_engine_matches_the_default_engine(plan_file, tiny_models):
    planned = ServerArgs.from_cli(["--plan", str(plan_file)]).engine_config()
    default = ServerArgs.from_cli(["--model", f"olmoe={tiny_models['olmoe']}"]).engine_config()
    assert generate(planned, "olmoe") == generate(default, "olmoe")


def test_plan_errors_name_the_flag(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit):
        ServerArgs.from_cli(["--plan", str(bad)])
    from sglang_crosspool.server_args import build_parser

    a = build_parser().parse_args(["--plan", str(bad)])
    with pytest.raises(ServerArgsError, match="--plan"):
        ServerArgs.from_namespace(a)


class _FakeGPU:
    total_memory = 64 << 20


@pytest.mark.parametrize("mode", ["monolithic", "crosspool"])
def test_gpus_without_a_plan_get_one_made_at_start_up(tiny_models, monkeypatch, mode):
    """--devices cuda:0,cuda:1 without --plan: the planner lays the GPUs out (here two
    stand-in GPUs of 64 MB), exactly as the same plan given with --plan would."""
    import torch

    from sglang_crosspool.planner import load_plan

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _FakeGPU())
    flags = ["--model", f"a={tiny_models['qwen2_moe']}", "--model", f"b={tiny_models['olmoe']}",
             "--devices", "cuda:0,cuda:1", "--pool-mode", mode, "--kv-page-bytes", "4096"]
    args = ServerArgs.from_cli(flags)
    plan = load_plan(args.plan_path).mode(mode)
    assert plan.served == ("a", "b")
    if mode == "crosspool":  # one KV-pool GPU for both models, the experts on the other
        assert args.devices == ("cuda:0",) and args.ffn_device == "cuda:1"
        assert args.device_models == (("a", "b"),)
        assert args.ffn_placement is not None
    else:  # each model whole on one GPU, each GPU its own pool
        assert args.devices == ("cuda:0", "cuda:1")
        assert sorted(m for names in args.device_models for m in names) == ["a", "b"]
        assert args.device_kv_pages == tuple(int(d.kv_pages) for d in plan.devices)


def test_models_a_plan_leaves_out_are_refused(tiny_models, tmp_path):
    out = tmp_path / "plan.json"
    subprocess.run([sys.executable, "-m", "sglang_crosspool.plan", "--model-path",
                    tiny_models["qwen2_moe"], "--served-model-name", "a", "--devices", "2",
                    "--device-memory", "64MB", "--kv-page-bytes", "4096", "--out", str(out)],
                   check=True, capture_output=True)
    with pytest.raises(SystemExit):
        ServerArgs.from_cli(["--plan", str(out), "--pool-mode", "monolithic", "--devices",
                             "cpu,cpu", "--model", f"a={tiny_models['qwen2_moe']}",
                             "--model", f"b={tiny_models['olmoe']}"])
    from sglang_crosspool.server_args import build_parser

    a = build_parser().parse_args(["--plan", str(out), "--pool-mode", "monolithic",
                                   "--devices", "cpu,cpu",
                                   "--model", f"a={tiny_models['qwen2_moe']}",
                                   "--model", f"b={tiny_models['olmoe']}"])
    with pytest.raises(ServerArgsError, match="does not place model.*b"):
        ServerArgs.from_namespace(a)


def test_the_plan_sets_prefix_cache_floors_from_cached_prefix(tiny_models, tmp_path):
    """A traffic file's cached_prefix becomes the model's prefix-cache floor: whole blocks'
    pages in the plan, with its arithmetic, and the engine's floor through launch --plan."""
    from sglang_crosspool.planner import load_plan

    traffic = tmp_path / "traffic.json"
    traffic.write_text('{"a": {"cached_prefix": 100, "max_context": 512, "mean_context": 256}}')
    out = tmp_path / "plan.json"
    subprocess.run([sys.executable, "-m", "sglang_crosspool.plan", "--model-path",
                    tiny_models["qwen2_moe"], "--served-model-name", "a", "--model-path",
                    tiny_models["olmoe"], "--served-model-name", "b", "--devices", "2",
                    "--device-memory", "64MB", "--kv-page-bytes", "4096",
                    "--traffic", str(traffic), "--out", str(out)],
                   check=True, capture_output=True)
    row = load_plan(out).crosspool.model("a")
    blocks = 100 // int(row.block_tokens)
    assert blocks >= 1  # the tiny model's blocks are small enough to keep some
    assert int(row.cache_floor_pages) == blocks * int(row.pages_per_block)
    assert "100 cached_prefix tokens" in row.cache_floor_pages.how
    assert int(load_plan(out).crosspool.model("b").cache_floor_pages) == 0
    config = ServerArgs.from_cli(["--plan", str(out)]).engine_config()
    assert dict(config.radix_cache_floor_pages) == {"a": int(row.cache_floor_pages)}
    # A flag overrides the plan's; an unknown name is refused.
    config = ServerArgs.from_cli(["--plan", str(out), "--radix-cache-floor", "b=3"]) \
        .engine_config()
    assert dict(config.radix_cache_floor_pages) == {"b": 3}
    with pytest.raises(SystemExit):
        ServerArgs.from_cli(["--plan", str(out), "--radix-cache-floor", "nope=3"])
