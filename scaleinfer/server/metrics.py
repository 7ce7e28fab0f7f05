"""Prometheus metrics of one server: engine gauges read at scrape time, request latency histograms.

Each app gets its own CollectorRegistry, so tests (and one process serving several engines) never
collide on metric names.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from scaleinfer.engine.async_engine import AsyncLLMEngine
from scaleinfer.engine.core_types import EngineCoreOutputs

PREFIX = "scaleinfer"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class EngineStatsCollector(Collector):
    """Gauges and counters straight from the engine's latest stats snapshot."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        yield _gauge("num_requests_running", "Requests in the running batch.", stats.num_running)
        yield _gauge("num_requests_waiting", "Requests queued for admission to the batch.", stats.num_waiting)
        yield _gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", stats.kv_cache_usage)
        yield _gauge("kv_cache_used_blocks", "KV-cache blocks held by requests.", stats.num_used_blocks)
        yield _gauge("prefix_cache_hit_rate", "Fraction of prompt tokens served from the prefix cache.",
                     stats.prefix_cache_hit_rate)
        yield _gauge("engine_healthy", "1 while the engine loop runs, 0 once it died.", self.engine.is_healthy)
        yield _counter("prompt_tokens", "Prompt tokens of the requests added.", stats.num_prompt_tokens)
        yield _counter("prompt_tokens_computed", "Prompt positions run through the model (recomputation after "
                       "preemption included).", stats.num_prompt_tokens_computed)
        yield _counter("prompt_tokens_cached", "Prompt positions served from the prefix cache.",
                       stats.num_prompt_tokens_cached)
        yield _counter("generation_tokens", "Tokens generated.", stats.num_generation_tokens)
        yield _counter("num_preemptions", "Sequences preempted (their KV dropped and recomputed later, or swapped to "
                       "host memory).", stats.num_preempted)
        yield _counter("num_preemptions_swapped", "Of the preemptions, those whose KV was swapped to host memory "
                       "and back instead of recomputed (kv_offload).", stats.num_swapped)
        yield _gauge("host_kv_cache_usage_perc", "Fraction of the host-memory KV blocks in use (0..1; kv_offload).",
                     stats.host_kv_cache_usage)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=float(value))


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", documentation, value=float(value))


@dataclass(slots=True)
class RequestTiming:
    """Server-side clock readings of one engine request (time.monotonic seconds)."""

    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0  # of the longest choice


class ServerMetrics:
    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(engine))
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds", "Mean time between output tokens.",
                              buckets=_TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter(f"{PREFIX}_requests", "Requests finished, by finish reason.",
                                ["finish_reason"], registry=self.registry)
        self.errors = Counter(f"{PREFIX}_request_errors", "Requests answered with an error, by status.",
                              ["status"], registry=self.registry)
        self.step_time = Histogram(f"{PREFIX}_engine_step_seconds", "Time of one engine-core step.",
                                   buckets=_STEP_BUCKETS, registry=self.registry)
        self.queue_time = Histogram(f"{PREFIX}_request_queue_time_seconds", "Arrival to first scheduled.",
                                    buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.delivery_lag = Histogram(
            f"{PREFIX}_front_delivery_lag_seconds", "From a step's outputs reaching the front to their streams "
            "getting them on the event loop (output processing, then the wait for the loop).",
            buckets=_STEP_BUCKETS, registry=self.registry)
        if isinstance(engine, AsyncLLMEngine):
            engine.metrics_sink = self.observe_step
            engine.delivery_sink = self.delivery_lag.observe

    def observe_step(self, message: EngineCoreOutputs) -> None:
        """Each message of the core (on the front's reader thread): its step time, the queue times it reports."""
        if message.step_time_s is not None:
            self.step_time.observe(message.step_time_s)
        for output in message.outputs:
            if output.queue_time_s is not None:
                self.queue_time.observe(output.queue_time_s)

    def observe(self, timing: RequestTiming, finish_reason: str) -> None:
        self.requests.labels(finish_reason).inc()
        if timing.first_token is None or timing.last_token is None:
            return
        self.ttft.observe(timing.first_token - timing.arrival)
        self.e2e.observe(timing.last_token - timing.arrival)
        if timing.num_tokens > 1:
            self.tpot.observe((timing.last_token - timing.first_token) / (timing.num_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
