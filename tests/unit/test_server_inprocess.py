"""The HTTP app in the in-process mode (scheduler loop in a thread, same messages, no sockets):
the fast check of the API layers, without a server process.
"""

from __future__ import annotations

import json

import pytest

for _module in ("fastapi", "zmq", "prometheus_client"):  # listed in requirements-server.txt
    pytest.importorskip(_module)

from fastapi.testclient import TestClient  # noqa: E402

from sglang_crosspool.server.engine_client import InProcessEngineClient  # noqa: E402
from sglang_crosspool.server.http_server import create_app  # noqa: E402
from sglang_crosspool.server_args import ServerArgs  # noqa: E402


@pytest.fixture(scope="module")
def client(tiny_models):
    args = ServerArgs.from_cli(["--model", f"a={tiny_models['olmoe']}",
                                "--model", f"b={tiny_models['qwen2_moe']}",
                                "--default-model", "b", "--skip-server-warmup"])
    config = args.engine_config()
    engine = InProcessEngineClient(args, config)
    with TestClient(create_app(args, config, engine)) as c:
        yield c
    engine.close()


GREEDY = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}


def test_generate_in_process_matches_the_engine(client, tiny_models):
    out = client.post("/models/a/generate", json={"text": "Hello world",
                                                  "sampling_params": GREEDY}).json()
    from sglang_crosspool import Engine

    with Engine([tiny_models["olmoe"]]) as engine:
        ids = engine.tokenizer().encode("Hello world")
        ref = engine.generate(input_ids=ids, sampling_params=GREEDY)
    assert out["output_ids"] == ref["output_ids"] and out["text"] == ref["text"]


def test_default_model_takes_requests_without_a_model(client):
    by_default = client.post("/generate", json={"text": "Hi", "sampling_params": GREEDY}).json()
    by_name = client.post("/generate", json={"text": "Hi", "model": "b",
                                             "sampling_params": GREEDY}).json()
    assert by_default["output_ids"] == by_name["output_ids"]


def test_stream_in_process(client):
    with client.stream("POST", "/models/a/generate",
                       json={"text": "Hi", "stream": True, "sampling_params": GREEDY}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["meta_info"]["completion_tokens"] == 5


def test_openai_in_process(client):
    out = client.post("/v1/chat/completions", json={
        "model": "a", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
        "temperature": 0, "ignore_eos": True}).json()
    assert out["usage"]["completion_tokens"] == 3
    assert client.get("/v1/models").json()["data"][1]["id"] == "b"


def test_errors_in_process(client):
    r = client.post("/models/zz/generate", json={"text": "x"})
    assert r.status_code == 404 and "a, b" in r.json()["error"]["message"]
    r = client.post("/models/a/generate", json={"text": "x", "sampling_params": {"foo": 1}})
    assert r.status_code == 400 and "foo" in r.json()["error"]["message"]
    r = client.post("/models/a/generate", json={"input_ids": list(range(1, 600))})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    info = client.get("/server_info").json()["internal_states"][0]
    assert info["kv"]["used_pages"] == 0 and info["in_flight"] == 0
