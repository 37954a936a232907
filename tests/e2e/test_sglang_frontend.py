"""The real `sglang` frontend language against `/models/{name}` of a two-model server:
multi-turn `sgl.gen`, `sgl.select` (checked against scoring the choices by hand with the
in-process engine), and `fork`.
"""

from __future__ import annotations

import pytest

sgl = pytest.importorskip("sglang")

MODELS = ["qwen-a", "mixtral-b"]


@sgl.function
def multi_turn(s, q1, q2):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(q1)
    s += sgl.assistant(sgl.gen("a1", max_tokens=8, temperature=0, ignore_eos=True))
    s += sgl.user(q2)
    s += sgl.assistant(sgl.gen("a2", max_tokens=8, temperature=0, ignore_eos=True))


@sgl.function
def pick(s, question, choices):
    s += question
    s += sgl.select("answer", choices=choices)


@sgl.function
def forked(s):
    s += "Tell me about"
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f" topic {i}:" + sgl.gen("d", max_tokens=6, temperature=0, ignore_eos=True)
    forks.join()
    s += " First:" + forks[0]["d"] + " Second:" + forks[1]["d"]


def _direct(server, model: str, text: str, max_new: int) -> str:
    r = server.post(f"/models/{model}/generate", json={
        "text": text, "sampling_params": {"max_new_tokens": max_new, "temperature": 0,
                                          "ignore_eos": True}})
    assert r.status_code == 200, r.text
    return r.json()["text"]


@pytest.fixture(scope="module")
def engine(model_paths):
    """The in-process engine on the same checkpoints, for scoring by hand."""
    from sglang_crosspool import Engine

    e = Engine(list(model_paths.values()), served_model_name=list(model_paths), device="cpu")
    yield e
    e.shutdown()


def hand_select(engine, model: str, prefix: str, choices: list[str]) -> str:
    """The choice with the best mean token logprob, the frontend's default rule, computed from
    the engine's input logprobs (with the frontend's token-healing correction)."""
    tok = engine.tokenizer(model)
    start = max(len(tok.encode(prefix)) - 2, 0)
    scores = []
    for choice in choices:
        ids = tok.encode(prefix + choice)
        out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0},
                              return_logprob=True, logprob_start_len=start, model=model)
        entries = out["meta_info"]["input_token_logprobs"]
        values = [lp for lp, _, _ in entries]
        if prefix.endswith(tok.decode([entries[0][1]])):
            values = values[1:]  # the frontend drops a token the prefix already ends with
        scores.append(sum(values) / len(values))
    return choices[max(range(len(choices)), key=scores.__getitem__)]


@pytest.mark.parametrize("model", MODELS)
def test_multi_turn_gen(server, model):
    backend = sgl.RuntimeEndpoint(f"{server.url}/models/{model}")
    assert backend.get_model_name() == server.paths[model]
    state = multi_turn.run(q1="What is the capital of France?", q2="And of Germany?",
                           backend=backend)
    text = state.text()
    a1, a2 = state["a1"], state["a2"]
    assert a1 and a2 and a1 in text and a2 in text
    # Each answer is what the model says, greedily, to the conversation before it.
    assert a1 == _direct(server, model, text[: text.index(a1)], 8)
    assert a2 == _direct(server, model, text[: text.rindex(a2)], 8)


@pytest.mark.parametrize("model", MODELS)
def test_select_matches_scoring_by_hand(server, engine, model):
    backend = sgl.RuntimeEndpoint(f"{server.url}/models/{model}")
    cases = [("The capital of France is", ["Paris", "London", "Berlin is big"]),
             ("Water boils at", [" one hundred degrees", " zero", " 42"]),
             ("How many legs does a spider have?", [" eight", " six legs", " many"])]
    for question, choices in cases:
        state = pick.run(question=question, choices=choices, backend=backend)
        assert state["answer"] == hand_select(engine, model, question, choices)


@pytest.mark.parametrize("model", MODELS)
def test_fork(server, model):
    backend = sgl.RuntimeEndpoint(f"{server.url}/models/{model}")
    state = forked.run(backend=backend)
    text = state.text()
    for i in range(2):
        prefix = f"Tell me about topic {i}:"
        part = _direct(server, model, prefix, 6)
        assert part and part in text


def test_run_batch_on_two_models(server):
    """Two backends of one server used side by side."""
    outs = {}
    for model in MODELS:
        backend = sgl.RuntimeEndpoint(f"{server.url}/models/{model}")
        states = multi_turn.run_batch([{"q1": "Hi", "q2": "Bye"}] * 2, backend=backend)
        outs[model] = [s["a1"] for s in states]
        assert outs[model][0] == outs[model][1]
    assert outs["qwen-a"] != outs["mixtral-b"]
