"""Errors, not crashes: every error case answers its status and a message naming the problem;
afterwards the server still serves and, once idle, holds no KV page.
"""

from __future__ import annotations

import os
import signal
import threading

import httpx
import pytest

OK_BODY = {"text": "Hello", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}


def still_serves(server) -> None:
    r = server.post("/models/qwen-a/generate", json=OK_BODY)
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["completion_tokens"] == 2
    assert server.wait_idle()["kv"]["used_pages"] == 0


def error_of(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status
    return err["message"]


CASES = [
    # (name, method, path, body or raw bytes, status, words the message must contain)
    ("unknown model in path", "/models/nope/generate", OK_BODY, 404,
     ["'nope'", "qwen-a", "mixtral-b"]),
    ("unknown model in body", "/generate", {**OK_BODY, "model": "nope"}, 404,
     ["qwen-a", "mixtral-b"]),
    ("no model with two served", "/generate", OK_BODY, 400, ["model", "qwen-a"]),
    ("malformed JSON", "/models/qwen-a/generate", b"{not json", 400, ["JSON"]),
    ("body not an object", "/models/qwen-a/generate", b"[1, 2]", 400, ["object"]),
    ("no prompt", "/models/qwen-a/generate", {"sampling_params": {}}, 400,
     ["text", "input_ids"]),
    ("both prompts", "/models/qwen-a/generate", {"text": "a", "input_ids": [1]}, 400,
     ["text", "input_ids"]),
    ("unknown sampling field", "/models/qwen-a/generate",
     {"text": "a", "sampling_params": {"temprature": 0.5}}, 400, ["temprature"]),
    ("bad temperature", "/models/qwen-a/generate",
     {"text": "a", "sampling_params": {"temperature": -1}}, 400, ["temperature"]),
    ("bad top_p", "/models/qwen-a/generate",
     {"text": "a", "sampling_params": {"top_p": 0}}, 400, ["top_p"]),
    ("bad max_new_tokens", "/models/qwen-a/generate",
     {"text": "a", "sampling_params": {"max_new_tokens": "ten"}}, 400, ["max_new_tokens"]),
    ("invalid regex", "/models/qwen-a/generate",
     {"text": "a", "sampling_params": {"regex": "([0-9]+"}}, 400, ["regex", "parenthesis"]),
    ("two constraints", "/models/qwen-a/generate",
     {"text": "a", "sampling_params": {"regex": "a", "json_schema": "{}"}}, 400,
     ["regex", "json_schema"]),
    ("token id out of range", "/models/qwen-a/generate", {"input_ids": [1, 99999]}, 400,
     ["input_ids"]),
    ("empty token list", "/models/qwen-a/generate", {"input_ids": []}, 400, ["empty"]),
    ("prompt too long", "/models/qwen-a/generate", {"input_ids": [5] * 600}, 400,
     ["context length", "600"]),
    ("bad logprob_start_len", "/models/qwen-a/generate",
     {"text": "a", "return_logprob": True, "logprob_start_len": 99}, 400,
     ["logprob_start_len"]),
    ("wrong list length", "/models/qwen-a/generate",
     {"text": ["a", "b"], "sampling_params": [{}, {}, {}]}, 400, ["sampling_params"]),
    ("stream not a bool", "/models/qwen-a/generate", {"text": "a", "stream": "yes"}, 400,
     ["stream"]),
    ("openai unknown model", "/v1/completions", {"model": "nope", "prompt": "a"}, 404,
     ["qwen-a"]),
    ("openai bad max_tokens", "/v1/completions",
     {"model": "qwen-a", "prompt": "a", "max_tokens": -3}, 400, ["max_tokens"]),
    ("openai no messages", "/v1/chat/completions", {"model": "qwen-a", "messages": []}, 400,
     ["messages"]),
    ("openai bad n", "/v1/chat/completions",
     {"model": "qwen-a", "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, ["n"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_error_case(server, case):
    _, path, body, status, words = case
    r = server.send(path, body)
    message = error_of(r, status)
    for word in words:
        assert word in message, message
    still_serves(server)


def test_duplicate_rid_in_flight(server):
    body = {"text": "Hello", "rid": "dup", "stream": True,
            "sampling_params": {"max_new_tokens": 300, "ignore_eos": True}}
    with httpx.stream("POST", server.url + "/models/qwen-a/generate", json=body,
                      timeout=60) as r:
        lines = r.iter_lines()  # NOTE: dropping this iterator would close the connection
        next(line for line in lines if line.startswith("data: {"))
        again = server.post("/models/qwen-a/generate", json={**body, "stream": False})
        assert "dup" in error_of(again, 400)
        server.post("/abort_request", json={"rid": "dup"})
        last = [line for line in lines if line.startswith("data: {")][-1]
        assert '"abort"' in last
    still_serves(server)


@pytest.mark.parametrize("path", ["/models/qwen-a/generate", "/v1/chat/completions",
                                  "/v1/completions"])
def test_client_disconnect_mid_stream_frees_kv(server, path):
    if path == "/models/qwen-a/generate":
        body = {"text": "Hello", "stream": True,
                "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    elif path.endswith("chat/completions"):
        body = {"model": "qwen-a", "stream": True, "max_tokens": 400, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Hello"}]}
    else:
        body = {"model": "qwen-a", "stream": True, "max_tokens": 400, "ignore_eos": True,
                "prompt": "Hello"}
    aborted = _counter(server, "sglang:num_aborted_requests_total", "qwen-a")
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                got += 1
            if got == 2:
                assert server.internal_state()["kv"]["used_pages"] > 0  # still running
            if got == 3:
                break  # this closes the connection
    # The client is gone: the request must be aborted and its pages freed.
    state = server.wait_idle()
    assert state["kv"]["used_pages"] == 0 and state["in_flight"] == 0
    assert _counter(server, "sglang:num_aborted_requests_total", "qwen-a") == aborted + 1
    still_serves(server)


def test_client_disconnect_while_waiting_non_streamed(server):
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/models/qwen-a/generate", json=body, timeout=0.5)
    state = server.wait_idle()
    assert state["kv"]["used_pages"] == 0 and state["in_flight"] == 0
    still_serves(server)


def _counter(server, name: str, model: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = server.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.get("model_name") == model:
                return s.value
    raise AssertionError(f"{name} not in /metrics")


# -- API key and saturation: a second server with --api-key and a queue limit -----------------


def test_api_key(limited_server):
    url = limited_server.url
    r = httpx.post(url + "/generate", json=OK_BODY, timeout=30)
    assert "API key" in error_of(r, 401)
    r = httpx.post(url + "/generate", json=OK_BODY, timeout=30,
                   headers={"Authorization": "Bearer wrong"})
    error_of(r, 401)
    r = httpx.get(url + "/v1/models", timeout=30)
    error_of(r, 401)
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    assert httpx.get(url + "/metrics", timeout=30).status_code == 200
    r = limited_server.post("/generate", json=OK_BODY)  # one model: no model field needed
    assert r.status_code == 200
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test-key", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["qwen-a"]


def test_saturation_503_with_retry_after(limited_server):
    s = limited_server
    long_body = {"text": "Hello", "stream": True,
                 "sampling_params": {"max_new_tokens": 300, "ignore_eos": True}}
    streams = []
    ready = threading.Barrier(3)

    def hold(i):
        with httpx.stream("POST", s.url + "/generate", json={**long_body, "rid": f"hold-{i}"},
                          headers=s.headers(), timeout=60) as r:
            assert r.status_code == 200  # the headers come once the request is admitted
            ready.wait()
            for _ in r.iter_lines():
                pass
            streams.append(i)

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    ready.wait(timeout=60)  # one request runs, one waits: the limit is reached
    r = s.post("/generate", json=OK_BODY)
    assert "saturated" in error_of(r, 503)
    assert r.headers["retry-after"] == "1"
    s.post("/abort_request", json={"abort_all": True})
    for t in threads:
        t.join(timeout=60)
    assert sorted(streams) == [0, 1]
    state = s.wait_idle()
    assert state["kv"]["used_pages"] == 0
    assert s.post("/generate", json=OK_BODY).status_code == 200


# -- a dead scheduler brings the server down ----------------------------------------------------


def test_dead_scheduler_stops_the_server(model_paths, launch_server):
    s = launch_server({"qwen-a": model_paths["qwen-a"]}, "--skip-server-warmup")
    pid = s.internal_state()["scheduler_pid"]
    os.kill(pid, signal.SIGKILL)
    s.proc.wait(timeout=30)
    assert s.proc.returncode == 1
    log = s.log.read_text()
    assert f"the scheduler process (pid {pid}) died" in log, log
    assert "shutting the server down" in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health", timeout=2)
