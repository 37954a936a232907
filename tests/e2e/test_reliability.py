"""Reliability against a real server: what a hostile or careless client sends gets a 4xx and the
server serves on; a dead FFN server makes /health say 503; SIGTERM drains the requests in flight
within --shutdown-timeout, exits 0 and leaves no temp folder or shared-memory segment behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from sglang_crosspool.testing.faults import ffn_server_pids

OK_BODY = {"text": "Hello", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
CHAT = {"model": "qwen-a", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


def still_serves(server) -> None:
    r = server.post("/models/qwen-a/generate", json=OK_BODY)
    assert r.status_code == 200, r.text
    assert server.get("/health").status_code == 200


def sp(**params) -> dict:
    return {"text": "Hello", "sampling_params": {"max_new_tokens": 2, **params}}


HOSTILE = [
    # (name, path, body (dict or raw bytes), status, words the error message must contain)
    ("seed over 64 bits", "/models/qwen-a/generate", sp(seed=2**64), 400, ["seed"]),
    ("seed under int64", "/v1/chat/completions", {**CHAT, "seed": -(2**63) - 1}, 400, ["seed"]),
    ("repetition_penalty 1e-45", "/models/qwen-a/generate", sp(repetition_penalty=1e-45), 400,
     ["repetition_penalty"]),
    ("temperature Infinity", "/models/qwen-a/generate",
     b'{"text": "a", "sampling_params": {"temperature": Infinity}}', 400, ["temperature"]),
    ("top_p NaN", "/v1/completions", b'{"model": "qwen-a", "prompt": "a", "top_p": NaN}', 400,
     ["top_p"]),
    ("n in the hundred thousands", "/v1/chat/completions", {**CHAT, "n": 100_000}, 400,
     ["n", "--max-n"]),
    ("lone surrogate in text", "/models/qwen-a/generate", b'{"text": "a\\ud800b"}', 400,
     ["surrogate"]),
    ("lone surrogate in a chat message", "/v1/chat/completions",
     b'{"model": "qwen-a", "messages": [{"role": "user", "content": "\\udc00"}]}', 400,
     ["surrogate"]),
    ("JSON nested 100000 deep", "/models/qwen-a/generate",
     b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, ["deep"]),
    ("chat stream 'yes'", "/v1/chat/completions", {**CHAT, "stream": "yes"}, 400, ["stream"]),
    ("completions stream 1", "/v1/completions", {"model": "qwen-a", "prompt": "a", "stream": 1},
     400, ["stream"]),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_values_are_refused_and_the_server_serves_on(server, case):
    _, path, body, status, words = case
    r = server.send(path, body)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    for word in words:
        assert word in message, message
    still_serves(server)


@pytest.mark.parametrize("params", [{"temperature": 1e-40}, {"seed": 2**64 - 1, "n": 2},
                                    {"repetition_penalty": 1e-6, "temperature": 1e-5}])
def test_extreme_but_valid_values_generate(server, params):
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 3, "ignore_eos": True,
                                                 **params}}
    r = server.post("/models/qwen-a/generate", json=body)
    assert r.status_code == 200, r.text
    outs = r.json() if isinstance(r.json(), list) else [r.json()]
    assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
    still_serves(server)


def test_no_error_logged_on_client_disconnects(server):
    long = {"max_new_tokens": 300, "ignore_eos": True}
    before = server.log.read_text()
    with httpx.stream("POST", server.url + "/models/qwen-a/generate", timeout=30,
                      json={"text": "Hi", "stream": True, "sampling_params": long}) as r:
        next(line for line in r.iter_lines() if line.startswith("data: {"))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/models/qwen-a/generate", timeout=0.3,
                   json={"text": "Hi", "sampling_params": long})
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n{\"text\": \"")  # then gone mid-body
    assert server.wait_idle()["kv"]["used_pages"] == 0
    still_serves(server)
    new = server.log.read_text()[len(before):]
    assert "ERROR" not in new and "Traceback" not in new, new


def test_an_aborted_chat_stream_ends_the_openai_way(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(
        model="qwen-a", messages=[{"role": "user", "content": "hi"}], stream=True,
        max_tokens=400, extra_body={"ignore_eos": True})
    reasons = []
    with pytest.raises(openai.APIError, match="aborted"):
        for i, chunk in enumerate(stream):
            if i == 2:
                server.post("/abort_request", json={"abort_all": True, "message": "enough"})
            reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
    assert reasons == ["stop"]  # an OpenAI finish reason, then the error (which the client raises)
    still_serves(server)


# -- servers of their own: body limit and SIGTERM, FFN-server death ----------------------------


@pytest.fixture
def private_tmp(monkeypatch):
    """A short private temp dir for the server (ZeroMQ's IPC paths must stay short)."""
    path = Path(tempfile.mkdtemp(prefix="rel", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _stream_lines(url: str, body: dict, out: list, started: threading.Event) -> None:
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                started.set()
            if line:
                out.append(line)


def _sigterm_and_wait(s) -> float:
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    s.proc.wait(timeout=30)
    return time.monotonic() - t0


def test_body_limit_then_sigterm_drains_and_cleans_up(model_paths, launch_server, private_tmp):
    s = launch_server({"qwen-a": model_paths["qwen-a"]}, "--skip-server-warmup",
                      "--max-request-bytes", "4096", "--shutdown-timeout", "2",
                      "--max-running-requests", "1")
    big = {"text": "x" * 5000}
    r = s.post("/models/qwen-a/generate", json=big)
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"]
    r = httpx.post(s.url + "/generate", content=iter([b'{"text": "', b"y" * 5000, b'"}']),
                   headers={"content-type": "application/json"}, timeout=30)  # chunked
    assert r.status_code == 413
    still_serves(s)

    # One short request runs; six long ones queue behind it (one runs at a time).
    short, long_outs, started = [], [[] for _ in range(6)], threading.Event()
    url = s.url + "/generate"
    body = {"text": "Hi", "stream": True, "sampling_params": {"ignore_eos": True}}
    threads = [threading.Thread(target=_stream_lines, args=(url, {
        **body, "sampling_params": {"ignore_eos": True, "max_new_tokens": 20}}, short, started))]
    threads += [threading.Thread(target=_stream_lines, args=(url, {
        **body, "sampling_params": {"ignore_eos": True, "max_new_tokens": 500}}, out,
        threading.Event())) for out in long_outs]
    plain = {}  # a long request not streamed: it gets the error's status

    def not_streamed():
        plain["r"] = httpx.post(url, timeout=60, json={
            "text": "Hi", "sampling_params": {"ignore_eos": True, "max_new_tokens": 500}})

    threads.append(threading.Thread(target=not_streamed))
    threads[0].start()
    assert started.wait(30)
    for t in threads[1:-1]:
        t.start()
    time.sleep(0.2)  # the long streamed ones are queued first ...
    threads[-1].start()  # ... so the plain one waits behind six times 500 tokens
    time.sleep(0.3)
    took = _sigterm_and_wait(s)
    for t in threads:
        t.join(timeout=30)
    assert plain["r"].status_code == 503, plain["r"].text
    assert "shut down" in plain["r"].json()["error"]["message"]
    assert s.proc.returncode == 0, s.log.read_text()
    assert 1.5 < took < 2 + 20, took  # waited for the requests, then no longer than needed
    assert '"length"' in short[-2] and short[-1] == "data: [DONE]"  # finished in time
    cut = [out for out in long_outs if "shut down" in "".join(out)]
    assert cut, long_outs  # the rest ended with an error
    assert all(out[-1] == "data: [DONE]" for out in long_outs)
    assert not list(private_tmp.iterdir()), list(private_tmp.iterdir())
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health", timeout=2)


@pytest.mark.skipif(not Path("/proc").is_dir() or not Path("/dev/shm").is_dir(),
                    reason="reads /proc and /dev/shm")
def test_a_dead_ffn_server_is_503_then_restarted_and_shutdown_is_clean(model_paths,
                                                                      launch_server,
                                                                      private_tmp):
    s = launch_server({"qwen-a": model_paths["qwen-a"]}, "--skip-server-warmup",
                      "--pool-mode", "crosspool", "--ffn-servers", "2", "--ffn-transport", "shm")
    greedy = {"text": "Hello", "sampling_params": {"max_new_tokens": 8, "temperature": 0,
                                                   "ignore_eos": True}}
    before = s.post("/models/qwen-a/generate", json=greedy).json()["output_ids"]
    scheduler = s.internal_state()["scheduler_pid"]
    servers = ffn_server_pids(scheduler)
    assert len(servers) == 2
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"cp{scheduler}-")]
    os.kill(servers[1], signal.SIGKILL)
    r = s.post("/models/qwen-a/generate", json=greedy)  # the step or the idle check sees it
    assert r.status_code == 503 and "FFN server 1" in r.json()["error"]["message"], r.text
    assert s.get("/health").status_code == 503  # while it restarts
    deadline = time.monotonic() + 90
    while s.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "the dead FFN server was not restarted"
        time.sleep(0.2)
    after = s.post("/models/qwen-a/generate", json=greedy)
    assert after.status_code == 200 and after.json()["output_ids"] == before
    restarted = ffn_server_pids(scheduler)
    assert len(restarted) == 2 and servers[0] in restarted and servers[1] not in restarted
    assert _sigterm_and_wait(s) < 20
    assert s.proc.returncode == 0, s.log.read_text()
    assert not list(private_tmp.iterdir()), list(private_tmp.iterdir())
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"cp{scheduler}-")]
    assert not any(Path(f"/proc/{p}").exists() for p in restarted)


def test_a_huge_prompt_does_not_stall_the_event_loop(server):
    """The prompt is tokenized in a worker thread: /health answers meanwhile."""
    text = "hello world, a long prompt " * 80_000  # 2 MB: seconds of tokenizing
    result = {}

    def huge():
        result["r"] = server.post("/models/qwen-a/generate", json={"text": text})

    t = threading.Thread(target=huge)
    t.start()
    time.sleep(0.2)
    answered_meanwhile = 0
    while t.is_alive():
        if server.get("/health").status_code == 200 and t.is_alive():
            answered_meanwhile += 1
        time.sleep(0.05)
    t.join()
    assert "context length" in result["r"].json()["error"]["message"]
    assert answered_meanwhile >= 2
