"""Traffic description: per served model, its request rate and context lengths.

In: an optional JSON or YAML file mapping model name -> {rate, mean_context, max_context,
max_running, cached_prefix}, with an optional "default" entry applying to every model; omitted
fields take defaults (rate 1 req/s, mean_context min(4096, max_position_embeddings),
max_context the model's max_position_embeddings, max_running from the command line,
cached_prefix 0: the prefix cache keeps no floor for the model).
Out: one frozen `Traffic` per model, validated against the model's config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sglang_crosspool.planner.errors import PlanError

FIELDS = ("rate", "mean_context", "max_context", "max_running", "cached_prefix")
DEFAULT_RATE = 1.0
DEFAULT_MEAN_CONTEXT = 4096


@dataclass(frozen=True)
class Traffic:
    rate: float  # requests per second
    mean_context: int  # tokens (prompt + output) of a typical request
    max_context: int  # tokens of the longest request to plan for
    max_running: int  # concurrent requests that `static` reserves worst-case KV for
    # Tokens of prefix (system prompts, few-shot examples) the prefix cache keeps for this
    # model whatever other models need: the cache's per-model floor. 0: none.
    cached_prefix: int = 0


def read_traffic_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Parses the file (by extension: .json, .yaml/.yml) into name -> fields, checked shallowly."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PlanError(f"{path}: cannot read the traffic file ({e.strerror})") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml  # lazy: only YAML traffic files need it
        except ImportError:
            raise PlanError(f"{path}: reading YAML needs PyYAML; or write the file as JSON") \
                from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PlanError(f"{path}: not valid YAML ({e})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{path}: expected a mapping of model name -> {{{', '.join(FIELDS)}}}")
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise PlanError(f"{path}: model {name!r}: expected a mapping of {', '.join(FIELDS)}")
        unknown = sorted(set(entry) - set(FIELDS))
        if unknown:
            raise PlanError(f"{path}: model {name!r}: unknown field(s) {', '.join(unknown)}; "
                            f"known: {', '.join(FIELDS)}")
    return data


def resolve_traffic(
    raw: dict[str, dict[str, Any]], name: str, max_position: int, max_running: int, where: str
) -> Traffic:
    """Fills defaults for model `name` and checks every value."""
    entry = {**raw.get("default", {}), **raw.get(name, {})}
    rate = entry.get("rate", DEFAULT_RATE)
    mean = entry.get("mean_context", min(DEFAULT_MEAN_CONTEXT, max_position))
    longest = entry.get("max_context", max_position)
    running = entry.get("max_running", max_running)
    prefix = entry.get("cached_prefix", 0)
    ctx = f"{where}: model {name!r}"
    if not _number(rate) or rate < 0:
        raise PlanError(f"{ctx}: rate must be a number >= 0 (requests/s), got {rate!r}")
    for field, value in (("mean_context", mean), ("max_context", longest),
                         ("max_running", running)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PlanError(f"{ctx}: {field} must be an integer >= 1, got {value!r}")
    if not isinstance(prefix, int) or isinstance(prefix, bool) or not 0 <= prefix <= longest:
        raise PlanError(f"{ctx}: cached_prefix must be an integer in [0, max_context], "
                        f"got {prefix!r}")
    if mean > longest:
        raise PlanError(f"{ctx}: mean_context {mean} exceeds max_context {longest}")
    if longest > max_position:
        raise PlanError(f"{ctx}: max_context {longest} exceeds the model's "
                        f"max_position_embeddings {max_position}")
    return Traffic(float(rate), mean, longest, running, prefix)


def check_names(raw: dict[str, Any], names: list[str], where: str) -> None:
    unknown = sorted(set(raw) - set(names) - {"default"})
    if unknown:
        raise PlanError(f"{where}: no served model named {', '.join(map(repr, unknown))}; "
                        f"served models: {', '.join(names)} (or 'default')")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
