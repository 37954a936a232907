"""A server launched with --attention-split seq over 2 ranks (its scheduler process spawns the
follower) answers /generate with the in-process engine's greedy tokens, and reports each
rank's KV pages."""

from __future__ import annotations

from sglang_crosspool import Engine
from sglang_crosspool.testing.checkpoints import make_model

PROMPT = [5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57]


def test_sequence_split_server_gives_the_engines_tokens(launch_server, tmp_path):
    path = str(make_model(tmp_path / "ds", "deepseek_v2", seed=1))
    params = {"max_new_tokens": 6, "temperature": 0}
    want = Engine(path, kv_page_bytes=1024).generate(input_ids=PROMPT,
                                                     sampling_params=params)["output_ids"]
    server = launch_server({"ds": path}, "--attention-split", "seq", "--attention-split-size",
                           "2", "--kv-page-bytes", "1024")
    r = server.post("/generate", json={"model": "ds", "input_ids": PROMPT,
                                       "sampling_params": params})
    assert r.status_code == 200, r.text
    assert r.json()["output_ids"] == want
