"""Constraints through the HTTP APIs, in-process (scheduler loop in a thread): native
`regex`/`json_schema`/`ebnf`, OpenAI `response_format`, 400s for bad grammars, and the
`--grammar-backend none` and `--constrained-json-disable-any-whitespace` flags.
"""

from __future__ import annotations

import json
import re

import pytest

for _module in ("fastapi", "zmq", "prometheus_client"):  # listed in requirements-server.txt
    pytest.importorskip(_module)
jsonschema = pytest.importorskip("jsonschema")

from fastapi.testclient import TestClient  # noqa: E402

from sglang_crosspool.server.engine_client import InProcessEngineClient  # noqa: E402
from sglang_crosspool.server.http_server import create_app  # noqa: E402
from sglang_crosspool.server_args import ServerArgs  # noqa: E402

SCHEMA = {"type": "object",
          "properties": {"city": {"enum": ["Paris", "Rome"]},
                         "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "rank"]}


def _client(path: str, *flags: str):
    args = ServerArgs.from_cli(["--model", f"m={path}", "--skip-server-warmup", *flags])
    config = args.engine_config()
    engine = InProcessEngineClient(args, config)
    return TestClient(create_app(args, config, engine)), engine


@pytest.fixture(scope="module")
def client(tiny_models):
    c, engine = _client(tiny_models["qwen2_moe"], "--constrained-json-disable-any-whitespace")
    with c:
        yield c
    engine.close()


def _generate(client, params: dict, text: str = "Q:"):
    return client.post("/generate", json={"text": text, "sampling_params": params})


def test_native_regex_json_schema_and_ebnf(client):
    out = _generate(client, {"regex": r"[0-9]{3}-[0-9]{4}", "seed": 1}).json()
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", out["text"])
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    out = _generate(client, {"json_schema": json.dumps(SCHEMA), "seed": 2}).json()
    assert out["text"].startswith('{"city": ')  # compact separators (the server's flag)
    jsonschema.validate(json.loads(out["text"]), SCHEMA)
    out = _generate(client, {"ebnf": 'root ::= "a" ("b" | "c")+ "."', "seed": 3,
                             "max_new_tokens": 64}).json()
    assert re.fullmatch(r"a[bc]+\.", out["text"])


def test_native_batch_mixes_constrained_and_free(client):
    outs = client.post("/generate", json={"text": ["Q:", "Q:"], "sampling_params": [
        {"regex": "(on|off)", "temperature": 0},
        {"max_new_tokens": 4, "ignore_eos": True}]}).json()
    assert outs[0]["text"] in ("on", "off")
    assert outs[1]["meta_info"]["completion_tokens"] == 4


@pytest.mark.parametrize("params, message", [
    ({"regex": "(abc"}, "The parenthesis is not closed"),
    ({"json_schema": '{"type": "nonsense"}'}, 'Unsupported type \\"nonsense\\"'),
    ({"ebnf": "root ::= nowhere"}, 'Rule \\"nowhere\\" is not defined'),
    ({"regex": "a", "ebnf": 'root ::= "a"'}, "at most one of regex, json_schema and ebnf"),
])
def test_bad_grammars_are_400s(client, params, message):
    r = _generate(client, params)
    assert r.status_code == 400, r.text
    assert message in r.text
    ok = _generate(client, {"regex": "[xy]{2}", "seed": 0})
    assert ok.status_code == 200 and re.fullmatch("[xy]{2}", ok.json()["text"])


def test_openai_response_format(client):
    body = {"model": "m", "max_tokens": 100, "seed": 4, "messages": [
        {"role": "user", "content": "Which city?"}]}
    r = client.post("/v1/chat/completions", json={**body, "response_format": {
        "type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA,
                                               "strict": True}}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    r = client.post("/v1/completions", json={
        "model": "m", "prompt": "JSON:", "max_tokens": 100, "seed": 5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c",
                                                                   "schema": SCHEMA}}})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), SCHEMA)
    r = client.post("/v1/chat/completions", json={**body, "response_format": {"type": "text"},
                                                  "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_openai_json_object(client):
    r = client.post("/v1/chat/completions", json={
        "model": "m", "max_tokens": 60, "seed": 0, "response_format": {"type": "json_object"},
        "messages": [{"role": "user", "content": "JSON please"}]})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:
        assert choice["message"]["content"].startswith("{")


@pytest.mark.parametrize("fmt, message", [
    ({"type": "xml"}, "response_format.type: expected one of text, json_object, json_schema"),
    ("json", "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
     "Unsupported type"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
     "response_format.json_schema.strict"),
])
def test_openai_bad_response_format_is_400(client, fmt, message):
    r = client.post("/v1/chat/completions", json={
        "model": "m", "response_format": fmt, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


def test_grammar_flags_reach_the_engine_config(tiny_models):
    path = tiny_models["qwen2_moe"]
    config = ServerArgs.from_cli(["--model", f"m={path}"]).engine_config()
    assert config.grammar_backend == "xgrammar"
    assert not config.constrained_json_disable_any_whitespace and not config.grammar_jump_forward
    config = ServerArgs.from_cli(["--model", f"m={path}", "--grammar-backend", "none",
                                  "--constrained-json-disable-any-whitespace",
                                  "--grammar-jump-forward"]).engine_config()
    assert config.grammar_backend == "none"
    assert config.constrained_json_disable_any_whitespace and config.grammar_jump_forward


def test_grammar_backend_none(tiny_models):
    c, engine = _client(tiny_models["qwen2_moe"], "--grammar-backend", "none")
    with c:
        r = _generate(c, {"regex": "a"})
        assert r.status_code == 400 and "--grammar-backend none" in r.text
        r = c.post("/v1/chat/completions", json={
            "model": "m", "response_format": {"type": "json_object"},
            "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400
        assert _generate(c, {"max_new_tokens": 2}).status_code == 200
    engine.close()
