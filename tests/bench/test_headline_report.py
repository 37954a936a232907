"""benchmark/headline_report.py on hand-made results: the table, the headline ratio, the knee
(the baseline's first preempting load) and the plots."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from benchmark import headline_report  # noqa: E402


def result(tbt_p99: float, preempted: int, hot_pages: float) -> dict:
    records = [{"model": "hot", "gaps": [0.01, tbt_p99]}, {"model": "hot", "gaps": [0.02]},
               {"model": "cold", "gaps": [0.03]}]
    overall = {"completed": 3, "sent": 3, "errors": 0, "ttft_p50": 0.1, "ttft_p99": 0.2,
               "tbt_p50": 0.02, "tbt_p99": tbt_p99, "goodput_fraction": 1.0,
               "output_tokens_per_s": 10.0, "preempted": preempted}
    timeline = [{"t": 0.0, "pool_used": {"kv": 0}, "model_pages": {"hot": 0},
                 "gpu_used": {"cuda:0": 0}},
                {"t": 1.0, "pool_used": {"kv": hot_pages}, "model_pages": {"hot": hot_pages},
                 "gpu_used": {"cuda:0": hot_pages}}]
    return {"records": records, "overall": overall, "kv_timeline": timeline}


def test_report_ratio_knee_and_plots(tmp_path):
    for label, points in {"monolithic": {1: (0.1, 0, 100), 2: (0.4, 3, 120)},
                          "crosspool": {1: (0.2, 0, 100), 2: (0.1, 0, 240)}}.items():
        folder = tmp_path / label
        folder.mkdir()
        for load, (p99, pre, pages) in points.items():
            (folder / f"bursty-load{load}.results.json").write_text(
                json.dumps(result(p99, pre, pages)))
    out = tmp_path / "report"
    report = headline_report.main(["--run", f"monolithic={tmp_path / 'monolithic'}",
                                   "--run", f"crosspool={tmp_path / 'crosspool'}",
                                   "--out", str(out)])
    text = report.read_text()
    assert "| 1 | 0.50 | 0 / 0 | 1.00 |" in text  # crosspool twice monolithic's P99 at load 1
    assert "| 2 | 4.00 | 3 / 0 | 2.00 |" in text  # 4x better, twice the hot model's pages
    assert headline_report.knee(headline_report.load_runs(
        [f"monolithic={tmp_path / 'monolithic'}"]), "bursty", "monolithic") == 2
    assert "Plots at load 2" in text
    for name in ("p99_tbt_vs_load-bursty.png", "tbt_cdf-bursty.png", "kv_pages-bursty.png"):
        assert (out / name).stat().st_size > 0
