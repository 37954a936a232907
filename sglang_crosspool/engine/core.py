"""EngineCore: many models, one KV pool, one global scheduler; one `step()` at a time.

    step(): scheduler.schedule() -> ForwardBatch -> ModelRunner.forward -> sample -> finish

The core is synchronous and owns no sockets: the in-process `Engine` drives it in a loop, and
the server runs the same core in its own process behind ZeroMQ.

The served models can change between two steps: `attach_model` adds one whose parts were
loaded off the step, `detach_model` frees one that has no request left (`live_models.py`
drives both); start-up builds each model with the same per-model `_add_*` helpers.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import torch
from crosspool_scheduler import (
    Batch,
    GlobalScheduler,
    PrefixCache,
    RequestTooLarge,
    SchedReq,
    SchedulerLimits,
    Timeline,
)

from sglang_crosspool.config import EngineConfig
from sglang_crosspool.engine.attention import get_attention_backend
from sglang_crosspool.engine.cuda_graph import DecodeGraphs, graph_buckets
from sglang_crosspool.engine.forward_batch import ForwardBatch, StepLists
from sglang_crosspool.engine.grammar import (
    Grammars,
    RequestGrammar,
    compiler_message,
    constraint_of,
    mask_rows,
    wait_any,
)
from sglang_crosspool.engine.model_runner import MicroBatch, ModelRunner, forward_pipelined
from sglang_crosspool.engine.pair_graphs import PAIR_GRAPH_MAX_BS, PairGraphs
from sglang_crosspool.engine.request import EngineRequest, RequestState
from sglang_crosspool.engine.sampler import SamplingState, choose, token_logprobs
from sglang_crosspool.engine.sampling_params import InvalidRequest
from sglang_crosspool.ffn.executor import FFNExecutor, LocalFFNExecutor
from sglang_crosspool.ffn.factory import make_ffn_executor
from sglang_crosspool.memory.device_memory import DeviceMemory
from sglang_crosspool.memory.kv_pool import KVPool
from sglang_crosspool.memory.page_backend import make_backend
from sglang_crosspool.models.checkpoint import open_checkpoint
from sglang_crosspool.models.registry import get_architecture
from sglang_crosspool.tokenizer import IncrementalDetokenizer, load_tokenizer
from sglang_crosspool.transport.errors import FFNServerError

log = logging.getLogger("sglang_crosspool.engine")


class UnknownModel(InvalidRequest):
    """The request names a model this engine does not serve."""

    status = 404


class EngineUnavailable(RuntimeError):
    """The engine cannot take requests (an FFN server died); servers answer 503."""


@dataclass
class _SeqPlan:
    """Which logits rows of a step belong to one scheduled sequence."""

    state: RequestState
    input_rows: list[int]  # rows scoring prompt tokens (input logprobs)
    input_positions: list[int]  # the position each such row predicts from
    sample_row: int | None  # row to sample the next token from
    prefill_only_done: bool  # max_new_tokens == 0 and the prompt is fully computed
    masked: torch.Tensor | None = None  # the sample row under the request's grammar
    allowed: bool = True  # the grammar allows some token


class EngineCore:
    def __init__(self, config: EngineConfig, ffn: FFNExecutor | None = None):
        self.config = config
        self.device = torch.device(config.device)
        self._init_models(ffn)
        self._init_kv_pool()
        self._init_runners()
        self._init_graphs()
        self._init_scheduler()
        self._init_grammars()
        self._init_live_models()

    # -- start-up -----------------------------------------------------------------------------

    def _init_models(self, ffn: FFNExecutor | None) -> None:
        self.attention = {}
        self.tokenizers = {}
        for entry in self.config.models:
            self.attention[entry.name] = load_attention(entry, self.config.load_format,
                                                        self.device, self.config.torch_dtype)
            self.tokenizers[entry.name] = load_tokenizer(entry.path)
        self.ffn = ffn or make_ffn_executor(self.config)
        self.unavailable: str | None = None

    def _init_kv_pool(self) -> None:
        cfg = self.config
        backend = make_backend(self.device, cfg.kv_page_bytes, cfg.kv_page_backend)
        pages = cfg.kv_pages or max(1, cfg.kv_budget_bytes // backend.page_bytes)
        self.kv_pool = KVPool(backend, pages, reserve_pages=cfg.kv_reserve_pages)
        self.device_memory = DeviceMemory(cfg.device, self.kv_pool)
        for entry in cfg.models:
            self._add_kv(entry)
        if cfg.pool_mode == "static":
            # Each model gets a fixed, equal slice of the budget that others cannot use.
            share = pages // len(cfg.models)
            for entry in cfg.models:
                self.kv_pool.set_quota(entry.name, share)

    def _init_runners(self) -> None:
        self.runners = {}
        for entry in self.config.models:
            self._add_runner(entry)

    def _init_graphs(self) -> None:
        """Captures each model's decode step per batch-size bucket (CUDA, FFN in process)."""
        cfg = self.config
        self.graphs: dict[str, DecodeGraphs] = {}
        self.pair_graphs: dict[tuple[str, str], PairGraphs] = {}
        self._graph_pool = None
        if not cfg.cuda_graph or self.device.type != "cuda":
            return
        if not self.ffn.supports_graphs:
            log.info("FFN transport %s cannot be captured: decode steps run eagerly",
                     cfg.ffn_transport)
            return
        self._graph_pool = torch.cuda.graph_pool_handle()
        for entry in cfg.models:
            self._add_graphs(entry)
        self._init_pair_graphs()

    # -- one model's parts (start-up, and models loaded while serving) ----------------------

    def _add_kv(self, entry) -> None:
        s, cfg = entry.spec, self.config
        self.kv_pool.add_model(entry.name, s.num_layers, s.num_kv_heads, s.head_dim,
                               cfg.torch_dtype,
                               max_tokens=entry.context_length * cfg.max_running_requests,
                               latent=s.kv_latent)

    def _add_runner(self, entry) -> None:
        s = entry.spec
        backend = get_attention_backend(self.config.attention_backend)(
            s.num_heads, s.num_kv_heads, s.head_dim, self.config.torch_dtype)
        self.runners[entry.name] = ModelRunner(
            entry.name, self.attention[entry.name], self.kv_pool.models[entry.name],
            backend, self.ffn)

    def _add_graphs(self, entry) -> None:
        if self._graph_pool is None:  # no graphs on this engine
            return
        cfg = self.config
        runner = self.runners[entry.name]
        if not runner.backend.supports_graphs:
            log.info("%s: attention backend %s has no CUDA-graph support; decode is eager",
                     entry.name, cfg.attention_backend)
            return
        # Two micro-batches in one graph pay only where the FFN runs elsewhere (p2p).
        microbatches = 1 if isinstance(self.ffn, LocalFFNExecutor) or cfg.pipeline_models \
            else cfg.pipeline_microbatches
        buckets = [b for b in cfg.cuda_graph_bs or () if b <= cfg.max_running_requests] or \
            graph_buckets(min(cfg.cuda_graph_max_bs, cfg.max_running_requests))
        max_blocks = -(-entry.context_length // self.kv_pool.block_tokens(entry.name))
        spent = sum(g.memory_bytes for g in self.graphs.values())
        self.graphs[entry.name] = DecodeGraphs(
            runner, self.kv_pool, buckets, max_blocks, pool=self._graph_pool,
            memory_budget=cfg.cuda_graph_memory_bytes - spent, microbatches=microbatches)
        log.info("%s: decode graphs for batch sizes %s", entry.name,
                 self.graphs[entry.name].stats()["buckets"])

    def _init_scheduler(self) -> None:
        cfg = self.config
        limits = SchedulerLimits(cfg.max_running_requests, cfg.chunked_prefill_size)
        cache = PrefixCache(self.kv_pool, cfg.model_names, dict(cfg.radix_cache_floor_pages)) \
            if cfg.radix_cache else None
        self.scheduler = GlobalScheduler(self.kv_pool, cfg.model_names, limits, cache=cache)
        self.states: dict[str, RequestState] = {}
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.config.random_seed)
        # Called with (rid, raw logits row) before each sampled token: for tests and tracing.
        self.logits_observer = None
        self.last_timeline: Timeline | None = None
        self.pipeline_totals = {"steps": 0, "wall_s": 0.0, "wait_s": 0.0}
        self.eos_ids = {m.name: frozenset(m.spec.eos_token_ids) for m in self.config.models}

    def _init_live_models(self) -> None:
        from sglang_crosspool.engine.live_models import LiveModels

        self.live = LiveModels(self)

    def _init_grammars(self) -> None:
        cfg = self.config
        models = cfg.models
        # The logits' width is the vocabulary grammars are compiled for (engine/grammar.py).
        self.grammars = Grammars(cfg.grammar_backend, self.tokenizers,
                                 {m.name: m.spec.vocab_size for m in models},
                                 {m.name: m.spec.eos_token_ids for m in models},
                                 any_whitespace=not cfg.constrained_json_disable_any_whitespace)
        self.grammar_waiting: dict[str, RequestState] = {}  # their grammar is compiling

    # -- requests -----------------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name not in self.attention or name in self.live.draining:
            raise UnknownModel(
                f"model {name!r} is not served; served models: "
                f"{', '.join(self.config.model_names)}")

    def validate(self, req: EngineRequest) -> int:
        """Checks a request; returns its max_new_tokens clipped to the context length."""
        self.check_model(req.model)
        entry = self.config.model(req.model)
        ids = req.input_ids
        if not ids:
            raise InvalidRequest("the prompt is empty")
        vocab = entry.spec.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise InvalidRequest(f"input_ids: every token id must be an integer in [0, {vocab})")
        if len(ids) >= entry.context_length:
            raise InvalidRequest(
                f"the prompt has {len(ids)} tokens, at or over the context length "
                f"{entry.context_length} of model {req.model!r}")
        if not -1 <= req.logprob_start_len <= len(ids):
            raise InvalidRequest(f"logprob_start_len: must be in [-1, {len(ids)}]")
        if req.top_logprobs_num < 0:
            raise InvalidRequest("top_logprobs_num: must be >= 0")
        if req.rid in self.states:
            raise InvalidRequest(f"rid: request id {req.rid!r} is already in use")
        key = constraint_of(req.params)
        if key is not None:
            self.grammars.check(req.model, key)
        return min(req.params.max_new_tokens, entry.context_length - len(ids))

    def add_request(self, req: EngineRequest) -> RequestState:
        """Validates and queues a request; raises InvalidRequest and changes nothing if bad."""
        if self.unavailable:
            raise EngineUnavailable(self.unavailable)
        max_new = self.validate(req)
        sched = SchedReq(req.rid, req.model, list(req.input_ids), max_new)
        tokenizer = self.tokenizers[req.model]
        state = RequestState(
            req, sched, SamplingState.create(req.params, req.input_ids, self.device),
            IncrementalDetokenizer(tokenizer, req.params.skip_special_tokens), max_new)
        if req.return_logprob:
            start = len(req.input_ids) - 1 if req.logprob_start_len == -1 else req.logprob_start_len
            state.input_lp_next = max(start, 1) - 1
            if start == 0:
                state.input_token_logprobs.append((None, req.input_ids[0], None))
                state.input_top_logprobs.append(None)
            # Positions from here on need their logits rows: they cannot come from the cache.
            sched.max_cached = state.input_lp_next
        key = constraint_of(req.params)
        if key is not None:  # compiled off the step; the scheduler holds it until then
            state.grammar = RequestGrammar(self.grammars.compile(req.model, key))
            sched.ready = False
        try:
            self.scheduler.add(sched)
        except RequestTooLarge as e:
            raise InvalidRequest(str(e)) from None
        self.states[req.rid] = state
        if state.grammar is not None:
            self.grammar_waiting[req.rid] = state
        return state

    def abort(self, rid: str, message: str = "aborted",
              status_code: int | None = None) -> RequestState | None:
        """Ends a request; `status_code` marks an error of the server (a client's abort has
        none), which the APIs answer with that HTTP status."""
        state = self.states.pop(rid, None)
        if state is None:
            return None
        self.scheduler.abort(rid)
        self.grammar_waiting.pop(rid, None)
        state.finish_reason = {"type": "abort", "message": message}
        if status_code is not None:
            state.finish_reason["status_code"] = status_code
        return state

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def flush_cache(self) -> bool:
        """Empties every model's prefix cache; False (nothing done) while requests are in
        flight, as SGLang refuses it then."""
        return not self.grammar_waiting and self.scheduler.flush_cache()

    @staticmethod
    def new_rid() -> str:
        return uuid.uuid4().hex

    # -- the step -----------------------------------------------------------------------------

    def _init_pair_graphs(self) -> None:
        """With `pipeline_models` over p2p: a pair graph for every two models that have decode
        graphs, in model order, on the buckets both have up to PAIR_GRAPH_MAX_BS
        (engine/pair_graphs.py)."""
        if not self.config.pipeline_models or isinstance(self.ffn, LocalFFNExecutor):
            return
        pool = torch.cuda.graph_pool_handle()
        names = [n for n in self.config.model_names if n in self.graphs]
        for i, first in enumerate(names):
            for second in names[i + 1:]:
                buckets = sorted(b for b in self.graphs[first].graphs
                                 if b in self.graphs[second].graphs and b <= PAIR_GRAPH_MAX_BS)
                self.pair_graphs[(first, second)] = PairGraphs(
                    self.graphs[first], self.graphs[second], buckets, pool=pool)
        if self.pair_graphs:
            log.info("pair decode graphs for %d model pairs", len(self.pair_graphs))

    def step(self) -> list[RequestState]:
        """Runs one step; returns the requests that produced a token or finished.

        A request whose grammar is compiling waits (the scheduler passes it over); one whose
        grammar failed to compile ends here.
        """
        return self._poll_grammars() + self._run_batches()

    def _poll_grammars(self) -> list[RequestState]:
        failed = []
        for rid, state in list(self.grammar_waiting.items()):
            try:
                ready = state.grammar.poll()
            except Exception as e:  # noqa: BLE001 - the compiler raises RuntimeError and others
                failed.append(self.abort(rid, f"the grammar failed to compile: "
                                              f"{compiler_message(e)}", 400))
                continue
            if ready:
                del self.grammar_waiting[rid]
                state.sched.ready = True
        return failed

    def _run_batches(self) -> list[RequestState]:
        """The model's step over the scheduled batches.

        With `pipeline_microbatches` > 1 the step holds that many micro-batches - batches of
        distinct models, else one model's batch split - run in the layer-wise pipeline.
        """
        # Two models a step where pair graphs can run them (--pipeline-models over p2p).
        depth = 2 if self.pair_graphs else self.config.pipeline_microbatches
        batches = self.scheduler.schedule_many(depth)
        if not batches:
            # Only requests whose grammar compiles: wait a little for one, not a busy loop.
            wait_any([s.grammar for s in self.grammar_waiting.values()])
            return []
        # Decode batches that (pipelined) graphs hold run whole, one graph step each;
        # otherwise they are split into micro-batches here and pipelined eagerly.
        graphed = all(self._graph_for(batch) is not None for batch in batches)
        if not graphed:
            batches = _split(batches, depth)
        lists, rows, plans = [], [], []
        for batch in batches:
            step = StepLists.from_batch(batch, self.kv_pool.block_tokens(batch.model))
            batch_rows, batch_plans = self._plan_rows(batch, step.q_starts)
            lists.append(step)
            rows.append(batch_rows)
            plans.append(batch_plans)
        pair = self._pair_for(batches, lists)
        try:
            if pair is not None:
                logits = self._forward_pair(pair, batches, lists, rows)
                self.ffn.end_step()
            elif len(batches) == 1 or graphed:
                logits = []
                for batch, step, batch_rows in zip(batches, lists, rows):
                    logits.append(self._forward_one(batch.model, step, batch_rows))
                    self.ffn.end_step()
            else:
                mbs = [MicroBatch(self.runners[b.model], self._forward_batch(b.model, step),
                                  self._rows_tensor(r)) for b, step, r in zip(batches, lists, rows)]
                self.ffn.begin_step([(b.model, len(step.ids)) for b, step in zip(batches, lists)])
                timeline = Timeline()
                logits = forward_pipelined(mbs, timeline)
                self._record_pipeline(timeline)
                self.ffn.end_step()
        except FFNServerError as e:
            return self._fail_all(f"the weights pool failed: {e}")
        except Exception as e:  # a bug must not take other batches down
            log.exception("a forward step failed")
            return [self._fail(p.state, f"the forward step failed: {type(e).__name__}: {e}")
                    for batch_plans in plans for p in batch_plans]
        for batch_plans, batch_logits in zip(plans, logits):
            self._mask_grammars(batch_plans, batch_logits)
        done = []
        for batch, batch_plans, batch_logits in zip(batches, plans, logits):
            self.scheduler.advance(batch)
            for p in batch_plans:
                try:
                    if self._postprocess(p, batch_logits):
                        done.append(p.state)
                except Exception as e:  # one request fails, the batch goes on
                    log.exception("request %s failed after the forward step", p.state.req.rid)
                    done.append(self._fail(p.state, f"sampling failed: {type(e).__name__}: {e}"))
        return done

    def _pair_for(self, batches: list[Batch], lists: list[StepLists]) -> PairGraphs | None:
        if len(batches) != 2 or not self.pair_graphs:
            return None
        a, b = batches[0].model, batches[1].model
        pair = self.pair_graphs.get((a, b)) or self.pair_graphs.get((b, a))
        if pair is None:
            return None
        first, second = (0, 1) if pair.names == (a, b) else (1, 0)
        return pair if pair.fits(lists[first], lists[second]) else None

    def _forward_pair(self, pair: PairGraphs, batches: list[Batch], lists: list[StepLists],
                      rows: list[list[int]]) -> list[torch.Tensor]:
        """Both batches' logits, in the order of `batches`, from one pair-graph step."""
        i, j = (0, 1) if pair.names[0] == batches[0].model else (1, 0)
        out = pair.run(lists[i], rows[i], lists[j], rows[j])
        return [out[0], out[1]] if i == 0 else [out[1], out[0]]

    def _graph_for(self, batch: Batch) -> DecodeGraphs | None:
        graphs = self.graphs.get(batch.model)
        if graphs is None or not all(seq.length == 1 for seq in batch.seqs):
            return None
        return graphs if len(batch.seqs) <= graphs.max_bs else None

    def _forward_one(self, model: str, step: StepLists, rows: list[int]) -> torch.Tensor:
        graphs = self.graphs.get(model)
        if graphs is not None and graphs.fits(step):
            return graphs.run(step, rows)
        fb = self._forward_batch(model, step)
        self.ffn.begin_step([(model, len(step.ids))])
        return self.runners[model].forward(fb, self._rows_tensor(rows))

    def _forward_batch(self, model: str, step: StepLists) -> ForwardBatch:
        return ForwardBatch.from_lists(step, self.kv_pool.block_tokens(model), self.device)

    def _rows_tensor(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.int64, device=self.device)

    def _record_pipeline(self, timeline: Timeline) -> None:
        self.last_timeline = timeline
        totals = self.pipeline_totals
        totals["steps"] += 1
        totals["wall_s"] += timeline.wall
        totals["wait_s"] += timeline.total("wait")

    def _plan_rows(self, batch: Batch, q_starts: list[int]) -> tuple[list[int], list[_SeqPlan]]:
        rows: list[int] = []
        plans = []
        for seq, offset in zip(batch.seqs, q_starts):
            state = self.states[seq.req.rid]
            plan = _SeqPlan(state, [], [], None, False)
            if state.req.return_logprob:
                last = len(state.req.input_ids) - 2  # the last row that predicts a prompt token
                first = max(state.input_lp_next, seq.start)
                for pos in range(first, min(last, seq.start + seq.length - 1) + 1):
                    plan.input_rows.append(len(rows))
                    plan.input_positions.append(pos)
                    rows.append(offset + pos - seq.start)
            if seq.completes:
                if seq.req.wants_more_tokens:
                    plan.sample_row = len(rows)
                    rows.append(offset + seq.length - 1)
                else:
                    plan.prefill_only_done = True
            plans.append(plan)
        return rows, plans

    def _mask_grammars(self, plans: list[_SeqPlan], logits: torch.Tensor) -> None:
        """Masks the sample rows of the batch's constrained requests, in one call."""
        constrained = [p for p in plans
                       if p.sample_row is not None and p.state.grammar is not None]
        if not constrained:
            return
        masked, allowed = mask_rows(logits, [p.sample_row for p in constrained],
                                    [p.state.grammar for p in constrained])
        for i, plan in enumerate(constrained):
            plan.masked, plan.allowed = masked[i], allowed[i]

    def _postprocess(self, plan: _SeqPlan, logits: torch.Tensor) -> bool:
        state = plan.state
        req = state.req
        if plan.input_rows:
            targets = [req.input_ids[p + 1] for p in plan.input_positions]
            chosen, tops = token_logprobs(logits[plan.input_rows], targets, req.top_logprobs_num)
            state.input_token_logprobs.extend((lp, t, None) for lp, t in zip(chosen, targets))
            state.input_top_logprobs.extend([(lp, i, None) for lp, i in row] for row in tops)
            state.input_lp_next = plan.input_positions[-1] + 1
        if plan.prefill_only_done:
            self._finish(state, {"type": "length", "length": 0})
            return True
        if plan.sample_row is None:
            return False
        row = logits[plan.sample_row]
        if self.logits_observer is not None:
            self.logits_observer(req.rid, row)
        if not plan.allowed:  # NOTE: a grammar that allows no token has no stop token either
            complete = state.grammar.matcher.is_completed()
            self._finish(state, {"type": "stop", "matched": None} if complete else {
                "type": "abort", "message": "the grammar allows no next token",
                "status_code": 500})
            return True
        token = choose(row if plan.masked is None else plan.masked, state.sampling,
                       self.generator)
        if req.return_logprob:
            chosen, tops = token_logprobs(row[None], [token], req.top_logprobs_num)
            state.output_token_logprobs.append((chosen[0], token, None))
            if req.top_logprobs_num:
                state.output_top_logprobs.append([(lp, i, None) for lp, i in tops[0]])
        self._append_token(state, token)
        if state.grammar is not None and self.config.grammar_jump_forward and \
                not req.return_logprob:
            for forced in state.grammar.jump_forward():
                if state.finished:
                    break
                self._append_token(state, forced)
        return True

    def _append_token(self, state: RequestState, token: int) -> None:
        state.sched.output_ids.append(token)
        state.sampling.record(token)
        if state.first_token_time is None:
            state.first_token_time = time.monotonic()
        params = state.req.params
        eos = self.eos_ids[state.req.model]
        previous = len(state.detok.text)
        state.detok.add([token])
        state.text = state.detok.text
        if state.grammar is not None:
            if not state.grammar.accept(token):  # NOTE: cannot happen under the mask
                return self._finish(state, {"type": "abort", "status_code": 500,
                                            "message": f"token {token} broke the grammar"})
            if state.grammar.terminated:  # complete, and its stop token accepted
                return self._finish(state, {"type": "stop", "matched": token})
        if token in params.stop_token_ids or (not params.ignore_eos and token in eos):
            return self._finish(state, {"type": "stop", "matched": token})
        if params.stop:
            longest = max(len(s) for s in params.stop)
            window = max(0, previous - longest + 1)
            hits = [(state.text.find(s, window), s) for s in params.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                index, matched = min(hits)
                state.text = state.text[:index]
                return self._finish(state, {"type": "stop", "matched": matched})
        if len(state.output_ids) >= state.max_new_tokens:
            self._finish(state, {"type": "length", "length": state.max_new_tokens})

    def _finish(self, state: RequestState, reason: dict) -> None:
        state.finish_reason = reason
        self.scheduler.finish(state.sched)
        self.states.pop(state.req.rid, None)

    def _fail(self, state: RequestState, message: str) -> RequestState:
        """Ends one request with a server error (500), whatever state it was left in."""
        if self.abort(state.req.rid, message, 500) is None:  # finished meanwhile: say so
            state.finish_reason = {"type": "abort", "message": message, "status_code": 500}
        return state

    def fail_all(self, message: str, status_code: int = 500) -> list[RequestState]:
        """Ends every request in flight with an error (the engine stays available)."""
        failed = []
        for rid in list(self.states):
            try:
                failed.append(self.abort(rid, message, status_code))
            except Exception:  # the scheduler's books may be what broke
                log.exception("could not abort request %s cleanly", rid)
                state = self.states.pop(rid)
                state.finish_reason = {"type": "abort", "message": message,
                                       "status_code": status_code}
                failed.append(state)
        return failed

    def _fail_all(self, message: str) -> list[RequestState]:
        """Ends every request in flight with an error; new requests are refused after this."""
        log.error("%s; ending %d requests in flight, refusing new ones", message,
                  len(self.states))
        self.unavailable = message
        return self.fail_all(message, 503)

    def recover(self) -> bool:
        """After the weights pool failed, with nothing in flight: restarts the FFN servers that
        died (experts reloaded from the checkpoints), where the transport allows it; True when
        the engine serves again."""
        if not self.unavailable or self.states:
            return False
        try:
            if not self.ffn.recover():
                return False
        except FFNServerError as e:
            log.error("restarting the weights pool failed: %s", e)
            return False
        log.warning("the weights pool serves again (after: %s)", self.unavailable)
        self.unavailable = None
        return True

    def check_health(self) -> list[RequestState]:
        """Notices a dead FFN server while idle (the step notices it at once): the engine
        becomes unavailable; returns the requests this ended."""
        if self.unavailable:
            return []
        failure = self.ffn.failure()
        if failure is None:
            return []
        return self._fail_all(f"the weights pool failed: {failure}")

    # -- the model set ------------------------------------------------------------------------

    def attach_model(self, entry, attention, tokenizer, shares) -> None:
        """Serves a model whose attention half, tokenizer and FFN are loaded (the FFN made
        routable by the caller): its KV ranges, runner, graphs and queue are made here.
        `shares`: its experts per FFN server (kept in the config where it has a placement)."""
        name = entry.name
        self.config = self.config.with_model(entry, shares)
        self.attention[name] = attention
        self.tokenizers[name] = tokenizer
        self.eos_ids[name] = frozenset(entry.spec.eos_token_ids)
        self.grammars.add_model(name, entry.spec.vocab_size, entry.spec.eos_token_ids)
        self._add_kv(entry)
        self._add_runner(entry)
        self._add_graphs(entry)
        self.scheduler.add_model(name)

    def detach_model(self, name: str) -> dict:
        """Frees a model that no request uses any more: its queue and prefix cache, KV ranges,
        graphs, runner, attention half and FFN. Returns what was freed."""
        cached = self.scheduler.remove_model(name)
        graphs = self.graphs.pop(name, None)
        graph_bytes = graphs.memory_bytes if graphs is not None else 0
        del graphs
        self.runners.pop(name)
        attention_bytes = self.attention.pop(name).nbytes()
        ffn_bytes = self.ffn.unload_model(name)
        virtual_pages = self.kv_pool.remove_model(name)
        self.tokenizers.pop(name, None)
        self.eos_ids.pop(name, None)
        self.grammars.remove_model(name)
        self.config = self.config.without_model(name)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # back to the device, where the next model can have it
        return {"attention_bytes": attention_bytes, "ffn_bytes": ffn_bytes,
                "graph_bytes": graph_bytes, "kv_virtual_pages": virtual_pages,
                "prefix_cache_blocks": cached}

    def recapture_graphs(self, name: str) -> None:
        """Captures a model's decode graphs again (its FFN weights were replaced)."""
        if self.graphs.pop(name, None) is not None:
            self._add_graphs(self.config.model(name))

    # -- introspection ------------------------------------------------------------------------

    def stats(self) -> dict:
        return {
            "kv": self.kv_pool.stats(
                self.scheduler.cache.blocks() if self.scheduler.cache is not None else None),
            "scheduler": self.scheduler.stats(),
            "pool_mode": self.config.pool_mode,
            "device": self.config.device,
            "ffn_device": self.config.ffn_device,
            "device_memory": self.device_memory.read(),
            "attention_bytes": sum(a.nbytes() for a in self.attention.values()),
            "ffn_bytes_here": self.ffn.local_bytes(),
            "ffn_bytes_per_server": self.ffn.server_bytes(),
            "unavailable": self.unavailable,
            "grammar": {**self.grammars.stats(), "waiting": len(self.grammar_waiting)},
            "cuda_graphs": {name: g.stats() for name, g in self.graphs.items()},
            "pair_graphs": [p.stats() for p in self.pair_graphs.values()],
            "live_models": self.live.stats(),
            "pipeline": dict(self.pipeline_totals, bubble_fraction=(
                self.pipeline_totals["wait_s"] / self.pipeline_totals["wall_s"]
                if self.pipeline_totals["wall_s"] else 0.0)),
        }

    def shutdown(self) -> None:
        self.grammars.close()
        self.ffn.close()


def load_attention(entry, load_format: str, device: torch.device, dtype: torch.dtype):
    """A model's attention half (attention, norms, router, embeddings, lm_head) on `device`."""
    arch = get_architecture(entry.spec.model_type)
    files = open_checkpoint(entry.path, load_format, device)
    return arch.attention_cls(entry.spec, files, device, dtype)


def _split(batches: list[Batch], depth: int) -> list[Batch]:
    """Splits the largest batch by sequences until there are `depth` micro-batches (or no
    batch has two sequences left)."""
    batches = list(batches)
    while 0 < len(batches) < depth:
        largest = max(batches, key=lambda b: len(b.seqs))
        if len(largest.seqs) < 2:
            break
        half, acc = 0, 0
        while acc * 2 < largest.num_tokens and half < len(largest.seqs) - 1:
            acc += largest.seqs[half].length
            half += 1
        half = max(half, 1)
        batches.remove(largest)
        batches += [Batch(largest.model, largest.seqs[:half]),
                     Batch(largest.model, largest.seqs[half:])]
    return batches
