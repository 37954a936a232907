"""The prefix cache through a real server: `meta_info.cached_tokens`, the OpenAI usage's
`prompt_tokens_details.cached_tokens`, the per-model cache gauges and the cached-tokens
counter, `/flush_cache` (refused while a request runs), and the sglang frontend's `fork` and
`select` reusing the prefix they share."""

from __future__ import annotations

import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sglang_crosspool.tokenizer import load_tokenizer

BLOCK = 32  # tokens a KV block holds for the tiny models at the default 4 KiB page


def words(tag: str, n: int = 60) -> str:
    """A text no other test sends (the cache is the session server's)."""
    return " ".join(f"{tag}{i}" for i in range(n))


def gauge(server, name: str, model: str) -> float:
    r = server.get("/metrics")
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name == name and s.labels.get("model_name") == model:
                return s.value
    raise AssertionError(f"no {name} for {model}")


def generate(server, model: str, text: str, **params) -> dict:
    r = server.post(f"/models/{model}/generate", json={
        "text": text, "sampling_params": {"max_new_tokens": 4, "temperature": 0,
                                          "ignore_eos": True, **params}})
    assert r.status_code == 200, r.text
    return r.json()


def test_native_and_openai_report_cached_tokens(server):
    text = words("alpha")
    first = generate(server, "qwen-a", text)["meta_info"]
    again = generate(server, "qwen-a", text + " and more")["meta_info"]
    other = generate(server, "mixtral-b", text + " and more")["meta_info"]
    assert first["cached_tokens"] == 0 and other["cached_tokens"] == 0
    # Whole blocks of the first prompt (its computed tokens), at most all but the last token.
    assert again["cached_tokens"] == first["prompt_tokens"] // BLOCK * BLOCK > 0
    assert again["cached_tokens"] < again["prompt_tokens"]
    before = gauge(server, "sglang:cached_tokens_total", "mixtral-b")
    body = {"model": "mixtral-b", "max_tokens": 3, "temperature": 0,
            "messages": [{"role": "user", "content": words("beta")}]}
    cold = server.post("/v1/chat/completions", json=body).json()["usage"]
    warm = server.post("/v1/chat/completions", json=body).json()["usage"]
    assert cold["prompt_tokens_details"] == {"cached_tokens": 0}
    cached = warm["prompt_tokens_details"]["cached_tokens"]
    assert cached == (warm["prompt_tokens"] - 1) // BLOCK * BLOCK > 0
    server.wait_idle()
    assert gauge(server, "sglang:cached_tokens_total", "mixtral-b") - before == cached
    assert gauge(server, "sglang_crosspool:prefix_cache_pages", "mixtral-b") > 0


def test_flush_cache_is_refused_while_a_request_runs_then_unmaps_the_cache(server):
    generate(server, "qwen-a", words("gamma"))
    started = threading.Event()

    def long_stream():
        with httpx.stream("POST", server.url + "/models/qwen-a/generate", timeout=120, json={
                "text": words("delta"), "stream": True,
                "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}) as r:
            for _ in r.iter_lines():
                started.set()

    t = threading.Thread(target=long_stream)
    t.start()
    try:
        assert started.wait(60)
        r = server.post("/flush_cache")
        assert r.status_code == 400 and "running" in r.text
    finally:
        t.join(120)
    server.wait_idle()
    kv = server.internal_state()["kv"]
    assert kv["mapped_pages"] == kv["cached_pages"] > 0 and kv["used_pages"] == 0
    assert server.post("/flush_cache").status_code == 200
    kv = server.internal_state()["kv"]
    assert kv["mapped_pages"] == kv["cached_pages"] == kv["used_pages"] == 0
    for model in ("qwen-a", "mixtral-b"):
        assert gauge(server, "sglang_crosspool:prefix_cache_pages", model) == 0


sgl = pytest.importorskip("sglang")


@sgl.function
def forked(s, prefix):
    s += prefix + sgl.gen("intro", max_tokens=2, temperature=0, ignore_eos=True)
    # NOTE: the frontend's fork sends the text so far (max_new_tokens 0) to be cached first,
    # but only if its worker thread has already added that text: waiting for `intro` makes
    # sure it has.
    s["intro"]
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f" branch{i}:" + sgl.gen("d", max_tokens=3, temperature=0, ignore_eos=True)
    metas = [f.get_meta_info("d") for f in forks]
    forks.join()
    return metas


@sgl.function
def pick(s, question, choices):
    s += question
    s += sgl.select("answer", choices=choices)


def test_frontend_fork_and_select_reuse_the_shared_prefix(server, model_paths):
    url = f"{server.url}/models/qwen-a"
    tok = load_tokenizer(model_paths["qwen-a"])
    counter = "sglang:cached_tokens_total"
    # fork: the frontend first sends the shared text alone, which fills the cache; each branch
    # then reuses all its whole blocks.
    prefix = words("epsilon")
    state = forked.run(prefix=prefix, backend=sgl.RuntimeEndpoint(url))
    shared = len(tok.encode(prefix + state["intro"]))
    assert [m["cached_tokens"] for m in state.ret_value] == [shared // BLOCK * BLOCK] * 2
    assert shared // BLOCK > 0
    # select: the prefix alone, then each choice with input logprobs from two tokens before
    # the prefix's end; what lies before comes from the cache.
    question = words("zeta")
    q = len(tok.encode(question))
    choices = [" yes", " no", " maybe"]
    before = gauge(server, counter, "qwen-a")
    state = pick.run(question=question, choices=choices, backend=sgl.RuntimeEndpoint(url))
    assert state["answer"] in choices
    server.wait_idle()
    assert gauge(server, counter, "qwen-a") - before == 3 * ((q - 3) // BLOCK * BLOCK) > 0
