"""The trace generator: reproducible from its seed, long-tailed, bursty, clamped, prompts fixed."""

from __future__ import annotations

import numpy as np

from benchmark import trace


def make(tmp_path, name, *flags):
    out = tmp_path / name
    recs = trace.main(["--out", str(out), *flags])
    return recs, out.read_bytes()


def test_reproducible_from_seed(tmp_path):
    _, a = make(tmp_path, "a.jsonl", "--seed", "3", "--requests", "300")
    _, b = make(tmp_path, "b.jsonl", "--seed", "3", "--requests", "300")
    _, c = make(tmp_path, "c.jsonl", "--seed", "4", "--requests", "300")
    assert a == b and a != c
    assert trace.read_trace(tmp_path / "a.jsonl") == trace.read_trace(tmp_path / "b.jsonl")


def test_bursty_shape(tmp_path):
    recs, _ = make(tmp_path, "t.jsonl", "--models", "32", "--requests", "3000", "--rate", "5")
    counts = np.sort(np.bincount([int(r["model"][1:]) for r in recs], minlength=32))[::-1]
    assert counts[:4].sum() > 0.5 * len(recs)  # the top 10-15% of models carry most traffic
    cold = (counts < len(recs) / 32).sum() / 32  # below a uniform share
    assert cold >= 0.8
    t = np.array([r["t"] for r in recs])
    gaps = np.diff(t)
    assert np.all(gaps >= 0) and t[0] == 0
    assert gaps.std() / gaps.mean() > 2  # CV well above Poisson's 1
    assert abs(len(recs) / t[-1] - 5) < 2
    long = [r for r in recs if r["long"]]
    assert 0.03 < len(long) / len(recs) < 0.07
    assert all(16384 <= r["prompt_len"] <= 131072 for r in long)
    assert max(r["prompt_len"] for r in recs if not r["long"]) <= 14050  # Azure conv max


def test_balanced_and_clamped(tmp_path):
    recs, _ = make(tmp_path, "b.jsonl", "--variant", "balanced", "--models", "8",
                   "--requests", "2000", "--max-context", "512", "--max-output", "64")
    counts = np.bincount([int(r["model"][1:]) for r in recs], minlength=8)
    assert counts.min() > 0.6 * counts.mean()
    assert not any(r["long"] for r in recs)
    assert all(r["prompt_len"] + r["output_len"] <= 512 and 1 <= r["output_len"] <= 64
               for r in recs)


def test_azure_arrivals_are_burstier(tmp_path):
    recs, _ = make(tmp_path, "z.jsonl", "--arrivals", "azure", "--requests", "2000")
    gaps = np.diff([r["t"] for r in recs])
    assert gaps.std() / gaps.mean() > 2


def test_prompt_ids_deterministic():
    r = {"prompt_seed": 42, "prompt_len": 100}
    a, b = trace.prompt_ids(r, 1024), trace.prompt_ids(r, 1024)
    assert a == b and len(a) == 100
    assert all(trace.FIRST_ID <= i < 1024 for i in a)
    assert a != trace.prompt_ids({"prompt_seed": 43, "prompt_len": 100}, 1024)


def test_checkpoints_handed_out_in_turn(tmp_path):
    from benchmark.experiment import from_folder
    for d in ("b", "a", "c"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text("{}")
    (tmp_path / "not-a-model").mkdir()
    got = from_folder(["m03", "m00", "m01", "m02"], tmp_path)
    assert got == {"m00": str(tmp_path / "a"), "m01": str(tmp_path / "b"),
                   "m02": str(tmp_path / "c"), "m03": str(tmp_path / "a")}
