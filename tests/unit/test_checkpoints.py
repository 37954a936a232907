"""Tests of the synthetic checkpoint and tokenizer writers in sglang_crosspool.testing.

In: nothing but the installed transformers/tokenizers; every artefact goes to pytest's tmp dirs
(the tokenizer cache too, through SGLANG_CROSSPOOL_CACHE). Out: pass/fail. Runs in a few seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from sglang_crosspool.testing import tokenizer as toklib
from sglang_crosspool.testing.checkpoints import (
    ARCHS,
    SIZES,
    build_config,
    build_model,
    hf_reference,
    make_model,
)

# sha256 of the (token, id) list; pins the vocabulary across machines and Python versions.
VOCAB_1024_SHA256 = "582d7f5dbc689e8d66a708250d8d772e7e0f62246ea5088d09b20a314ea71555"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep the tests off the user's cache, so they also prove that a cold cache works."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SGLANG_CROSSPOOL_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _saved_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            # safe_open handles are not iterable, hence keys()
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return tensors


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _expert_names(arch: str, layer: int, expert: int) -> tuple[str, str, str]:
    """Per-expert (gate, up, down) keys as published checkpoints spell them."""
    if arch == "mixtral":
        base = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return f"{base}.w1.weight", f"{base}.w3.weight", f"{base}.w2.weight"
    base = f"model.layers.{layer}.mlp.experts.{expert}"
    return f"{base}.gate_proj.weight", f"{base}.up_proj.weight", f"{base}.down_proj.weight"


# (a) every architecture round-trips through save_pretrained / from_pretrained.
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_round_trips(arch, tmp_path):
    model_dir = make_model(tmp_path / arch, arch, seed=3)
    in_memory = build_model(build_config(arch), seed=3)
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    _assert_same_weights(in_memory, reloaded)

    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == [type(reloaded).__name__]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 2, 0)
    assert config["vocab_size"] == 1024
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_logits_are_not_near_ties(arch):
    """Greedy decoding tests need a clear winner at almost every position."""
    config = build_config(arch)
    model = build_model(config, seed=0)
    ids = torch.randint(3, config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    top2 = logits.topk(2, dim=-1).values
    gaps = top2[..., 0] - top2[..., 1]
    assert gaps.median() > 0.05
    assert (gaps < 1e-3).float().mean() < 0.02
    assert not torch.equal(build_model(config, seed=1).lm_head.weight, model.lm_head.weight)


def test_norms_and_biases_are_not_identity():
    """HF inits norms to 1 and biases to 0; ours moves them so a dropped one is noticed."""
    model = build_model(build_config("qwen2_moe"))
    layer = model.model.layers[0]
    assert not torch.equal(layer.input_layernorm.weight, torch.ones(64))
    assert layer.self_attn.q_proj.bias.abs().sum() > 0


def test_overrides_reach_the_config(tmp_path):
    model_dir = make_model(tmp_path / "m", "qwen3_moe", num_hidden_layers=1, rms_norm_eps=1e-5)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["rms_norm_eps"] == 1e-5


# (b) several shards plus an index.
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_sharded_save(layout, tmp_path):
    model_dir = make_model(tmp_path / "m", "olmoe", num_shards=3, expert_layout=layout)
    shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(_saved_tensors(model_dir))
    _assert_same_weights(build_model(build_config("olmoe")), hf_reference(model_dir))


def test_resave_with_fewer_shards_leaves_no_stale_files(tmp_path):
    make_model(tmp_path, "mixtral", num_shards=2)
    make_model(tmp_path, "mixtral", num_shards=1)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


# (c) fused 3-D expert tensors, loadable by transformers and equal to the per-expert ones.
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_layout(arch, tmp_path):
    config = build_config(arch)
    fused = _saved_tensors(make_model(tmp_path / "f", arch, expert_layout="fused"))
    split = _saved_tensors(make_model(tmp_path / "s", arch, expert_layout="per_expert"))
    assert not any(".experts.0." in k for k in fused)
    assert not any(k.endswith("experts.gate_up_proj") for k in split)

    n_experts = config.num_local_experts if arch == "mixtral" else config.num_experts
    inter = (
        config.intermediate_size if arch in ("mixtral", "olmoe") else config.moe_intermediate_size
    )
    hidden = config.hidden_size
    for layer in range(config.num_hidden_layers):
        gate_up = fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = fused[f"model.layers.{layer}.mlp.experts.down_proj"]
        assert gate_up.shape == (n_experts, 2 * inter, hidden)
        assert down.shape == (n_experts, hidden, inter)
        for e in range(n_experts):
            gate, up, down_e = _expert_names(arch, layer, e)
            assert torch.equal(gate_up[e, :inter], split[gate])  # gate rows first
            assert torch.equal(gate_up[e, inter:], split[up])
            assert torch.equal(down[e], split[down_e])

    reloaded = hf_reference(tmp_path / "f")
    _assert_same_weights(build_model(config), reloaded)


# (d) tokenizer: round trip, special tokens, chat template.
def test_tokenizer_files_load_and_round_trip(tmp_path):
    toklib.write_tokenizer(tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    raw_tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = [
        "Hello, world!",
        " leading space and  double  spaces\n\ttabs\r\nand CRLF ",
        "def f(x):\n    return {'a': [1, 2.5e-3]}  # ~!@#$%^&*()_+`|\\<>?",
        "",
    ]
    for text in texts:
        ids = hf_tok.encode(text)
        assert hf_tok.decode(ids) == text
        assert raw_tok.decode(raw_tok.encode(text).ids) == text
        assert raw_tok.encode(text).ids == ids  # no BOS or other additions
    assert raw_tok.get_vocab_size() == len(hf_tok) == 1024
    vocab = sorted(raw_tok.get_vocab().items(), key=lambda kv: kv[1])
    assert hashlib.sha256(json.dumps(vocab).encode()).hexdigest() == VOCAB_1024_SHA256


def test_tokenizer_special_tokens(tmp_path):
    toklib.write_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.convert_tokens_to_ids(specials) == [0, 1, 2]
    assert tok.encode("<|im_start|>user<|im_end|>")[0::2] == [1, 2]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 2, 0)
    assert toklib.special_token_ids() == dict(zip(specials, [0, 1, 2], strict=True))


def test_chat_template(tmp_path):
    toklib.write_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text == expected
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt == expected.removesuffix("<|im_start|>assistant\n")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == tok.encode(expected)


# (e) the trained tokenizer is cached and reused.
def test_tokenizer_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_CROSSPOOL_CACHE", str(tmp_path / "cache"))
    before = toklib.train_count
    toklib.write_tokenizer(tmp_path / "a", vocab_size=512)
    assert toklib.train_count == before + 1
    (cached,) = (tmp_path / "cache").rglob("tokenizer.json")
    stamp = cached.stat().st_mtime_ns
    toklib.write_tokenizer(tmp_path / "b", vocab_size=512)
    assert toklib.train_count == before + 1
    assert cached.stat().st_mtime_ns == stamp
    a, b = ((tmp_path / d / "tokenizer.json").read_text() for d in "ab")
    assert a == b and Tokenizer.from_str(a).get_vocab_size() == 512


# Real sizes: the config reproduces the published shapes (checked without allocating weights).
_REAL_CONFIG_DIRS = {  # the published configs vendored under tests/data/model-configs
    "olmoe-1b-7b": "OLMoE-1B-7B-0924",
    "qwen1.5-moe-a2.7b": "Qwen1.5-MoE-A2.7B",
    "qwen3-30b-a3b": "Qwen3-30B-A3B",
    "mixtral-8x7b": "Mixtral-8x7B-v0.1",
}
_SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "norm_topk_prob",
    "rms_norm_eps",
    "max_position_embeddings",
)


def _published_config(name: str) -> dict:
    return json.loads((REPO_ROOT / "tests" / "data" / "model-configs" / name /
                       "config.json").read_text())


@pytest.mark.parametrize("size", sorted(_REAL_CONFIG_DIRS))
def test_real_sizes_match_published_configs(size):
    published = _published_config(_REAL_CONFIG_DIRS[size])
    (arch,) = SIZES[size]
    assert published["model_type"] == arch
    config = build_config(arch, size)
    for field in _SHAPE_FIELDS:
        if field in published:
            assert getattr(config, field) == published[field], field
    assert config.rope_parameters["rope_theta"] == published["rope_theta"]


def test_real_size_parameter_count():
    config = build_config("qwen3_moe", "qwen3-30b-a3b")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert 30.4e9 < sum(p.numel() for p in model.parameters()) < 30.6e9


def _cli_main():
    """scripts/ is no package; load the CLI from its file whatever sys.path holds."""
    path = REPO_ROOT / "scripts" / "make_test_models.py"
    spec = importlib.util.spec_from_file_location("make_test_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_all_makes_four_tiny_models(tmp_path, capsys):
    main = _cli_main()
    assert main(["--all", "--out", str(tmp_path)]) == 0
    for arch in ARCHS:
        assert (tmp_path / arch / "config.json").is_file()
    assert len(capsys.readouterr().out.splitlines()) == len(ARCHS)


def test_cli_single_model_with_options(tmp_path):
    main = _cli_main()
    argv = ["--arch", "mixtral", "--out", str(tmp_path), "--shards", "2", "--layout", "fused"]
    assert main([*argv, "--dtype", "bfloat16", "--override", "num_hidden_layers=1"]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["dtype"] == "bfloat16"
    assert len(list(tmp_path.glob("model-*-of-00002.safetensors"))) == 2
    assert os.path.isfile(tmp_path / "tokenizer_config.json")
