"""Which model runs next. Round-robin by default; a policy sees only model names."""

from __future__ import annotations


class RoundRobinPolicy:
    """Cycles over the models that have work, starting after the one served last."""

    def __init__(self):
        self._last: str | None = None

    def order(self, models_with_work: list[str], all_models: list[str]) -> list[str]:
        if self._last is None or self._last not in all_models:
            start = 0
        else:
            start = all_models.index(self._last) + 1
        rotated = all_models[start:] + all_models[:start]
        return [m for m in rotated if m in models_with_work]

    def served(self, model: str) -> None:
        self._last = model
