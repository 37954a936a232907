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
