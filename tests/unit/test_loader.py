"""Checkpoint loading: layouts, shards, config spellings, clear errors, and the model split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sglang_crosspool import Engine
from sglang_crosspool.models.checkpoint import CheckpointFiles
from sglang_crosspool.models.common import Routing
from sglang_crosspool.models.config import CheckpointError
from sglang_crosspool.models.registry import resolve
from sglang_crosspool.testing.checkpoints import ARCHS, make_model

GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
PROMPTS = [[1, 2, 3, 4], list(range(40, 60))]


def outputs(path) -> list[list[int]]:
    return [o["output_ids"] for o in Engine(str(path)).generate(input_ids=PROMPTS,
                                                                  sampling_params=GREEDY)]


@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_and_fused_layouts_give_the_same_tokens(arch, tiny_models, tmp_path):
    reference = outputs(tiny_models[arch])
    sharded = make_model(tmp_path / "sharded", arch, seed=1, num_shards=3)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) == 3
    assert (sharded / "model.safetensors.index.json").exists()
    assert outputs(sharded) == reference
    fused = make_model(tmp_path / "fused", arch, seed=1, expert_layout="fused")
    assert any(k.endswith("experts.gate_up_proj") for k in CheckpointFiles(fused).keys())
    assert outputs(fused) == reference


def _edit_config(src: str, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_both_spellings_of_renamed_fields(tiny_models, tmp_path):
    src = tiny_models["qwen3_moe"]
    spec, _ = resolve(src)

    def old_style(cfg):
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        # Swap whichever spelling the file has for the other one.
        if "num_experts" in cfg:
            cfg["num_local_experts"] = cfg.pop("num_experts")
        else:
            cfg["num_experts"] = cfg.pop("num_local_experts")

    old = _edit_config(src, tmp_path / "old", old_style)
    before = json.loads((Path(src) / "config.json").read_text())
    after = json.loads((old / "config.json").read_text())
    assert ("num_experts" in before) != ("num_experts" in after)
    old_spec, _ = resolve(old)
    assert old_spec.rope_theta == spec.rope_theta
    assert old_spec.num_experts == spec.num_experts
    assert outputs(old) == outputs(src)


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda c: c.update(model_type="llama4"), "model_type"),
        (lambda c: c.pop("hidden_size"), "hidden_size"),
        (lambda c: c.update(num_experts_per_tok="two"), "num_experts_per_tok"),
        (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads"),
        (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type"),
    ],
)
def test_malformed_config_names_file_and_field(tiny_models, tmp_path, edit, field):
    bad = _edit_config(tiny_models["qwen3_moe"], tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as err:
        Engine(str(bad))
    assert "config.json" in str(err.value) and field in str(err.value)


def test_missing_or_misshapen_tensors_are_named(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    src = Path(tiny_models["mixtral"])
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    tensors = load_file(broken / "model.safetensors")
    key = "model.layers.1.self_attn.k_proj.weight"
    tensors.pop(key)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=key):
        Engine(str(broken))
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*k_proj.*shape"):
        Engine(str(broken))
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json.*JSON"):
        Engine(str(broken))
    with pytest.raises(CheckpointError, match="not a directory"):
        Engine(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("arch", ARCHS)
def test_halves_hold_disjoint_weights(arch, tiny_models):
    spec, architecture = resolve(tiny_models[arch])
    files = CheckpointFiles(tiny_models[arch])
    attn = architecture.attention_cls(spec, files, "cpu", torch.float32)
    ffn = architecture.ffn_cls(spec, files, "cpu", torch.float32)
    total = sum(files.get(k).numel() * 4 for k in files.keys())
    assert attn.nbytes() + ffn.nbytes() == total  # every tensor in exactly one half
    routed = spec.num_experts * 3 * spec.moe_intermediate_size * spec.hidden_size * 4
    assert ffn.nbytes() >= routed * sum(spec.moe_layers)
    assert attn.nbytes() < total - routed * sum(spec.moe_layers) + 1


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe"])
def test_expert_subsets_sum_to_the_full_ffn(arch, tiny_models):
    spec, architecture = resolve(tiny_models[arch])
    files = CheckpointFiles(tiny_models[arch])
    full = architecture.ffn_cls(spec, files, "cpu", torch.float32)
    e = spec.num_experts
    parts = [
        architecture.ffn_cls(spec, files, "cpu", torch.float32, experts=list(range(0, e, 2))),
        architecture.ffn_cls(spec, files, "cpu", torch.float32, experts=list(range(1, e, 2)),
                             with_shared=False),
    ]
    assert sum(p.nbytes() for p in parts) == full.nbytes()
    torch.manual_seed(0)
    h = torch.randn(9, spec.hidden_size)
    ids = torch.stack([torch.randperm(e)[: spec.top_k] for _ in range(9)])
    routing = Routing(ids, torch.rand(9, spec.top_k))
    for layer in range(spec.num_layers):
        expected = full.forward(layer, h, routing)
        got = sum(p.forward(layer, h, routing) for p in parts)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
