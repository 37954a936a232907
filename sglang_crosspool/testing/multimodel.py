"""One workload for comparing engine configurations in tests: every prompt on every model,
interleaved in one generate call, greedy; the outputs and the engine's stats come back."""

from __future__ import annotations

from sglang_crosspool.testing.checkpoints import ARCHS

GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
PROMPTS = [[5, 6, 7, 8], list(range(100, 118)), [42] * 9]


def run_all(paths, names=ARCHS, **options) -> tuple[list[list[int]], dict]:
    """Greedy output ids of PROMPTS x models on an Engine built with `options`, and its
    stats; the engine is shut down either way."""
    from sglang_crosspool import Engine

    engine = Engine(paths, served_model_name=list(names), **options)
    try:
        prompts = [p for p in PROMPTS for _ in names]
        models = [a for _ in PROMPTS for a in names]
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, model=models)
        return [o["output_ids"] for o in outs], engine.stats()
    finally:
        engine.shutdown()
