"""SGLang's `sampling_params` object -> the engine's `SamplingParams`, with 400s that name fields.

SGLang's API accepts more fields than this engine implements. Fields that change nothing at
their default value (`stop_regex: null`, `min_new_tokens: 0`, ...) are accepted, so that SGLang's
clients, which send them, work; set to anything else they are refused by name rather than
silently ignored. Unknown fields are refused, as SGLang does.
"""

from __future__ import annotations

import json

from sglang_crosspool.engine.sampling_params import InvalidRequest, SamplingParams

ENGINE_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p",
                 "repetition_penalty", "frequency_penalty", "presence_penalty", "stop",
                 "stop_token_ids", "ignore_eos", "skip_special_tokens", "n", "seed",
                 "regex", "json_schema", "ebnf")

# Accepted whatever their value: they only shape output formatting or scheduling hints.
ACCEPTED_ANY = ("spaces_between_special_tokens", "stream_interval", "custom_params")

# Accepted only at a value that changes nothing; why they are refused otherwise.
UNSUPPORTED = {
    "stop_regex": ((None, [], ""), "stop regexes are not supported"),
    "structural_tag": ((None,), "structural tags are not supported"),
    "min_new_tokens": ((None, 0), "min_new_tokens is not supported"),
    "no_stop_trim": ((None, False), "no_stop_trim is not supported"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "beam_width": ((None, 0, 1), "beam search is not supported"),
    "watermark": ((None,), "watermarking is not supported"),
}

KNOWN = set(ENGINE_FIELDS) | set(ACCEPTED_ANY) | set(UNSUPPORTED) | {"sampling_seed"}


def engine_params(raw, where: str = "sampling_params",
                  max_n: int | None = None) -> SamplingParams:
    """Validates one SGLang sampling_params object; raises InvalidRequest naming the field.
    `max_n` bounds `n` (--max-n): each sample is a request of its own."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where}: expected an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - KNOWN)
    if unknown:
        raise InvalidRequest(f"{where}: unknown field(s) {', '.join(unknown)}")
    for key, (allowed, why) in UNSUPPORTED.items():
        if key in raw and not any(raw[key] == a and type(raw[key]) is type(a) for a in allowed):
            raise InvalidRequest(f"{where}.{key}: {why} by this server (got {raw[key]!r})")
    params = {k: v for k, v in raw.items() if k in ENGINE_FIELDS and v is not None}
    if isinstance(params.get("json_schema"), dict):  # SGLang wants a string; an object will do
        params["json_schema"] = json.dumps(params["json_schema"])
    if raw.get("sampling_seed") is not None:
        params.setdefault("seed", raw["sampling_seed"])
    try:
        sp = SamplingParams.from_dict(params)
    except InvalidRequest as e:
        msg = str(e)
        if where != "sampling_params" and msg.startswith("sampling_params"):
            msg = where + msg[len("sampling_params"):]
        raise InvalidRequest(msg) from None
    except TypeError as e:  # e.g. a list where a number belongs, caught by a comparison
        raise InvalidRequest(f"{where}: {e}") from None
    if max_n is not None and sp.n > max_n:
        raise InvalidRequest(f"{where}.n: at most {max_n} samples per prompt (--max-n), "
                             f"got {sp.n}")
    return sp
