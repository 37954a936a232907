"""ServerArgs: SGLang's flag names, model sources, YAML config, derived values, errors."""

from __future__ import annotations

import dataclasses
import os

import pytest

from sglang_crosspool.server_args import ServerArgs, build_parser, kv_pages_for_tokens


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_models):
    return tiny_models


def parse(*argv: str, **kw) -> ServerArgs:
    return ServerArgs.from_cli(list(argv), **kw)


def test_model_path_repeatable_with_served_names(ckpts):
    a = parse("--model-path", ckpts["qwen3_moe"], "--model-path", ckpts["mixtral"],
              "--served-model-name", "q", "--served-model-name", "m")
    assert [(m.name, m.path) for m in a.models] == [("q", ckpts["qwen3_moe"]),
                                                    ("m", ckpts["mixtral"])]
    default_names = parse("--model-path", ckpts["olmoe"])
    assert default_names.model_names == ["olmoe"]  # the folder name


def test_model_name_equals_path(ckpts):
    a = parse("--model", f"a={ckpts['olmoe']}", "--model", f"b={ckpts['qwen2_moe']}")
    assert a.model_names == ["a", "b"] and not a.demo_models


def test_sglang_flags_parse_into_a_frozen_dataclass(ckpts):
    a = parse("--model-path", ckpts["qwen3_moe"], "--host", "127.0.0.1", "--port", "31000",
              "--dtype", "float32", "--device", "cpu", "--mem-fraction-static", "0.8",
              "--max-running-requests", "8", "--context-length", "256",
              "--chunked-prefill-size", "64", "--api-key", "k", "--log-level", "warning",
              "--random-seed", "3", "--disable-cuda-graph", "--cuda-graph-max-bs", "16",
              "--pool-mode", "static", "--kv-page-bytes", "8192", "--max-queued-requests", "4")
    assert (a.port, a.max_running_requests, a.context_length, a.chunked_prefill_size) == \
        (31000, 8, 256, 64)
    assert a.api_key == "k" and a.random_seed == 3 and a.disable_cuda_graph
    assert a.cuda_graph_max_bs_decode == 16  # the older spelling maps to the new one
    assert a.pool_mode == "static" and a.kv_page_bytes == 8192 and a.max_queued_requests == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.port = 1
    assert a.to_dict()["api_key"] == "***"
    cfg = a.engine_config()
    assert cfg.models[0].context_length == 256 and cfg.pool_mode == "static"
    assert cfg.dtype == "float32" and cfg.max_running_requests == 8


def test_ipc_paths_are_unique_per_server(ckpts):
    a = parse("--model-path", ckpts["qwen3_moe"], "--port", "31001")
    b = parse("--model-path", ckpts["qwen3_moe"], "--port", "31001")
    assert a.ipc_dir != b.ipc_dir and "31001" in a.ipc_dir and str(os.getpid()) in a.ipc_dir
    assert a.ipc_path("scheduler_in").startswith("ipc://")


def test_max_total_tokens_sets_the_kv_page_budget(ckpts):
    a = parse("--model-path", ckpts["qwen3_moe"], "--model-path", ckpts["mixtral"],
              "--max-total-tokens", "1000")
    cfg = a.engine_config()
    assert cfg.kv_pages == kv_pages_for_tokens(cfg, 1000)
    from sglang_crosspool.engine.core import EngineCore

    core = EngineCore(cfg)
    try:
        pool = core.kv_pool
        capacity = {m: pool.max_blocks(m) * pool.models[m].block_tokens
                    for m in cfg.model_names}
        assert all(c >= 1000 for c in capacity.values())  # any one model can hold them all
        # ... and the budget is no bigger than the model with the largest KV per token needs.
        tightest = min(capacity, key=capacity.get)
        assert capacity[tightest] < 1000 + pool.models[tightest].block_tokens
    finally:
        core.shutdown()


def test_yaml_config_lists_models_and_options(ckpts, tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"models:\n  - name: one\n    path: {ckpts['olmoe']}\n"
                   f"  - {ckpts['mixtral']}\nport: 31002\nmax-running-requests: 5\n")
    a = parse("--config", str(cfg))
    assert a.model_names == ["one", "mixtral"] and a.port == 31002
    assert a.max_running_requests == 5
    b = parse("--config", str(cfg), "--port", "31003")  # the command line wins
    assert b.port == 31003


@pytest.mark.parametrize("argv, words", [
    (["--model", "nopath"], "NAME=PATH"),
    (["--model-path", "/does/not/exist"], "not a checkpoint folder"),
    (["--max-running-requests", "0", "--model", "a=/x"], "--max-running-requests"),
    (["--kv-pages", "10", "--max-total-tokens", "10", "--model", "a=/x"], "give one"),
    (["--stream-interval", "0", "--model", "a=/x"], "--stream-interval"),
])
def test_errors_name_the_flag(argv, words, capsys, ckpts):
    argv = [x.replace("/x", ckpts["olmoe"]) for x in argv]
    with pytest.raises(SystemExit):
        parse(*argv)
    assert words in capsys.readouterr().err


def test_duplicate_names_refused(ckpts, capsys):
    with pytest.raises(SystemExit):
        parse("--model", f"a={ckpts['olmoe']}", "--model", f"a={ckpts['mixtral']}")
    assert "used twice" in capsys.readouterr().err


def test_unknown_yaml_key(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("prot: 1\n")
    with pytest.raises(SystemExit):
        parse("--config", str(cfg))
    assert "prot" in capsys.readouterr().err


def test_help_is_grouped():
    text = build_parser().format_help()
    for group in ("models:", "HTTP server:", "scheduling:", "memory:", "CrossPool:",
                  "CUDA graphs"):
        assert group in text
    for flag in ("--model-path", "--served-model-name", "--mem-fraction-static",
                 "--max-total-tokens", "--cuda-graph-max-bs-decode", "--pool-mode"):
        assert flag in text


def test_no_model_means_demo_models(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_CROSSPOOL_CACHE", str(tmp_path))
    a = parse()
    assert a.demo_models and len(a.models) == 3
    assert all((tmp_path / "demo-models").exists() and os.path.isdir(m.path) for m in a.models)
    from sglang_crosspool.config import EngineConfig

    cfg = a.engine_config()
    assert isinstance(cfg, EngineConfig)
    assert len({m.spec.model_type for m in cfg.models}) == 3  # three architectures
    mtimes = [os.path.getmtime(os.path.join(m.path, "config.json")) for m in a.models]
    again = parse()  # reused, not made again
    assert [os.path.getmtime(os.path.join(m.path, "config.json")) for m in again.models] == mtimes


def test_kv_page_backend_and_reserve_flags(ckpts):
    a = parse("--model-path", ckpts["qwen3_moe"], "--kv-page-backend", "simulated",
              "--kv-reserve-pages", "3")
    assert (a.kv_page_backend, a.kv_reserve_pages) == ("simulated", 3)
    cfg = a.engine_config()
    assert (cfg.kv_page_backend, cfg.kv_reserve_pages) == ("simulated", 3)
    default = parse("--model-path", ckpts["qwen3_moe"])
    assert default.kv_page_backend == "auto" and default.engine_config().kv_reserve_pages == 0
    for bad in (["--kv-reserve-pages", "-1"], ["--kv-page-backend", "mmap"]):
        with pytest.raises(SystemExit):
            parse("--model-path", ckpts["qwen3_moe"], *bad)


def test_ffn_device_puts_the_weights_pool_on_another_gpu(ckpts):
    a = parse("--model-path", ckpts["qwen3_moe"], "--device", "cuda:0", "--pool-mode", "crosspool",
              "--ffn-device", "cuda:1")
    config = a.engine_config()
    # The p2p crossing is the default across GPUs.
    assert (config.device, config.ffn_device, config.ffn_transport) == \
        ("cuda:0", "cuda:1", "p2p")
    assert parse("--model-path", ckpts["qwen3_moe"]).engine_config().ffn_device == "cpu"


def test_devices_give_one_attention_worker_each(ckpts):
    a = parse("--model-path", ckpts["qwen3_moe"], "--devices", "cpu, cpu")
    assert a.devices == ("cpu", "cpu")
    assert a.engine_config().device == "cpu"
    assert parse("--model-path", ckpts["qwen3_moe"]).devices == ()
    with pytest.raises(SystemExit):  # the launcher's usage error
        parse("--model-path", ckpts["qwen3_moe"], "--devices", "cpu,gpu0")


def test_moe_small_batch_flag(ckpts):
    # The small-batch MoE path: auto by default (CUDA only, where it measured faster on an
    # H200); auto/on/off reach the engine config.
    assert parse("--model-path", ckpts["qwen3_moe"]).engine_config().moe_small_batch == "auto"
    a = parse("--model-path", ckpts["qwen3_moe"], "--moe-small-batch", "off")
    assert a.moe_small_batch == "off" and a.engine_config().moe_small_batch == "off"
    with pytest.raises(SystemExit):
        parse("--model-path", ckpts["qwen3_moe"], "--moe-small-batch", "always")


def test_tp_all_reduce_flag(ckpts):
    assert parse("--model-path", ckpts["qwen3_moe"]).engine_config().tp_all_reduce == "nccl"
    a = parse("--model-path", ckpts["qwen3_moe"], "--tp-all-reduce", "symm-mem")
    assert a.engine_config().tp_all_reduce == "symm-mem"
    with pytest.raises(SystemExit):
        parse("--model-path", ckpts["qwen3_moe"], "--tp-all-reduce", "custom")
