"""Prometheus metrics, with SGLang's names where SGLang has the metric.

Counters and histograms are recorded by the request manager as tokens come back; the gauges
(running/queued requests, KV pages, each model's prefix-cache pages) are read from the
scheduler's latest stats at scrape time.
Every metric carries a `model_name` label; the pool-wide KV gauges carry `pool="kv"`. Each
server has its own registry, so two servers in one process (tests) never mix their numbers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class _SchedulerGauges:
    """A collector over the scheduler's last stats snapshot (set by the request manager)."""

    def __init__(self, models: list[str]):
        self.models = models
        self.stats: dict = {}

    def collect(self):
        kv = self.stats.get("kv", {})
        sched = self.stats.get("scheduler", {}).get("models", {})
        running = GaugeMetricFamily("sglang:num_running_reqs", "Running requests",
                                    labels=["model_name"])
        queued = GaugeMetricFamily("sglang:num_queue_reqs", "Requests waiting to run",
                                   labels=["model_name"])
        used_tokens = GaugeMetricFamily("sglang:num_used_tokens",
                                        "KV token slots in use (whole blocks)",
                                        labels=["model_name"])
        model_pages = GaugeMetricFamily("sglang_crosspool:kv_pages_used",
                                        "KV pages the model's requests hold",
                                        labels=["model_name"])
        cached_pages = GaugeMetricFamily("sglang_crosspool:prefix_cache_pages",
                                         "KV pages the model's prefix cache holds (mapped; "
                                         "shared with requests or evictable)",
                                         labels=["model_name"])
        evictable = GaugeMetricFamily("sglang_crosspool:prefix_cache_evictable_pages",
                                      "Cached KV pages no request uses (evicted first under "
                                      "pressure)", labels=["model_name"])
        for m in self.models:
            q = sched.get(m, {})
            running.add_metric([m], q.get("running", 0))
            queued.add_metric([m], q.get("waiting", 0))
            mk = kv.get("models", {}).get(m, {})
            used_tokens.add_metric([m], mk.get("tokens_capacity_in_use", 0))
            model_pages.add_metric([m], mk.get("pages_in_use", 0))
            cached_pages.add_metric([m], mk.get("cached_pages", 0))
            evictable.add_metric([m], mk.get("evictable_pages", 0))
        yield from (running, queued, used_tokens, model_pages, cached_pages, evictable)
        for name, key, doc in (
            ("sglang_crosspool:kv_pool_pages_used", "used_pages", "KV pool pages in use"),
            ("sglang_crosspool:kv_pool_pages_free", "free_pages", "KV pool pages free"),
            ("sglang_crosspool:kv_pool_pages_total", "total_pages", "KV pool pages in all"),
            ("sglang_crosspool:kv_pool_pages_cached", "cached_pages",
             "KV pool pages the prefix caches hold"),
            ("sglang_crosspool:kv_pool_page_bytes", "page_bytes", "Bytes of one KV page"),
        ):
            g = GaugeMetricFamily(name, doc, labels=["pool"])
            g.add_metric(["kv"], kv.get(key, 0))
            yield g
        total = kv.get("total_pages") or 0
        usage = GaugeMetricFamily("sglang:token_usage", "Share of the KV pool in use",
                                  labels=["pool"])
        usage.add_metric(["kv"], kv.get("used_pages", 0) / total if total else 0.0)
        yield usage
        yield from self._per_device(kv)
        retractions = GaugeMetricFamily("sglang:num_retractions",
                                        "Requests retracted so far (KV pressure)", labels=[])
        retractions.add_metric([], self.stats.get("scheduler", {}).get("retractions", 0))
        yield retractions
        yield from self._live_models()
        yield from self._tensor_parallel()

    def _tensor_parallel(self):
        """Under --tp-size: each model's KV replication (ranks holding each KV head) and the
        KV bytes, over all ranks, that hold copies beyond the first (what CrossPool avoids)."""
        models = (self.stats.get("parallel") or {}).get("models")
        if not isinstance(models, dict):
            return
        replicas = GaugeMetricFamily("sglang_crosspool:kv_head_replicas",
                                     "Tensor-parallel ranks holding each KV head",
                                     labels=["model_name"])
        replicated = GaugeMetricFamily("sglang_crosspool:kv_replicated_bytes",
                                       "KV bytes, over all ranks, holding replicated KV heads",
                                       labels=["model_name"])
        for name, row in models.items():
            replicas.add_metric([name], row.get("kv_replicas", 1))
            replicated.add_metric([name], row.get("replicated_kv_bytes", 0))
        yield from (replicas, replicated)

    def _live_models(self):
        """Models loaded and unloaded while serving (POST /load_model, /unload_model)."""
        live = self.stats.get("live_models") or {}
        served = GaugeMetricFamily("sglang_crosspool:models_served", "Models served now",
                                   labels=[])
        served.add_metric([], len(self.models))
        ops = GaugeMetricFamily("sglang_crosspool:model_ops", "Model loads and unloads done "
                                "while serving, and those under way", labels=["op", "state"])
        ops.add_metric(["load", "done"], live.get("loads", 0))
        ops.add_metric(["unload", "done"], live.get("unloads", 0))
        ops.add_metric(["load", "running"], len(live.get("loading", ())))
        ops.add_metric(["unload", "running"], len(live.get("draining", ())))
        ops.add_metric(["rebalance", "done"], live.get("rebalances", 0))
        ops.add_metric(["rebalance", "running"], 1 if live.get("rebalancing") else 0)
        yield from (served, ops)


    def _per_device(self, kv: dict):
        """Per attention worker's device (`gpu` label: the device name, e.g. cuda:1; on CPU
        the stand-in workers are cpu#0, cpu#1 ...): KV pages and weight bytes held."""
        workers = self.stats.get("workers") or [
            {"index": 0, "device": self.stats.get("device", ""), "kv": kv,
             "attention_bytes": self.stats.get("attention_bytes", 0),
             "ffn_bytes_here": self.stats.get("ffn_bytes_here", 0),
             "device_memory": self.stats.get("device_memory") or {}}]
        used = GaugeMetricFamily("sglang_crosspool:gpu_kv_pages_used",
                                 "KV pages in use on the device", labels=["gpu"])
        total = GaugeMetricFamily("sglang_crosspool:gpu_kv_pages_total",
                                  "KV pages of the device's pool", labels=["gpu"])
        weights = GaugeMetricFamily("sglang_crosspool:gpu_weight_bytes",
                                    "Weight bytes held by the device's attention worker "
                                    "process (kind: attention side, or FFN held in process)",
                                    labels=["gpu", "kind"])
        memory = GaugeMetricFamily("sglang_crosspool:gpu_memory_bytes",
                                   "What the device's attention worker holds, as measured "
                                   "(kind: allocated and reserved by torch's allocator, "
                                   "kv_mapped pages, device_used by every process on the "
                                   "device); GPUs only, except kv_mapped", labels=["gpu", "kind"])
        for w in workers:
            gpu = w["device"] if w["device"] != "cpu" else f"cpu#{w['index']}"
            used.add_metric([gpu], (w.get("kv") or {}).get("used_pages") or 0)
            total.add_metric([gpu], (w.get("kv") or {}).get("total_pages") or 0)
            weights.add_metric([gpu, "attention"], w.get("attention_bytes") or 0)
            weights.add_metric([gpu, "ffn"], w.get("ffn_bytes_here") or 0)
            for key, value in (w.get("device_memory") or {}).items():
                if value is not None:
                    memory.add_metric([gpu, key.removesuffix("_bytes")], value)
        yield from (used, total, weights, memory)


class ServerMetrics:
    def __init__(self, models: list[str]):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter("sglang:prompt_tokens", "Prompt tokens processed", labels,
                                     registry=r)
        self.generation_tokens = Counter("sglang:generation_tokens", "Tokens generated", labels,
                                         registry=r)
        self.num_requests = Counter("sglang:num_requests", "Requests finished (any reason)",
                                    labels, registry=r)
        # SGLang's sglang:cached_tokens_total: prompt tokens whose KV came from the cache.
        self.cached_tokens = Counter("sglang:cached_tokens", "Prompt tokens taken from the "
                                     "prefix cache", labels, registry=r)
        self.num_aborted = Counter("sglang:num_aborted_requests", "Requests aborted", labels,
                                   registry=r)
        self.num_rejected = Counter("sglang_crosspool:num_rejected_requests",
                                    "Requests refused with an error status", labels + ["status"],
                                    registry=r)
        self.ttft = Histogram("sglang:time_to_first_token_seconds", "Time to first token",
                              labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("sglang:inter_token_latency_seconds", "Time between tokens",
                             labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("sglang:time_per_output_token_seconds",
                              "Decode time per output token, per request", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("sglang:e2e_request_latency_seconds", "End-to-end request latency",
                             labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.gauges = _SchedulerGauges(models)
        r.register(self.gauges)
        for m in models:  # so that every series exists from the start, at zero
            for c in (self.prompt_tokens, self.generation_tokens, self.num_requests,
                      self.num_aborted, self.cached_tokens):
                c.labels(m)

    def set_stats(self, stats: dict) -> None:
        self.gauges.stats = stats

    def set_models(self, models: list[str]) -> None:
        """The served set changed (a model loaded or unloaded while serving)."""
        self.gauges.models = list(models)
        for m in models:
            for c in (self.prompt_tokens, self.generation_tokens, self.num_requests,
                      self.num_aborted, self.cached_tokens):
                c.labels(m)

    def first_token(self, model: str, ttft: float) -> None:
        self.ttft.labels(model).observe(ttft)

    def tokens(self, model: str, n: int, gap: float) -> None:
        """n tokens arrived together, `gap` seconds after the previous ones."""
        h = self.itl.labels(model)
        for _ in range(n):
            h.observe(gap / n)

    def finished(self, model: str, prompt_tokens: int, completion_tokens: int, e2e: float,
                 decode_time: float | None, aborted: bool) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        self.num_requests.labels(model).inc()
        if aborted:
            self.num_aborted.labels(model).inc()
        self.e2e.labels(model).observe(e2e)
        if decode_time is not None and completion_tokens > 1:
            self.tpot.labels(model).observe(decode_time / (completion_tokens - 1))

    def cached(self, model: str, tokens: int) -> None:
        self.cached_tokens.labels(model).inc(tokens)

    def rejected(self, model: str, status: int) -> None:
        self.num_rejected.labels(model, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
