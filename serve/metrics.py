"""Prometheus metrics for /metrics: queue and KV gauges, token counters, latency histograms.

Names follow vLLM's (`vllm:num_requests_running` -> `jpaged:num_requests_running`), each
labelled with model_name. Gauges and counters are read from the engine when scraped;
latency histograms are observed by the engine worker as outputs arrive.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jpaged.engine import LLMEngine
from jpaged.outputs import RequestOutput
from serve.async_engine import EngineSnapshot

PREFIX = "jpaged:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 10.0, 20.0)  # fmt: skip
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
               50.0, 60.0, 120.0, 240.0, 480.0, 960.0)  # fmt: skip


class _EngineCollector(Collector):
    """Reads the engine's counters and the worker's snapshot at scrape time."""

    def __init__(
        self,
        engine: LLMEngine,
        snapshot: Callable[[], EngineSnapshot],
        model_name: str,
        finished: dict[str, int],
    ) -> None:
        self._engine = engine
        self._snapshot = snapshot
        self._model_name = model_name
        self._finished = finished  # finish reason -> requests, owned by ServerMetrics

    def collect(self) -> Iterator[Metric]:
        stats, snap, name = self._engine.stats, self._snapshot(), self._model_name

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            g.add_metric([name], value)
            return g

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            c.add_metric([name], value)
            return c

        usable = max(stats.num_blocks - 1, 1)  # block 0 is the null page
        yield gauge("num_requests_running", "Requests in the running batch.", snap.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", snap.num_waiting)
        yield gauge(
            "kv_cache_blocks_in_use", "KV pool blocks held by requests.", snap.blocks_in_use
        )
        yield gauge("kv_cache_blocks_total", "Usable KV pool blocks.", usable)
        yield gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).",
                    snap.blocks_in_use / usable)  # fmt: skip
        queries, hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        yield gauge("prefix_cache_hit_rate", "Prefix-cache hits / queries, in tokens (0-1).",
                    hits / queries if queries else 0.0)  # fmt: skip
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      queries)  # fmt: skip
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", hits)
        yield counter("num_preemptions", "Sequences preempted (recomputed later).",
                      stats.num_preemptions)  # fmt: skip
        yield counter("prompt_tokens", "Prompt tokens of accepted requests.", stats.prompt_tokens)
        yield counter("generation_tokens", "Generated tokens.", stats.generation_tokens)
        yield counter("spec_decode_num_draft_tokens", "Speculative (n-gram) tokens verified.",
                      stats.spec_draft_tokens)  # fmt: skip
        yield counter("spec_decode_num_accepted_tokens", "Speculative tokens kept.",
                      stats.spec_accepted_tokens)  # fmt: skip
        success = CounterMetricFamily(
            PREFIX + "request_success",
            "Finished requests by finish reason.",
            labels=["model_name", "finished_reason"],
        )
        for reason, count in sorted(self._finished.items()):
            success.add_metric([name, reason], count)
        yield success


class ServerMetrics:
    """Owns one registry per server. `on_outputs` / `on_abort` run in the engine worker."""

    def __init__(
        self, engine: LLMEngine, snapshot: Callable[[], EngineSnapshot], model_name: str
    ) -> None:
        self.registry = CollectorRegistry()
        self._finished: dict[str, int] = {}
        self.registry.register(_EngineCollector(engine, snapshot, model_name, self._finished))

        def histogram(metric: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            h = Histogram(PREFIX + metric, doc, ["model_name"], registry=self.registry,
                          buckets=buckets)  # fmt: skip
            return h.labels(model_name)

        self.ttft = histogram(
            "time_to_first_token_seconds", "Arrival to first generated token.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between a request's successive steps.", ITL_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds",
            "Arrival to last token of finished requests.",
            E2E_BUCKETS,
        )
        # request id -> (time of its last token, tokens so far); worker-thread only
        self._progress: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()  # guards _finished against a concurrent scrape

    def on_outputs(self, outputs: list[RequestOutput], step_time_s: float) -> None:
        """Observe latencies for one step's outputs (called by the worker after each step)."""
        now = time.time()
        for out in outputs:
            num_tokens = sum(len(o.token_ids) for o in out.outputs)
            last = self._progress.get(out.request_id)
            m = out.metrics
            if last is None:
                if num_tokens and m is not None and m.first_token_time is not None:
                    self.ttft.observe(max(m.first_token_time - m.arrival_time, 0.0))
            elif num_tokens > last[1]:
                self.itl.observe(now - last[0])
            if num_tokens and (last is None or num_tokens > last[1]):
                self._progress[out.request_id] = (now, num_tokens)
            if out.finished:
                self._progress.pop(out.request_id, None)
                if m is not None:
                    self.e2e.observe(max((m.finished_time or now) - m.arrival_time, 0.0))
                self._count_finished(out.outputs[0].finish_reason or "stop")

    def on_abort(self, request_id: str) -> None:
        self._progress.pop(request_id, None)
        self._count_finished("abort")

    def _count_finished(self, reason: str) -> None:
        with self._lock:
            self._finished[reason] = self._finished.get(reason, 0) + 1

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        with self._lock:
            return generate_latest(self.registry)
