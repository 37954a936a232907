"""Sampling parameters with SGLang's field names, validated once when a request arrives."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

# Below this temperature sampling is greedy: dividing logits by less overflows them to inf,
# and the probabilities to NaN.
GREEDY_TEMPERATURE = 1e-5
# Repetition penalties divide or multiply logits: out of this range float32 logits overflow.
REPETITION_PENALTY_RANGE = (1e-6, 1e6)
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # int64 or uint64 (OpenAI, SGLang); kept mod 2**64


class InvalidRequest(ValueError):
    """A request the engine refuses; the message names the offending field."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no limit
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: int | None = None
    n: int = 1
    # Constrained decoding (engine/grammar.py): at most one of these grammars.
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None

    @classmethod
    def from_dict(cls, params: dict | None) -> SamplingParams:
        """Builds and validates; unknown keys are an error (as in SGLang's API)."""
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise InvalidRequest(f"sampling_params: unknown field(s) {', '.join(unknown)}")
        if isinstance(params.get("stop"), str):
            params["stop"] = (params["stop"],)
        for key in ("stop", "stop_token_ids"):
            if params.get(key) is None:
                params.pop(key, None)
            elif not isinstance(params[key], (list, tuple)):
                raise InvalidRequest(f"sampling_params.{key}: expected a list")
            else:
                params[key] = tuple(params[key])
        if params.get("max_new_tokens", 0) is None:
            params.pop("max_new_tokens")
        sp = cls(**params)
        sp.validate()
        if sp.seed is not None and sp.seed < 0:
            sp = dataclasses.replace(sp, seed=sp.seed % (1 << 64))
        return sp

    def for_sample(self, k: int) -> SamplingParams:
        """The params of the k-th of n samples: a seeded prompt's samples differ, yet stay
        reproducible."""
        if k == 0 or self.seed is None:
            return self
        return dataclasses.replace(self, seed=(self.seed + k) % (1 << 64))

    def validate(self) -> None:
        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise InvalidRequest(f"sampling_params.{name}: {why}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:  # NaN and infinities (JSON's NaN, Infinity) are refused
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        check(is_int(self.max_new_tokens) and self.max_new_tokens >= 0, "max_new_tokens",
              "must be an integer >= 0")
        check(is_num(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0")
        check(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1), "top_k",
              "must be -1 (no limit) or >= 1")
        check(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        low, high = REPETITION_PENALTY_RANGE
        check(is_num(self.repetition_penalty) and low <= self.repetition_penalty <= high,
              "repetition_penalty", f"must be in [{low:g}, {high:g}]")
        for name in ("frequency_penalty", "presence_penalty"):
            check(is_num(getattr(self, name)) and -2 <= getattr(self, name) <= 2, name,
                  "must be in [-2, 2]")
        check(all(isinstance(s, str) and s for s in self.stop), "stop",
              "must be non-empty strings")
        check(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
              "must be token ids")
        check(self.seed is None or is_int(self.seed) and
              SEED_RANGE[0] <= self.seed <= SEED_RANGE[1], "seed",
              "must be an integer in [-2**63, 2**64 - 1]")
        check(is_int(self.n) and self.n >= 1, "n", "must be an integer >= 1")
        check(isinstance(self.ignore_eos, bool), "ignore_eos", "must be a boolean")
        for name in ("regex", "json_schema", "ebnf"):
            check(getattr(self, name) is None or isinstance(getattr(self, name), str), name,
                  "must be a string")
        grammars = [n for n in ("regex", "json_schema", "ebnf") if getattr(self, n) is not None]
        if len(grammars) > 1:
            raise InvalidRequest(f"sampling_params: give at most one of regex, json_schema and "
                                 f"ebnf, got {' and '.join(grammars)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)
