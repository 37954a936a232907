"""Models loaded and unloaded in a running server (POST /load_model, /unload_model), in the
monolithic and the crosspool (FFN server processes, shm) pool modes.

While another model streams without pause, a model is loaded, serves the tokens it gives when
served from start-up, and is unloaded: none of the other model's requests fails or changes, and
the KV pages and weight bytes are back to their earlier values. An unload lets requests in flight
finish while new ones get 404 at once; with force it ends them with an error. A model too large
for the free memory is refused with 507 and nothing changes. In crosspool, /rebalance moves a
model's experts between the FFN servers while it streams, its tokens unchanged.
"""

from __future__ import annotations

import itertools
import json
import threading
import time

import httpx
import pytest

from sglang_crosspool.testing.checkpoints import make_config_only

MODES = {"monolithic": [],
         "crosspool-shm": ["--pool-mode", "crosspool", "--ffn-servers", "2",
                           "--ffn-transport", "shm"]}
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
PROMPT = [5, 6, 7, 8, 9]  # shorter than a KV block with its answer: never cached


@pytest.fixture(scope="module", params=list(MODES))
def live(request, model_paths, launch_module_server):
    """A server that starts with qwen-a alone."""
    return launch_module_server({"qwen-a": model_paths["qwen-a"]}, *MODES[request.param])


def generate(server, model: str, params=GREEDY, prompt=PROMPT) -> httpx.Response:
    return server.post("/generate", json={"model": model, "input_ids": prompt,
                                          "sampling_params": params})


def footprint(server) -> dict:
    server.wait_idle()
    assert server.post("/flush_cache").status_code == 200
    state = server.internal_state()
    worker = state["workers"][0]
    return {"kv": {k: state["kv"][k] for k in ("used_pages", "mapped_pages", "cached_pages")},
            "kv_models": sorted(state["kv"]["models"]),
            "attention_bytes": worker["attention_bytes"],
            "ffn_bytes_per_server": worker["ffn_bytes_per_server"],
            "models": [m["id"] for m in server.get("/v1/models").json()["data"]]}


class Traffic:
    """Streams greedy requests to one model back to back until stopped; keeps every token's
    arrival time."""

    def __init__(self, server, model: str):
        self.server, self.model = server, model
        self.results: list[tuple[int, list[int]]] = []  # (status, output ids)
        self.arrivals: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        body = {"model": self.model, "input_ids": PROMPT, "sampling_params": GREEDY,
                "stream": True}
        while not self._stop.is_set():
            ids = []
            with httpx.stream("POST", self.server.url + "/generate", json=body,
                              timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        self.arrivals.append(time.monotonic())
                        ids = json.loads(line[6:])["output_ids"]
            self.results.append((r.status_code, ids))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def gaps(self, start: float, end: float) -> list[float]:
        times = [t for t in self.arrivals if start <= t <= end]
        return [b - a for a, b in itertools.pairwise(times)]


def test_load_and_unload_while_another_model_streams(live, server, model_paths):
    expected_b = generate(server, "mixtral-b").json()["output_ids"]  # served from start-up
    expected_a = generate(live, "qwen-a").json()["output_ids"]
    before = footprint(live)
    traffic = Traffic(live, "qwen-a")
    time.sleep(0.5)
    t0 = time.monotonic()
    r = live.post("/load_model", json={"model_path": model_paths["mixtral-b"],
                                       "served_model_name": "mixtral-b"})
    t1 = time.monotonic()
    assert r.status_code == 200, r.text
    loaded = r.json()
    assert loaded["success"] and loaded["attention_bytes"] > 0 and loaded["ffn_bytes"] > 0
    assert [m["id"] for m in live.get("/v1/models").json()["data"]] == ["qwen-a", "mixtral-b"]
    assert live.get("/model_info?model=mixtral-b").json()["model_type"] == "mixtral"
    assert generate(live, "mixtral-b").json()["output_ids"] == expected_b
    r = live.post("/unload_model", json={"served_model_name": "mixtral-b"})
    assert r.status_code == 200, r.text
    freed = r.json()
    assert (freed["attention_bytes"], freed["ffn_bytes"]) == (loaded["attention_bytes"],
                                                              loaded["ffn_bytes"])
    assert generate(live, "mixtral-b").status_code == 404
    time.sleep(0.3)
    traffic.stop()

    assert traffic.results and all(status == 200 for status, _ in traffic.results)
    assert all(ids == expected_a for _, ids in traffic.results)
    assert traffic.arrivals[0] < t0 and traffic.arrivals[-1] > t1  # it streamed throughout
    gaps = traffic.gaps(t0, t1)
    print(f"load {t1 - t0:.3f} s; qwen-a's longest gap between tokens meanwhile: "
          f"{max(gaps, default=0.0):.3f} s")
    assert footprint(live) == before
    ops = live.get("/metrics").text
    assert 'sglang_crosspool:model_ops{op="unload",state="done"}' in ops


def _stream_long(server, model: str, tokens: int, out: dict) -> threading.Thread:
    def run():
        # Token texts in the logprobs: the server decodes them while the model drains.
        body = {"model": model, "input_ids": [3, 4, 5], "stream": True,
                "return_logprob": True, "return_text_in_logprobs": True,
                "sampling_params": {"max_new_tokens": tokens, "temperature": 0,
                                    "ignore_eos": True}}
        with httpx.stream("POST", server.url + "/generate", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    out["last"] = json.loads(line[6:])
                    out["texts"] = out.get("texts", 0) + sum(
                        isinstance(e[2], str) for e in out["last"]["meta_info"][
                            "output_token_logprobs"])
                    out.setdefault("first", time.monotonic())
        out["end"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait_running(server, model: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        models = server.internal_state()["scheduler"]["models"]
        if models.get(model, {}).get("running"):
            return
        time.sleep(0.02)
    raise AssertionError(f"no request of {model} started")


def test_unload_lets_requests_in_flight_finish_and_force_ends_them(live, model_paths):
    body = {"model_path": model_paths["mixtral-b"], "served_model_name": "b2"}
    assert live.post("/load_model", json=body).status_code == 200
    out: dict = {}
    stream = _stream_long(live, "b2", 400, out)
    _wait_running(live, "b2")
    unloaded: dict = {}

    def unload():
        unloaded["response"] = live.post("/unload_model", json={"served_model_name": "b2"})
        unloaded["end"] = time.monotonic()

    unloader = threading.Thread(target=unload)
    unloader.start()
    deadline = time.monotonic() + 10
    while generate(live, "b2").status_code != 404:  # new requests: refused at once
        assert time.monotonic() < deadline
    assert "end" not in out and "response" not in unloaded  # still streaming, still draining
    stream.join(120)
    unloader.join(120)
    assert out["last"]["meta_info"]["finish_reason"]["type"] == "length"
    assert out["last"]["meta_info"]["completion_tokens"] == 400 == out["texts"]
    assert unloaded["response"].status_code == 200, unloaded["response"].text
    assert unloaded["end"] >= out["end"] - 0.5  # answered once the stream was done

    assert live.post("/load_model", json=body).status_code == 200
    failed: dict = {}
    request = threading.Thread(target=lambda: failed.update(response=generate(
        live, "b2", {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True})))
    request.start()
    _wait_running(live, "b2")
    r = live.post("/unload_model", json={"served_model_name": "b2", "force": True})
    request.join(60)
    assert r.status_code == 200 and r.json()["ended_by_force"] == 1, r.text
    assert failed["response"].status_code == 503
    assert "unloaded" in failed["response"].json()["error"]["message"]
    assert live.internal_state()["kv"]["used_pages"] == 0


def test_refusals(live, model_paths, tmp_path):
    before = footprint(live)
    # 4096 experts of 3 x 64 x 2^20 float32: 3.3 TB of FFN weights, from config.json alone.
    huge = make_config_only(tmp_path / "huge", model_paths["mixtral-b"], num_hidden_layers=1,
                            intermediate_size=1 << 20, num_local_experts=4096)
    r = live.post("/load_model", json={"model_path": str(huge), "load_format": "dummy"})
    assert r.status_code == 507, r.text
    assert "does not fit" in r.json()["error"]["message"]
    assert live.post("/load_model", json={"model_path": model_paths["qwen-a"],
                                          "served_model_name": "qwen-a"}).status_code == 400
    assert live.post("/load_model", json={"model_path": str(tmp_path / "none")}
                     ).status_code == 400
    assert live.post("/unload_model", json={"served_model_name": "nope"}).status_code == 404
    bad = live.post("/rebalance", json={"placement": {"qwen-a": [[0]]}})  # not every expert
    assert bad.status_code in (400, 501)  # 501: monolithic has no FFN servers
    assert footprint(live) == before


def test_rebalance_moves_experts_while_the_model_streams(live):
    expected = generate(live, "qwen-a").json()["output_ids"]
    before = live.internal_state()["workers"][0]["ffn_bytes_per_server"]
    all_here = {"placement": {"qwen-a": [[], list(range(8))]}}  # tiny qwen3_moe: 8 experts
    if len(before) == 1:  # monolithic: no FFN servers to move experts between
        assert live.post("/rebalance", json=all_here).status_code == 501
        return
    traffic = Traffic(live, "qwen-a")
    time.sleep(0.3)
    r = live.post("/rebalance", json=all_here)
    assert r.status_code == 200, r.text
    assert r.json()["models"]["qwen-a"]["moved_experts"] == 4
    moved = live.internal_state()["workers"][0]["ffn_bytes_per_server"]
    assert sum(moved) == sum(before) and moved[0] < before[0]
    time.sleep(0.3)
    r = live.post("/rebalance", json={})  # spread evenly again
    assert r.status_code == 200 and r.json()["models"]["qwen-a"]["moved_experts"] == 4
    time.sleep(0.3)
    traffic.stop()
    assert live.internal_state()["workers"][0]["ffn_bytes_per_server"] == before
    assert traffic.results and all(result == (200, expected) for result in traffic.results)
