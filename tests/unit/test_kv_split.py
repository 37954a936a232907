"""planner/kv_split.py: MLA weights counted from the config equal a real checkpoint's bytes,
and the per-request KV of replicated TP, replicas, head split and sequence split follow the
KV heads (MLA: one latent that TP replicates on every rank)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from sglang_crosspool.models.config import load_spec
from sglang_crosspool.planner.kv_split import main, mla_weights, split_row
from sglang_crosspool.testing.checkpoints import make_model

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "model-configs"
H200 = 141 * 10**9


def _checkpoint_bytes(path: Path) -> int:
    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("fields", [
    {},  # q_proj, no biases
    {"q_lora_rank": 24, "attention_bias": True, "topk_method": "group_limited_greedy",
     "n_group": 4, "topk_group": 2},
], ids=["lite-layout", "q-lora-biases"])
def test_mla_weights_equal_the_checkpoint(tmp_path, fields):
    path = make_model(tmp_path / "ds", "deepseek_v2", seed=0, **fields)
    assert mla_weights(load_spec(path), "float32").value == _checkpoint_bytes(path)


def test_lite_on_8_devices_mla_is_replicated_by_tp():
    spec = load_spec(CONFIGS / "DeepSeek-V2-Lite")
    row = split_row("lite", spec, 8, H200)
    assert row.mla and row.kv_heads == 1
    assert row.weights.value == 31_412_968_448  # 15.7 B params in bf16
    f = row.free.value
    assert f == int(H200 * 0.9) - -(-row.weights.value // 8)
    opts = row.options
    assert opts["replicated_tp"].per_request_bytes.value == f  # 8 copies of one latent cache
    assert opts["head_split"].per_request_bytes.value == f  # one "head": one device
    assert opts["sequence_split"].per_request_bytes.value == 8 * f
    assert opts["replicated_tp"].fraction.value == pytest.approx(1 / 8, abs=1e-4)
    assert opts["sequence_split"].per_request_tokens.value == 8 * f // (27 * 576 * 2)
    # Replicas of TP 1: the whole model on each device, a request on one of them.
    assert opts["dp_replicas"].per_request_bytes.value == int(H200 * 0.9) - row.weights.value


@pytest.mark.parametrize(("model", "devices", "tp_share"), [
    ("Qwen3-30B-A3B", 2, 1.0), ("Qwen3-30B-A3B", 8, 0.5),  # 4 kv_heads
    ("Mixtral-8x7B-v0.1", 8, 1.0),  # 8 kv_heads cover TP 8
])
def test_gqa_shares_follow_the_kv_heads(model, devices, tp_share):
    row = split_row(model, load_spec(CONFIGS / model), devices, H200)
    opts = row.options
    assert opts["replicated_tp"].fraction.value == pytest.approx(tp_share, abs=1e-4)
    head, tp = opts["head_split"], opts["replicated_tp"]
    assert head.per_request_bytes.value == tp.per_request_bytes.value
    assert opts["sequence_split"].fraction.value == 1.0
    # A head split keeps no copies: all requests together use every device.
    assert opts["head_split"].total_bytes.value == devices * row.free.value


def test_crowded_pool_and_cli(capsys):
    lite = str(CONFIGS / "DeepSeek-V2-Lite")
    assert main(["--model-path", lite, "--devices", "2", "--device-memory", "141GB",
                 "--other-weights", "100GB"]) == 0
    out = capsys.readouterr().out
    assert "| DeepSeek-V2-Lite | 1 (MLA) |" in out and "of other models' weights" in out
    assert main(["--model-path", lite, "--devices", "2", "--device-memory", "lots"]) == 2
    # The hook: `python -m sglang_crosspool.plan kv-split ...`.
    done = subprocess.run([sys.executable, "-m", "sglang_crosspool.plan", "kv-split",
                           "--model-path", lite, "--devices", "8", "--device-memory", "141GB",
                           "--brief"], capture_output=True, text=True, check=True)
    assert "== 8 devices" in done.stdout and "sequence split" in done.stdout


def test_launch_flags_name_what_the_engine_runs():
    lite = split_row("lite", load_spec(CONFIGS / "DeepSeek-V2-Lite"), 2, H200).launch
    assert lite["sequence_split"] == "--attention-split seq --attention-split-size 2"
    assert lite["head_split"] is None  # one latent: a head split would replicate it
    qwen = split_row("q", load_spec(CONFIGS / "Qwen3-30B-A3B"), 8, H200).launch
    assert qwen["head_split"] == "--attention-split head --attention-split-size 4"
    assert qwen["replicated_tp"] == "--tp-size 8"
