"""SGLang's native API against a real two-model server: /generate in all its shapes, streams,
logprobs, finish reasons, aborts, and the server endpoints, at the root and under /models/{name}.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest


def gen(server, body: dict, path: str = "/generate") -> dict | list:
    r = server.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream_chunks(server, body: dict, path: str = "/generate") -> list:
    chunks = []
    with httpx.stream("POST", server.url + path, json={**body, "stream": True},
                      headers=server.headers(), timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            chunks.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
    return chunks


GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


def test_generate_text_single_and_per_model_path(server):
    out = gen(server, {"text": "Hello world", "sampling_params": GREEDY, "model": "qwen-a"})
    assert set(out) >= {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert meta["completion_tokens"] == len(out["output_ids"]) == 8
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["prompt_tokens"] == 2 and meta["cached_tokens"] == 0
    assert meta["e2e_latency"] > 0 and isinstance(meta["id"], str)
    # The same request by the model's base URL, as SGLang clients send it (no model field).
    same = gen(server, {"text": "Hello world", "sampling_params": GREEDY},
               "/models/qwen-a/generate")
    assert same["output_ids"] == out["output_ids"] and same["text"] == out["text"]
    other = gen(server, {"text": "Hello world", "sampling_params": GREEDY},
                "/models/mixtral-b/generate")
    assert other["output_ids"] != out["output_ids"]  # a different model answered


def test_generate_input_ids_and_batch(server):
    tok = gen(server, {"text": "The quick brown fox", "sampling_params": GREEDY},
              "/models/qwen-a/generate")
    ids_prompt = [1015, 302, 87, 555]
    by_ids = gen(server, {"input_ids": ids_prompt, "sampling_params": GREEDY},
                 "/models/qwen-a/generate")
    assert by_ids["meta_info"]["prompt_tokens"] == 4
    batch = gen(server, {"text": ["The quick brown fox", "Hi"], "rid": ["b-0", "b-1"],
                         "sampling_params": [GREEDY, {**GREEDY, "max_new_tokens": 3}]},
                "/models/qwen-a/generate")
    assert isinstance(batch, list) and len(batch) == 2
    assert batch[0]["output_ids"] == tok["output_ids"]
    assert [b["meta_info"]["id"] for b in batch] == ["b-0", "b-1"]
    assert batch[1]["meta_info"]["completion_tokens"] == 3
    ids_batch = gen(server, {"input_ids": [ids_prompt, ids_prompt[:2]],
                             "sampling_params": GREEDY}, "/models/qwen-a/generate")
    assert ids_batch[0]["output_ids"] == by_ids["output_ids"]


def test_generate_n_samples(server):
    out = gen(server, {"text": "Hello", "rid": "nn", "sampling_params": {
        "max_new_tokens": 6, "temperature": 1.0, "n": 3, "sampling_seed": 7, "ignore_eos": True}},
        "/models/mixtral-b/generate")
    assert isinstance(out, list) and len(out) == 3
    assert [o["meta_info"]["id"] for o in out] == ["nn-0", "nn-1", "nn-2"]
    assert len({tuple(o["output_ids"]) for o in out}) > 1  # samples differ
    again = gen(server, {"text": "Hello", "sampling_params": {
        "max_new_tokens": 6, "temperature": 1.0, "n": 3, "sampling_seed": 7, "ignore_eos": True}},
        "/models/mixtral-b/generate")
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in out]  # seeded


def test_stream_is_cumulative_with_completion_tokens(server):
    body = {"text": "Hello world", "sampling_params": GREEDY}
    full = gen(server, body, "/models/qwen-a/generate")
    chunks = stream_chunks(server, body, "/models/qwen-a/generate")
    assert chunks[-1] == "[DONE]"
    data = chunks[:-1]
    counts = [c["meta_info"]["completion_tokens"] for c in data]
    assert counts == sorted(counts) and counts[-1] == 8
    assert all(len(c["output_ids"]) == c["meta_info"]["completion_tokens"] for c in data)
    texts = [c["text"] for c in data]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    assert texts[-1] == full["text"] and data[-1]["output_ids"] == full["output_ids"]
    assert data[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    assert all(c["meta_info"]["finish_reason"] is None for c in data[:-1])
    assert "index" not in data[0]


def test_batch_stream_carries_index(server):
    chunks = stream_chunks(server, {"text": ["Hello", "Good morning"],
                                    "sampling_params": {**GREEDY, "max_new_tokens": 4}},
                           "/models/mixtral-b/generate")
    assert chunks[-1] == "[DONE]"
    finals = {c["index"]: c for c in chunks[:-1] if c["meta_info"]["finish_reason"]}
    assert set(finals) == {0, 1}
    assert all(f["meta_info"]["completion_tokens"] == 4 for f in finals.values())


def test_logprobs_fields(server):
    out = gen(server, {"text": "The quick brown fox", "sampling_params": GREEDY,
                       "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3,
                       "return_text_in_logprobs": True}, "/models/qwen-a/generate")
    meta = out["meta_info"]
    n_prompt = meta["prompt_tokens"]
    inp, outp = meta["input_token_logprobs"], meta["output_token_logprobs"]
    assert len(inp) == n_prompt and inp[0][0] is None  # nothing predicts the first token
    assert all(e[0] <= 0 for e in inp[1:])
    assert [e[1] for e in outp] == out["output_ids"]
    assert all(isinstance(e[2], str) for e in inp + outp)
    assert len(meta["output_top_logprobs"]) == 8 and len(meta["output_top_logprobs"][0]) == 3
    # greedy: the chosen token is the most likely one
    assert all(top[0][1] == e[1] for top, e in zip(meta["output_top_logprobs"], outp))
    assert meta["input_top_logprobs"][0] is None
    plain = gen(server, {"text": "The quick brown fox", "sampling_params": GREEDY,
                         "return_logprob": True}, "/models/qwen-a/generate")["meta_info"]
    assert len(plain["input_token_logprobs"]) == 1  # default start: the last prompt token
    assert plain["output_token_logprobs"][0][2] is None  # no text unless asked


def test_finish_reasons_stop_string_and_token(server):
    base = gen(server, {"text": "Hello world", "sampling_params": {**GREEDY,
                                                                   "max_new_tokens": 12}},
               "/models/qwen-a/generate")
    ids, text = base["output_ids"], base["text"]
    stop_tok = ids[3]
    by_token = gen(server, {"text": "Hello world", "sampling_params": {
        **GREEDY, "max_new_tokens": 12, "stop_token_ids": [stop_tok]}}, "/models/qwen-a/generate")
    assert by_token["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}
    assert by_token["output_ids"] == ids[: ids.index(stop_tok) + 1]
    stop_str = text[len(text) // 2: len(text) // 2 + 3]
    by_str = gen(server, {"text": "Hello world", "sampling_params": {
        **GREEDY, "max_new_tokens": 12, "stop": [stop_str]}}, "/models/qwen-a/generate")
    assert by_str["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_str}
    assert by_str["text"] == text[: text.index(stop_str)]
    streamed = stream_chunks(server, {"text": "Hello world", "sampling_params": {
        **GREEDY, "max_new_tokens": 12, "stop": stop_str}}, "/models/qwen-a/generate")
    assert all(stop_str not in c["text"] for c in streamed[:-1])  # never shown, even partly
    assert streamed[-2]["text"] == by_str["text"]


def test_prefill_only_request(server):
    out = gen(server, {"text": "Hello world", "sampling_params": {"max_new_tokens": 0}},
              "/models/qwen-a/generate")
    assert out["output_ids"] == [] and out["text"] == ""
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}


def test_sglang_only_sampling_fields_accepted_at_their_defaults(server):
    out = gen(server, {"text": "Hi", "lora_path": None, "return_routed_experts": False,
                       "sampling_params": {**GREEDY, "regex": None, "json_schema": None,
                                           "spaces_between_special_tokens": True,
                                           "no_stop_trim": False, "min_new_tokens": 0,
                                           "top_k": 1073741824, "stream_interval": 1}},
              "/models/qwen-a/generate")
    assert out["meta_info"]["completion_tokens"] == 8


def test_abort_request_ends_a_stream(server):
    rid = "to-abort"
    body = {"text": "Hello", "rid": rid, "stream": True,
            "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    seen = []

    def abort_soon():
        server.post("/abort_request", json={"rid": rid})

    with httpx.stream("POST", server.url + "/models/qwen-a/generate", json=body,
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen.append(json.loads(line[6:]))
                if len(seen) == 2:
                    threading.Thread(target=abort_soon).start()
            elif line == "data: [DONE]":
                break
    last = seen[-1]["meta_info"]
    assert last["finish_reason"]["type"] == "abort"
    assert last["completion_tokens"] < 400
    assert server.wait_idle()["kv"]["used_pages"] == 0


def test_model_info_and_server_info(server):
    for path, name in (("/models/qwen-a/get_model_info", "qwen-a"),
                       ("/models/mixtral-b/model_info", "mixtral-b"),
                       ("/get_model_info?model=mixtral-b", "mixtral-b")):
        info = server.get(path).json()
        assert info["served_model_name"] == name
        assert info["model_path"] == server.paths[name] == info["tokenizer_path"]
        assert info["is_generation"] is True
    r = server.get("/get_model_info")  # two models, none named
    assert r.status_code == 400 and "qwen-a" in r.json()["error"]["message"]
    info = server.get("/get_server_info").json()
    assert [m["served_model_name"] for m in info["served_models"]] == ["qwen-a", "mixtral-b"]
    assert info["internal_states"][0]["kv"]["total_pages"] > 0
    assert server.get("/models/mixtral-b/server_info").json()["served_model_name"] == "mixtral-b"


def test_health_and_flush_cache(server):
    assert server.get("/health").status_code == 200
    assert server.get("/health_generate").status_code == 200
    assert server.get("/models/mixtral-b/health_generate").status_code == 200
    assert server.post("/flush_cache").status_code == 200
    assert server.get("/models/qwen-a/flush_cache").status_code == 200


@pytest.mark.parametrize("path", ["/v1/models", "/get_server_info"])
def test_endpoints_answer_json(server, path):
    assert server.get(path).headers["content-type"].startswith("application/json")
