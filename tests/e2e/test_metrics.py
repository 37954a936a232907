"""/metrics parses with prometheus_client's own parser, and its counters match what was sent."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(server) -> dict:
    """{(sample name, model_name or pool label): value}"""
    r = server.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            key = s.labels.get("model_name") or s.labels.get("pool")
            if "le" in s.labels:
                continue
            out[(s.name, key)] = s.value
    return out


def test_counters_match_requests(server):
    server.wait_idle()
    before = scrape(server)
    sent = {"qwen-a": [0, 0, 0], "mixtral-b": [0, 0, 0]}  # requests, prompt, generated
    for model, max_new in (("qwen-a", 5), ("mixtral-b", 3), ("qwen-a", 7)):
        out = server.post(f"/models/{model}/generate", json={
            "text": ["The quick brown fox", "Hello"],
            "sampling_params": {"max_new_tokens": max_new, "ignore_eos": True}}).json()
        for o in out:
            sent[model][0] += 1
            sent[model][1] += o["meta_info"]["prompt_tokens"]
            sent[model][2] += o["meta_info"]["completion_tokens"]
    chat = server.post("/v1/chat/completions", json={
        "model": "mixtral-b", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
        "ignore_eos": True}).json()
    sent["mixtral-b"][0] += 1
    sent["mixtral-b"][1] += chat["usage"]["prompt_tokens"]
    sent["mixtral-b"][2] += chat["usage"]["completion_tokens"]
    with httpx.stream("POST", server.url + "/models/qwen-a/generate", timeout=60, json={
            "text": "Hello", "stream": True,
            "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}}) as r:
        for _ in r.iter_lines():
            pass
    sent["qwen-a"][0] += 1
    sent["qwen-a"][1] += 1
    sent["qwen-a"][2] += 6
    server.get("/health_generate")  # health checks are not counted
    server.wait_idle()
    after = scrape(server)

    def delta(name, model):
        return after[(name, model)] - before.get((name, model), 0.0)

    for model, (n, prompt, generated) in sent.items():
        assert delta("sglang:num_requests_total", model) == n
        assert delta("sglang:prompt_tokens_total", model) == prompt
        assert delta("sglang:generation_tokens_total", model) == generated
        assert delta("sglang:time_to_first_token_seconds_count", model) == n
        assert delta("sglang:e2e_request_latency_seconds_count", model) == n
        assert delta("sglang:inter_token_latency_seconds_count", model) == generated - n
        assert delta("sglang:num_aborted_requests_total", model) == 0
        assert after[("sglang:num_running_reqs", model)] == 0
        assert after[("sglang:num_queue_reqs", model)] == 0
        assert after[("sglang_crosspool:kv_pages_used", model)] == 0
    assert after[("sglang_crosspool:kv_pool_pages_used", "kv")] == 0
    assert after[("sglang_crosspool:kv_pool_pages_free", "kv")] == \
        after[("sglang_crosspool:kv_pool_pages_total", "kv")] > 0


def test_gauges_while_busy(server):
    """Running requests and KV pages show up while a request runs."""
    with httpx.stream("POST", server.url + "/models/mixtral-b/generate", timeout=60, json={
            "text": "Hello", "stream": True,
            "sampling_params": {"max_new_tokens": 300, "ignore_eos": True}}) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
        busy = scrape(server)
        assert busy[("sglang:num_running_reqs", "mixtral-b")] == 1
        assert busy[("sglang_crosspool:kv_pages_used", "mixtral-b")] > 0
        assert busy[("sglang_crosspool:kv_pool_pages_used", "kv")] == \
            busy[("sglang_crosspool:kv_pages_used", "mixtral-b")]
        assert busy[("sglang:token_usage", "kv")] > 0
        for _ in lines:
            pass
    assert server.wait_idle()["kv"]["used_pages"] == 0
