"""Throughput cost of constrained decoding: decode tokens/s with and without a grammar.

    .venv/bin/python benchmark/grammar_bench.py --out benchmark/results/grammar-cpu.json
    .venv/bin/python benchmark/grammar_bench.py --device cuda --size small

One in-process engine on one random checkpoint; for each batch size, the same prompts decode
`--tokens` tokens free and under each grammar (a regex, a JSON schema, an EBNF grammar), in
rounds that alternate the cases so that a busy machine slows them alike; the median round is
reported. Grammars are compiled before timing (the compile cache is warm), so the figures are
the per-step cost: the bitmask fill on the CPU, its copy to the logits' device, the masking and
the matcher's advance. Every constrained output is checked against its grammar.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

from sglang_crosspool import Engine
from sglang_crosspool.engine import grammar
from sglang_crosspool.testing.checkpoints import make_model

# Grammars that do not end within a few hundred tokens of a random model, so each request
# decodes all its tokens and the batch stays full: the cases differ only by the grammar.
REGEX = r"[A-Za-z ,.]+"
SCHEMA = {"type": "array", "items": {
    "type": "object", "properties": {"id": {"type": "integer", "minimum": 0},
                                     "tag": {"type": "string", "pattern": "^[a-z]{2,12}$"}},
    "required": ["id", "tag"]}}
EBNF = r"""
root ::= sentence+
sentence ::= word (" " word)* ". "
word ::= [A-Z]? [a-z]+
"""
CASES = {"free": {}, "regex": {"regex": REGEX}, "json_schema": {"json_schema": json.dumps(SCHEMA)},
         "ebnf": {"ebnf": EBNF}}


class GrammarClock:
    """Seconds spent in the grammar's own work (masking a batch, advancing matchers) and
    steps run: the per-step cost apart from the model, which a busy machine blurs less."""

    def __init__(self, engine: Engine):
        self.seconds = 0.0
        self.steps = 0
        core = engine.core
        core._mask_grammars = self._timed(core._mask_grammars)
        grammar.RequestGrammar.accept = self._timed(grammar.RequestGrammar.accept)
        step = core.step

        def counted():
            self.steps += 1
            return step()
        core.step = counted

    def _timed(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed

    def reset(self) -> None:
        self.seconds, self.steps = 0.0, 0


def run_case(engine: Engine, batch: int, tokens: int, constraint: dict) -> tuple[float, int]:
    params = [{"max_new_tokens": tokens, "ignore_eos": True, "seed": i, **constraint}
              for i in range(batch)]
    start = time.perf_counter()
    outs = engine.generate(prompt=[f"Request {i}: write something." for i in range(batch)],
                           sampling_params=params)
    wall = time.perf_counter() - start
    if "regex" in constraint:
        for out in outs:
            assert re.fullmatch(REGEX, out["text"]) or not out["text"], out["text"]
    return wall, sum(o["meta_info"]["completion_tokens"] for o in outs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="qwen3_moe")
    p.add_argument("--size", default="tiny", help="tiny or small (testing/checkpoints SIZES)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--jump-forward", action="store_true",
                   help="the engine's --grammar-jump-forward: forced tokens are not sampled")
    p.add_argument("--out", help="write the figures as JSON here")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(Path(tmp) / "model", a.arch, size=a.size, seed=0)
        engine = Engine(str(path), device=a.device, constrained_json_disable_any_whitespace=True,
                        grammar_jump_forward=a.jump_forward)
        for constraint in CASES.values():  # warm up torch and compile every grammar once
            run_case(engine, 2, 4, constraint)
        clock = GrammarClock(engine)
        results = []
        for batch in [int(b) for b in a.batch_sizes.split(",")]:
            rounds: dict[str, list[float]] = {name: [] for name in CASES}
            step_ms: dict[str, list[float]] = {name: [] for name in CASES}
            counts = {}
            for _ in range(a.rounds):
                for name, constraint in CASES.items():
                    clock.reset()
                    wall, n = run_case(engine, batch, a.tokens, constraint)
                    rounds[name].append(n / wall)
                    step_ms[name].append(1e3 * wall / clock.steps)
                    step_ms.setdefault(name + "/grammar", []).append(
                        1e3 * clock.seconds / clock.steps)
                    counts[name] = n
            free = statistics.median(rounds["free"])
            for name in CASES:
                tps = statistics.median(rounds[name])
                row = {"batch": batch, "case": name, "tokens": counts[name],
                       "tokens_per_s": round(tps, 1), "vs_free": round(tps / free, 3),
                       "step_ms": round(statistics.median(step_ms[name]), 3),
                       "grammar_ms_per_step": round(
                           statistics.median(step_ms[name + "/grammar"]), 3)}
                results.append(row)
                print(f"batch {batch:3d}  {name:12s} {tps:9.1f} tokens/s  "
                      f"({row['vs_free']:.2f} of free; step {row['step_ms']:.2f} ms, grammar "
                      f"{row['grammar_ms_per_step']:.3f} ms of it; {counts[name]} tokens)",
                      flush=True)
        engine.shutdown()
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({
            "command": "benchmark/grammar_bench.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()
                if v not in (None, False) and k != "out").replace(" True", ""),
            "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
