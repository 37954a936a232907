"""Constrained decoding: regex, JSON-schema and EBNF grammars through xgrammar.

In: a request's constraint (SamplingParams' `regex`, `json_schema` or `ebnf`, at most one).
Out: a `RequestGrammar` per constrained request, whose token bitmask limits that request's
logits row to the tokens the grammar allows, and which accepts every sampled token; once it
has accepted a stop token (the grammar is complete) the request finishes with reason stop.

    validate     -> Grammars.check: parse the grammar (fast); a bad one is a 400 with
                    xgrammar's message, and nothing is queued
    add_request  -> Grammars.compile: a Future of the compiled grammar, compiled on a worker
                    thread and cached per (model, kind, text): the same grammar compiles once
    each step    -> RequestGrammar.poll: ready -> the scheduler may admit the request
                    (`SchedReq.ready`); until then it waits, other requests keep decoding
    after model  -> mask_rows: bitmasks of the step's constrained rows, applied on the
                    logits' device, in one call per batch; sample; RequestGrammar.accept
    jump-forward -> (--grammar-jump-forward) the tokens the grammar then forces are appended
                    unsampled; the next step computes them as a chunk, then samples

Grammars are compiled for each model's tokenizer with the model's logits width as the
vocabulary size: ids past the tokenizer's own vocabulary (padding rows) are never allowed.
Logprobs stay those of the model's distribution; the mask only shapes the choice.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from sglang_crosspool.engine.sampling_params import InvalidRequest

log = logging.getLogger("sglang_crosspool.engine.grammar")

CONSTRAINT_KINDS = ("regex", "json_schema", "ebnf")  # SGLang's sampling-param names
CACHE_ENTRIES = 512  # compiled grammars kept per engine (least recently used dropped)
# xgrammar prefixes its errors with a timestamp and a C++ source location.
_CPP_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s+\S+:\d+:\s*(Check failed: .*? is false: )?")


@dataclass(frozen=True)
class GrammarKey:
    kind: str  # regex | json_schema | ebnf
    text: str


def constraint_of(params) -> GrammarKey | None:
    """The request's grammar, or None for free generation."""
    for kind in CONSTRAINT_KINDS:
        value = getattr(params, kind, None)
        if value is not None:
            return GrammarKey(kind, value)
    return None


def compiler_message(error: Exception) -> str:
    """xgrammar's message, without its C++ location prefix."""
    lines = [_CPP_PREFIX.sub("", line) for line in str(error).strip().splitlines()]
    return " ".join(line.strip() for line in lines if line.strip()) or type(error).__name__


class Grammars:
    """Compiles and caches grammars per served model; one worker thread compiles.

    `backend` is "xgrammar" or "none" (constrained requests are then refused);
    `any_whitespace` lets JSON schemas take any whitespace between tokens (SGLang's default),
    else only compact separators.
    """

    def __init__(self, backend: str, tokenizers: dict, vocab_sizes: dict[str, int],
                 stop_ids: dict[str, tuple[int, ...]], any_whitespace: bool = True,
                 threads: int = 1):
        self.backend = backend
        self.any_whitespace = any_whitespace
        self._tokenizers = tokenizers
        self._vocab_sizes = vocab_sizes
        self._stop_ids = stop_ids
        self._compilers: dict[str, object] = {}
        self._lock = threading.Lock()  # _compilers is filled from the worker thread
        self._cache: OrderedDict[tuple[str, GrammarKey], concurrent.futures.Future] = \
            OrderedDict()
        self._parsed: OrderedDict[GrammarKey, None] = OrderedDict()  # checked, not compiled
        self._pool = None
        self._threads = threads
        self.compiled = 0  # grammars compiled (cache misses)
        self.cache_hits = 0

    # -- requests -------------------------------------------------------------------------------

    def check(self, model: str, key: GrammarKey) -> None:
        """Parses the grammar; raises InvalidRequest with the compiler's message if it is bad."""
        if self.backend == "none":
            raise InvalidRequest(f"sampling_params.{key.kind}: constrained decoding is disabled "
                                 f"on this server (--grammar-backend none)")
        if not isinstance(key.text, str):
            raise InvalidRequest(f"sampling_params.{key.kind}: expected a string")
        if (model, key) in self._cache or key in self._parsed:
            return  # NOTE: a request is validated twice (the batch first, then each add)
        import xgrammar as xgr

        try:
            if key.kind == "regex":
                xgr.Grammar.from_regex(key.text)
            elif key.kind == "ebnf":
                xgr.Grammar.from_ebnf(key.text)
            else:
                _check_schema_text(key.text)
                xgr.Grammar.from_json_schema(key.text)
        except InvalidRequest:
            raise
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError and others
            raise InvalidRequest(f"sampling_params.{key.kind}: invalid {_NAMES[key.kind]}: "
                                 f"{compiler_message(e)}") from None
        self._parsed[key] = None
        while len(self._parsed) > CACHE_ENTRIES:
            self._parsed.popitem(last=False)

    def compile(self, model: str, key: GrammarKey) -> concurrent.futures.Future:
        """A Future of the compiled grammar (shared by every request with the same grammar)."""
        cache_key = (model, key)
        future = self._cache.get(cache_key)
        if future is not None and not (future.done() and future.exception() is not None):
            self._cache.move_to_end(cache_key)
            self.cache_hits += 1
            return future
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self._threads, thread_name_prefix="grammar")
        future = self._pool.submit(self._compile, model, key)
        self.compiled += 1
        self._cache[cache_key] = future
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return future

    def add_model(self, model: str, vocab_size: int, stop_ids) -> None:
        """A model loaded while serving (its tokenizer is in the shared tokenizer table)."""
        self._vocab_sizes[model] = vocab_size
        self._stop_ids[model] = stop_ids

    def remove_model(self, model: str) -> None:
        with self._lock:
            self._compilers.pop(model, None)
        for key in [k for k in self._cache if k[0] == model]:
            del self._cache[key]
        self._vocab_sizes.pop(model, None)
        self._stop_ids.pop(model, None)

    def stats(self) -> dict:
        return {"backend": self.backend, "compiled": self.compiled,
                "cache_hits": self.cache_hits, "cached": len(self._cache)}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # -- the worker thread ----------------------------------------------------------------------

    def _compile(self, model: str, key: GrammarKey):
        compiler = self._compiler(model)
        if key.kind == "regex":
            return compiler.compile_regex(key.text)
        if key.kind == "ebnf":
            return compiler.compile_grammar(key.text)
        return compiler.compile_json_schema(key.text, any_whitespace=self.any_whitespace)

    def _compiler(self, model: str):
        with self._lock:
            compiler = self._compilers.get(model)
            if compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizers[model], vocab_size=self._vocab_sizes[model],
                    stop_token_ids=list(self._stop_ids[model]) or None)
                compiler = xgr.GrammarCompiler(info, max_threads=1)
                self._compilers[model] = compiler
            return compiler


_NAMES = {"regex": "regex", "json_schema": "JSON schema", "ebnf": "EBNF grammar"}


def _check_schema_text(text: str) -> None:
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise InvalidRequest(f"sampling_params.json_schema: not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequest("sampling_params.json_schema: a JSON schema is an object")


class RequestGrammar:
    """One request's grammar: its compiled grammar's Future, then its matcher."""

    def __init__(self, future: concurrent.futures.Future):
        self.future = future
        self.matcher = None

    def poll(self) -> bool:
        """True once the matcher is ready; raises the compiler's error if compiling failed."""
        if self.matcher is None and self.future.done():
            import xgrammar as xgr

            self.matcher = xgr.GrammarMatcher(self.future.result())
        return self.matcher is not None

    def accept(self, token: int) -> bool:
        """Advances the matcher; False when the grammar does not allow `token`."""
        return bool(self.matcher.accept_token(token))

    def jump_forward(self) -> list[int]:
        """The tokens the grammar forces next (none at a choice, or once complete). The
        caller appends and accepts each; their tokenization may differ from the tokenizer's."""
        return list(self.matcher.find_jump_forward_tokens())

    @property
    def terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted."""
        return self.matcher is not None and self.matcher.is_terminated()


def mask_rows(logits: torch.Tensor, rows: list[int],
              grammars: list[RequestGrammar]) -> tuple[torch.Tensor, list[bool]]:
    """The given logits rows, copied, with every token their grammars forbid set to -inf.

    Also returns, per row, whether any token is allowed at all (a grammar that allows none
    cannot be sampled from).
    """
    import xgrammar as xgr

    vocab = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(len(rows), vocab)
    for i, grammar in enumerate(grammars):
        grammar.matcher.fill_next_token_bitmask(bitmask, i)
    allowed = bitmask.ne(0).any(dim=-1).tolist()
    picked = logits[torch.tensor(rows, device=logits.device)].float()
    xgr.apply_token_bitmask_inplace(picked, bitmask.to(logits.device, non_blocking=True),
                                    vocab_size=vocab)
    return picked, allowed


def wait_any(grammars: list[RequestGrammar], timeout: float = 0.01) -> None:
    """Blocks until one of the grammars has compiled, or `timeout` seconds passed."""
    futures = [g.future for g in grammars if g.matcher is None]
    if futures:
        concurrent.futures.wait(futures, timeout, concurrent.futures.FIRST_COMPLETED)
