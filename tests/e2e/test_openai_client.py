"""The real `openai` client against a two-model server: chat and completions, streamed and not,
usage, stop, n, logprobs, seed, and errors in OpenAI's shape.
"""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

MODELS = ["qwen-a", "mixtral-b"]
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_listed(client):
    assert [m.id for m in client.models.list().data] == MODELS
    assert client.models.retrieve("mixtral-b").id == "mixtral-b"


@pytest.mark.parametrize("model", MODELS)
def test_chat_plain_and_streamed_agree(client, server, model):
    kw = {"model": model, "messages": CHAT, "max_tokens": 8, "temperature": 0,
              "extra_body": {"ignore_eos": True}}
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert full.model == model and full.object == "chat.completion"
    assert full.usage.completion_tokens == 8
    assert full.usage.total_tokens == full.usage.prompt_tokens + 8
    # The chat template is applied: the prompt is the ChatML text of the conversation.
    tok = server.post(f"/models/{model}/generate", json={
        "text": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}).json()
    assert tok["meta_info"]["prompt_tokens"] == full.usage.prompt_tokens
    assert tok["text"] == choice.message.content

    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == choice.message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "length" and all(f is None for f in finish[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    no_usage = list(client.chat.completions.create(**kw, stream=True))
    assert all(c.usage is None for c in no_usage)


@pytest.mark.parametrize("model", MODELS)
def test_completions_plain_and_streamed(client, model):
    kw = {"model": model, "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0,
              "extra_body": {"ignore_eos": True}}
    full = client.completions.create(**kw)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 6
    streamed = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == full.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_completions_batch_n_logprobs_echo(client):
    out = client.completions.create(model="qwen-a", prompt=["Hello", "Good morning"], n=2,
                                    max_tokens=4, temperature=0.8, seed=3, logprobs=2,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4 and len(lp.top_logprobs[0]) <= 2
    assert "".join(lp.tokens) == out.choices[0].text
    assert out.usage.completion_tokens == 16
    again = client.completions.create(model="qwen-a", prompt=["Hello", "Good morning"], n=2,
                                      max_tokens=4, temperature=0.8, seed=3,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded
    echo = client.completions.create(model="qwen-a", prompt="Hello", max_tokens=2, echo=True,
                                     temperature=0)
    assert echo.choices[0].text.startswith("Hello")
    ids = client.completions.create(model="qwen-a", prompt=[995, 758], max_tokens=3,
                                    temperature=0)
    assert ids.usage.prompt_tokens == 2


def test_chat_stop_n_logprobs(client):
    base = client.chat.completions.create(model="mixtral-b", messages=CHAT, max_tokens=12,
                                          temperature=0, extra_body={"ignore_eos": True})
    text = base.choices[0].message.content
    stop = text[5:8]
    cut = client.chat.completions.create(model="mixtral-b", messages=CHAT, max_tokens=12,
                                         temperature=0, stop=[stop],
                                         extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    many = client.chat.completions.create(model="mixtral-b", messages=CHAT,
                                          max_completion_tokens=5, n=3, temperature=1.0, seed=1,
                                          logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    assert len(many.choices) == 3
    content = many.choices[0].logprobs.content
    assert len(content) == 5 and len(content[0].top_logprobs) == 2
    assert "".join(t.token for t in content) == many.choices[0].message.content
    assert many.usage.completion_tokens == 15


def test_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert "qwen-a" in e.value.message and "mixtral-b" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen-a", messages=CHAT, temperature=-1)
    assert "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="qwen-a", prompt="x " * 600, max_tokens=1)
    assert "context length" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen-a", messages=[{"role": "wizard",
                                                                  "content": "hi"}])
    assert "role" in e.value.message
