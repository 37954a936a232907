"""--load-format dummy: config-only folders, random weights made per tensor name, and the same
tokens from every engine layout that splits those weights differently."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sglang_crosspool import Engine
from sglang_crosspool.config import EngineConfig
from sglang_crosspool.models import checkpoint
from sglang_crosspool.models.checkpoint import DummyFiles, open_checkpoint
from sglang_crosspool.models.common import AttentionHalf, Routing
from sglang_crosspool.models.config import CheckpointError
from sglang_crosspool.models.registry import resolve
from sglang_crosspool.server_args import LOAD_FORMATS, ServerArgs
from sglang_crosspool.testing.checkpoints import make_config_only

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "tests" / "data" / "model-configs"
GREEDY = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
PROMPTS = [[5, 6, 7, 8], list(range(100, 118)), [42] * 9]

# The real configs, shrunk to CPU size by field overrides (special ids: the test tokenizer's);
# everything else stays as published (q/k norms, the shared expert, biases, rope theta).
_TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2,
         "vocab_size": 1024, "max_position_embeddings": 512, "bos_token_id": 0,
         "eos_token_id": 2}
TINY = {
    "qwen3_moe": ("Qwen3-30B-A3B", {**_TINY, "head_dim": 16, "moe_intermediate_size": 32,
                                    "intermediate_size": 96}),
    "qwen2_moe": ("Qwen1.5-MoE-A2.7B", {**_TINY, "moe_intermediate_size": 32,
                                        "shared_expert_intermediate_size": 48,
                                        "intermediate_size": 48}),
    "olmoe": ("OLMoE-1B-7B-0924", {**_TINY, "intermediate_size": 32}),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("config_only")
    return {arch: str(make_config_only(root / arch, CONFIGS / name / "config.json", **fields))
            for arch, (name, fields) in TINY.items()}


def run(paths: list[str], **options) -> list[list[int]]:
    engine = Engine(paths, served_model_name=list(TINY), device="cpu", dtype="float32",
                    load_format="dummy", **options)
    try:
        prompts = [p for p in PROMPTS for _ in TINY]
        models = [a for _ in PROMPTS for a in TINY]
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, model=models)
        return [o["output_ids"] for o in outs]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("arch", list(TINY))
def test_config_only_folder_serves_with_dummy_weights(folders, arch):
    path = Path(folders[arch])
    assert not list(path.glob("*.safetensors*"))
    assert (path / "tokenizer.json").is_file()
    with pytest.raises(CheckpointError, match="safetensors"):
        Engine(str(path), device="cpu")  # the default format still wants the weight files
    engine = Engine(str(path), device="cpu", dtype="float32", load_format="dummy")
    try:
        assert engine.config.load_format == "dummy"
        out = engine.generate(prompt="Hello, world!", sampling_params=GREEDY)
        ids = out["output_ids"]
        assert len(ids) == GREEDY["max_new_tokens"] and max(ids) < 1024
        assert isinstance(out["text"], str)
        # Random but sensible weights: greedy decoding does not collapse onto one token.
        assert len(set(ids)) > 1
    finally:
        engine.shutdown()


def test_same_name_same_values_in_every_instance(folders):
    a, b = DummyFiles(folders["qwen3_moe"]), DummyFiles(folders["qwen3_moe"])
    key, shape = "model.layers.1.mlp.experts.3.up_proj.weight", (32, 64)
    assert torch.equal(a.get(key, shape), b.get(key, shape))
    other = a.get("model.layers.1.mlp.experts.4.up_proj.weight", shape)
    assert not torch.equal(a.get(key, shape), other)
    assert 0.05 < other.std().item() < 0.2  # 1/sqrt(fan_in): 1/8
    assert torch.equal(a.get("model.layers.0.self_attn.q_norm.weight", (16,)), torch.ones(16))
    assert a.read_keys == {key, "model.layers.1.mlp.experts.4.up_proj.weight",
                           "model.layers.0.self_attn.q_norm.weight"}
    assert not b.read_keys - {key}
    reseeded = DummyFiles(folders["qwen3_moe"], seed=1)
    assert not torch.equal(a.get(key, shape), reseeded.get(key, shape))
    with pytest.raises(CheckpointError, match="shape"):
        a.get(key)


def test_membership_is_a_per_expert_checkpoints(folders, tmp_path):
    files = open_checkpoint(folders["olmoe"], "dummy")
    assert isinstance(files, DummyFiles)
    assert "lm_head.weight" in files  # untied, as in the published config
    assert "model.layers.0.mlp.experts.gate_up_proj" not in files
    assert "model.layers.0.mlp.experts.down_proj" not in files
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in files
    tied = make_config_only(tmp_path / "tied", folders["olmoe"], tie_word_embeddings=True)
    assert "lm_head.weight" not in DummyFiles(tied)
    with pytest.raises(ValueError, match="load_format"):
        open_checkpoint(folders["olmoe"], "pt")


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe"])
def test_expert_subsets_see_the_full_halfs_weights(folders, arch):
    spec, architecture = resolve(folders[arch])

    def half(experts=None, with_shared=True):
        # A fresh DummyFiles each time, as in separate processes.
        return architecture.ffn_cls(spec, DummyFiles(folders[arch]), "cpu", torch.float32,
                                    experts=experts, with_shared=with_shared)

    full = half()
    e = spec.num_experts
    parts = [half(list(range(0, e, 2))), half(list(range(1, e, 2)), with_shared=False)]
    torch.manual_seed(0)
    h = torch.randn(9, spec.hidden_size)
    ids = torch.stack([torch.randperm(e)[: spec.top_k] for _ in range(9)])
    routing = Routing(ids, torch.rand(9, spec.top_k))
    for i in range(spec.num_layers):
        for part in parts:
            assert torch.equal(part.layers[i].w13, full.layers[i].w13[part.experts])
            assert torch.equal(part.layers[i].w2, full.layers[i].w2[part.experts])
        together = sum(p.forward(i, h, routing) for p in parts)
        torch.testing.assert_close(together, full.forward(i, h, routing))


def test_crosspool_local_matches_monolithic(folders):
    paths = [folders[a] for a in TINY]
    monolithic = run(paths, pool_mode="monolithic")
    assert run(paths, pool_mode="crosspool", ffn_servers=2, ffn_transport="local") == monolithic


def test_real_shapes_stay_finite_in_bfloat16(tmp_path):
    """One MoE layer of Qwen3-30B-A3B at its real width (two experts): bf16 output is finite
    and of the input's scale, so 48 such layers do not overflow."""
    path = make_config_only(tmp_path / "q30", CONFIGS / "Qwen3-30B-A3B", num_hidden_layers=1)
    spec, architecture = resolve(path)
    ffn = architecture.ffn_cls(spec, open_checkpoint(path, "dummy", "cpu"), "cpu",
                               torch.bfloat16, experts=[0, 1])
    torch.manual_seed(0)
    h = torch.randn(4, spec.hidden_size, dtype=torch.bfloat16)
    routing = Routing(torch.tensor([[0, 1]] * 4), torch.full((4, 2), 0.5, dtype=torch.bfloat16))
    out = ffn.forward(0, h, routing)
    assert torch.isfinite(out).all() and 0.05 < out.float().std().item() < 5


def test_load_format_flag(folders):
    assert LOAD_FORMATS == checkpoint.LOAD_FORMATS
    a = ServerArgs.from_cli(["--model-path", folders["olmoe"], "--load-format", "dummy"])
    assert a.load_format == "dummy" and a.to_dict()["load_format"] == "dummy"
    assert a.engine_config().load_format == "dummy"
    assert ServerArgs.from_cli(["--model-path", folders["olmoe"]]).load_format == "auto"
    with pytest.raises(SystemExit):
        ServerArgs.from_cli(["--model-path", folders["olmoe"], "--load-format", "pt"])
    with pytest.raises(ValueError, match="load_format"):
        EngineConfig.build(folders["olmoe"], load_format="pt")


def test_cli_config_only(tmp_path, capsys):
    path = REPO_ROOT / "scripts" / "make_test_models.py"
    spec = importlib.util.spec_from_file_location("make_test_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source = CONFIGS / "OLMoE-1B-7B-0924" / "config.json"
    argv = ["--config-only", "--from-config", str(source), "--out", str(tmp_path), "--layers", "3"]
    assert module.main(argv) == 0
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == {**json.loads(source.read_text()), "num_hidden_layers": 3}
    assert (tmp_path / "tokenizer_config.json").is_file()
    assert not list(tmp_path.glob("*.safetensors"))
    assert "config-only" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        module.main(["--config-only", "--out", str(tmp_path)])


def test_deep_layers_still_route_tokens_apart(tmp_path, monkeypatch):
    """48 layers at the real width: the last layer's router still tells positions apart, so a
    benchmark's batches spread over the experts as a trained model's do, and greedy decoding
    does not repeat one token."""
    fields = {"vocab_size": 1024, "num_experts": 16, "moe_intermediate_size": 32,
              "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
              "bos_token_id": 0, "eos_token_id": 2}
    path = make_config_only(tmp_path / "deep", CONFIGS / "Qwen3-30B-A3B", **fields)
    routes = []
    route = AttentionHalf.route

    def recording(self, layer, h):
        routing = route(self, layer, h)
        routes.append(routing.topk_ids)
        return routing

    monkeypatch.setattr(AttentionHalf, "route", recording)
    engine = Engine(str(path), device="cpu", dtype="float32", load_format="dummy")
    try:
        prompt = list(range(200, 232))
        ids = engine.generate(input_ids=prompt, sampling_params=GREEDY)["output_ids"]
    finally:
        engine.shutdown()
    assert len(set(ids)) > GREEDY["max_new_tokens"] // 2
    last = routes[47]  # the prefill step's last layer, [32 tokens, top_k 8]
    assert len({tuple(sorted(r.tolist())) for r in last}) > 24
    assert len(torch.unique(last)) == 16
