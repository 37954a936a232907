import json

import pytest
import torch

pytest.importorskip("triton")

import crosspool_kernels
from crosspool_kernels import KERNELS, tune, tuned


def test_registry_resolves_every_op(device):
    assert len(KERNELS) == len(list(KERNELS)) >= 9
    for name, op in KERNELS.items():
        assert callable(op.triton) and callable(op.reference), name
    with pytest.raises(KeyError):
        KERNELS["no_such_op"]
    assert crosspool_kernels.triton_usable(device)  # a GPU, or the interpreter on CPU


def test_config_file_naming_and_buckets(tmp_path, monkeypatch):
    name = tuned.config_filename("fused_moe", {"E": 8, "N": 32}, "cpu", torch.float32)
    assert name == "fused_moe_E=8_N=32_device=cpu_dtype=float32.json"
    monkeypatch.setenv("CROSSPOOL_KERNEL_CONFIG_DIR", str(tmp_path))
    tuned.clear_cache()
    (tmp_path / "k_D=4_device=cpu_dtype=float16.json").write_text(
        json.dumps({"1": {"A": 1}, "64": {"A": 64, "B": 2}}))
    try:
        get = tuned.get_config
        assert get("k", {"D": 4}, "cpu", torch.float16, {"A": 0, "C": 3}, batch=50) == \
            {"A": 64, "B": 2, "C": 3}
        assert get("k", {"D": 4}, "cpu", torch.float16, {"A": 0}, batch=2)["A"] == 1
        assert get("k", {"D": 5}, "cpu", torch.float16, {"A": 0}) == {"A": 0}  # no file
    finally:
        tuned.clear_cache()


def test_committed_cpu_config_is_found():
    # The file tune.py wrote on CPU for the small MoE shape the tests use.
    cfg = tuned.get_config("fused_moe", {"E": 8, "N": 32}, "cpu", torch.float32, {}, batch=1)
    assert cfg["BLOCK_M"] == 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU tune.py times candidates")
def test_tune_on_cpu_writes_checked_defaults(tmp_path):
    path = tune.main(["fused_moe", "--experts", "4", "--inter", "16", "--hidden", "32",
                      "--top-k", "2", "--dtype", "float32", "--batches", "1,8",
                      "--out-dir", str(tmp_path)])
    with open(path) as f:
        data = json.load(f)
    assert path.endswith("fused_moe_E=4_N=16_device=cpu_dtype=float32.json")
    assert set(data) == {"1", "8"} and data["1"]["BLOCK_M"] == 16
