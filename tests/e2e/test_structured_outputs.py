"""Structured outputs against a real server process: native `/generate` with `regex`,
`json_schema` and `ebnf`; the real `openai` client with `response_format`; the real `sglang`
frontend with `gen(regex=...)`, `gen(json_schema=...)` and `gen(dtype=...)`; bad grammars as
400s that leave the server serving.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest

jsonschema = pytest.importorskip("jsonschema")

MODELS = ["qwen-a", "mixtral-b"]
IP = r"((25[0-5]|2[0-4]\d|[01]?\d\d?)\.){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "sunny": {"type": "boolean"},
        "temps": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9},
                  "maxItems": 3},
    },
    "required": ["city", "sunny", "temps"],
}


def _generate(server, model: str, params, text="Answer:"):
    return server.post(f"/models/{model}/generate",
                       json={"text": text, "sampling_params": params})


@pytest.mark.parametrize("model", MODELS)
def test_native_regex_json_schema_and_ebnf(server, model):
    texts = [f"Q{i}:" for i in range(4)]
    outs = server.post(f"/models/{model}/generate", json={
        "text": texts, "sampling_params": {"regex": IP, "max_new_tokens": 48}}).json()
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop"
        assert re.fullmatch(IP, out["text"]), out["text"]
    for seed in range(3):
        out = _generate(server, model, {"json_schema": json.dumps(SCHEMA), "seed": seed,
                                        "max_new_tokens": 500}).json()
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
    out = _generate(server, model, {"ebnf": 'root ::= ("ab" | "cd")+ "!"', "seed": 1,
                                    "max_new_tokens": 64}).json()
    assert re.fullmatch(r"(ab|cd)+!", out["text"]), out["text"]


def test_native_stream_under_a_regex(server):
    body = {"text": "Phone:", "stream": True,
            "sampling_params": {"regex": r"\d{3}-\d{4}", "seed": 2}}
    with httpx.stream("POST", server.url + "/models/qwen-a/generate", json=body,
                      timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert re.fullmatch(r"\d{3}-\d{4}", chunks[-1]["text"])
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "stop"


def test_mixed_batch_over_http(server):
    greedy = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    alone = _generate(server, "qwen-a", greedy, "Hello").json()
    outs = server.post("/models/qwen-a/generate", json={
        "text": ["Hello", "Yes?", "Date:"],
        "sampling_params": [greedy, {"regex": "(yes|no)", "temperature": 0},
                            {"regex": r"20\d\d-(0[1-9]|1[0-2])", "seed": 3}]}).json()
    assert outs[0]["output_ids"] == alone["output_ids"]
    assert outs[1]["text"] in ("yes", "no")
    assert re.fullmatch(r"20\d\d-(0[1-9]|1[0-2])", outs[2]["text"])


@pytest.mark.parametrize("params, words", [
    ({"regex": "[0-9"}, ["regex", "invalid regex"]),
    ({"json_schema": "{oops"}, ["json_schema", "not valid JSON"]),
    ({"json_schema": '{"type": "integer", "minimum": 5, "maximum": 1}'}, ["json_schema"]),
    ({"ebnf": "root ::= other"}, ["ebnf", "other", "not defined"]),
])
def test_bad_grammars_are_400s_and_the_server_serves_on(server, params, words):
    r = _generate(server, "qwen-a", params)
    assert r.status_code == 400, r.text
    assert all(w in r.json()["error"]["message"] for w in words), r.text
    ok = _generate(server, "qwen-a", {"regex": "[ab]{4}", "seed": 0})
    assert ok.status_code == 200 and re.fullmatch("[ab]{4}", ok.json()["text"])
    assert server.wait_idle()["kv"]["used_pages"] == 0


# -- the openai client --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", MODELS)
def test_openai_response_format_json_schema(client, model):
    fmt = {"type": "json_schema",
           "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    for seed in range(2):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Weather in JSON?"}],
            response_format=fmt, max_tokens=500, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    r = client.completions.create(model=model, prompt="JSON:", max_tokens=500, seed=7,
                                  extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def test_openai_parse_with_a_pydantic_model(client):
    """The client's own structured-output helper: it sends a strict schema made from the
    model class and parses the answer back into it."""
    pydantic = pytest.importorskip("pydantic")
    from typing import Literal

    class Answer(pydantic.BaseModel):
        city: Literal["Paris", "Rome"]
        sunny: bool

    parse = getattr(client.chat.completions, "parse", None)
    if parse is None:
        pytest.skip("this openai client has no chat.completions.parse")
    r = parse(model="qwen-a", messages=[{"role": "user", "content": "Where?"}],
              response_format=Answer, max_tokens=300, seed=1)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Answer) and parsed.city in ("Paris", "Rome")


def test_openai_errors(client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError, match="response_format.type"):
        client.chat.completions.create(
            model="qwen-a", messages=[{"role": "user", "content": "x"}],
            response_format={"type": "yaml"})
    with pytest.raises(openai.BadRequestError, match="Unsupported type"):
        client.chat.completions.create(
            model="qwen-a", messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "bogus"}}})


# -- the sglang frontend ------------------------------------------------------------------------


sgl = pytest.importorskip("sglang")


@sgl.function
def constrained(s, schema: str):
    s += "Server address: " + sgl.gen("ip", regex=IP, temperature=0) + "\n"
    s += "Hours in a day: " + sgl.gen("hours", dtype=int, max_tokens=8) + "\n"
    s += "Pi: " + sgl.gen("pi", dtype=float, max_tokens=8) + "\n"
    s += "True? " + sgl.gen("flag", dtype=bool) + "\n"
    s += "Weather: " + sgl.gen("weather", json_schema=schema, max_tokens=500) + "\n"
    s += "Pick: " + sgl.select("pick", choices=["red", "blue"])


@pytest.fixture(scope="module")
def frontend_server(model_paths, launch_module_server):
    """A server of its own: `weather` is sampled from the engine's one generator, so on the
    session server whether the JSON closes within the context depended on every sampled
    request that any earlier test had sent."""
    return launch_module_server(model_paths)


@pytest.mark.parametrize("model", MODELS)
def test_sglang_frontend_constraints(frontend_server, model):
    backend = sgl.RuntimeEndpoint(f"{frontend_server.url}/models/{model}")
    state = constrained.run(schema=json.dumps(SCHEMA), backend=backend)
    assert re.fullmatch(IP, state["ip"]), state["ip"]
    int(state["hours"])
    float(state["pi"])
    assert state["flag"] in ("True", "False")
    jsonschema.validate(json.loads(state["weather"]), SCHEMA)
    assert state["pick"] in ("red", "blue")
