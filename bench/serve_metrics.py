"""The server's /metrics sampled while serve_load runs, and what they say about where the time went.

A thread (not the load's event loop, which may be the busy one) scrapes every `interval_s`; the summary is
over the run's window, from the first sample to the last:
  - the batch: running / waiting requests and KV usage, mean and max over the samples;
  - the core: steps per second, mean step time and its histogram's p50/p99, tokens per step (generated and
    prompt tokens computed), the fraction of wall time the core spent inside steps (busy) and the time it
    spent between two steps (idle_s_per_step: receiving commands, sending outputs, waiting for work);
  - the front: queue time (arrival to first scheduled) and the delivery lag, from a step's outputs reaching
    the front to their streams getting them on the event loop (a busy event loop shows here first).
A timeline of at most MAX_TIMELINE points (t, running, waiting, steps in the interval) is kept beside it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "scaleinfer_"
MAX_TIMELINE = 120
GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
COUNTERS = ("engine_step_seconds_count", "engine_step_seconds_sum", "generation_tokens_total",
            "prompt_tokens_computed_total", "request_queue_time_seconds_count", "request_queue_time_seconds_sum",
            "front_delivery_lag_seconds_count", "front_delivery_lag_seconds_sum")
HISTOGRAMS = ("engine_step_seconds", "front_delivery_lag_seconds")


@dataclass(slots=True)
class Sample:
    t: float  # time.perf_counter()
    values: dict[str, float]  # name without PREFIX -> value
    buckets: dict[str, list[tuple[float, float]]]  # histogram -> [(le, cumulative count)], le ascending


def parse(text: str) -> tuple[dict[str, float], dict[str, list[tuple[float, float]]]]:
    values: dict[str, float] = {}
    buckets: dict[str, list[tuple[float, float]]] = {name: [] for name in HISTOGRAMS}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix(PREFIX)
            if name.endswith("_bucket") and name[:-7] in buckets:
                buckets[name[:-7]].append((float(sample.labels["le"]), sample.value))
            elif name in GAUGES or name in COUNTERS:
                values[name] = sample.value
    for pairs in buckets.values():
        pairs.sort()
    return values, buckets


@dataclass
class MetricsSampler:
    """Scrapes url/metrics on a thread from start() to stop(); a failed scrape is skipped."""

    url: str
    interval_s: float = 0.5
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> list[Sample]:
        """Call as the last request ends: a final sample now closes the window (no idle tail after the load)."""
        self._stop.set()
        with httpx.Client(timeout=5) as client:
            self._scrape_once(client)
        if self._thread is not None:
            self._thread.join(10)
        self.samples.sort(key=lambda sample: sample.t)  # the thread's last scrape may land after the final one
        return self.samples

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                self._scrape_once(client)
                self._stop.wait(self.interval_s)

    def _scrape_once(self, client: httpx.Client) -> None:
        try:
            text = client.get(f"{self.url}/metrics").text
        except httpx.HTTPError:
            return
        self.samples.append(Sample(time.perf_counter(), *parse(text)))


def summarize_samples(samples: list[Sample]) -> dict[str, object]:
    if len(samples) < 2:
        return {"num_samples": len(samples)}
    first, last = samples[0], samples[-1]
    seconds = last.t - first.t
    delta = {name: last.values.get(name, 0.0) - first.values.get(name, 0.0) for name in COUNTERS}
    steps, step_s = delta["engine_step_seconds_count"], delta["engine_step_seconds_sum"]
    per_step = (lambda x: x / steps) if steps else (lambda x: 0.0)
    return {
        "num_samples": len(samples), "seconds": seconds,
        **_gauge_stats(samples),
        "steps_per_s": steps / seconds, "step_time_s_mean": per_step(step_s),
        **_histogram_percentiles("step_time_s", first, last, "engine_step_seconds"),
        "tokens_per_step": per_step(delta["generation_tokens_total"] + delta["prompt_tokens_computed_total"]),
        "generation_tokens_per_step": per_step(delta["generation_tokens_total"]),
        "prompt_tokens_computed_per_step": per_step(delta["prompt_tokens_computed_total"]),
        "core_busy_fraction": step_s / seconds, "core_idle_s_per_step": per_step(seconds - step_s),
        "queue_time_s_mean": _mean(delta, "request_queue_time_seconds"),
        "front_delivery_lag_s_mean": _mean(delta, "front_delivery_lag_seconds"),
        **_histogram_percentiles("front_delivery_lag_s", first, last, "front_delivery_lag_seconds"),
        "timeline": _timeline(samples),
    }


def _gauge_stats(samples: list[Sample]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, short in zip(GAUGES, ("running", "waiting", "kv_usage")):
        values = [s.values.get(name, 0.0) for s in samples]
        out[f"{short}_mean"], out[f"{short}_max"] = sum(values) / len(values), max(values)
    return out


def _mean(delta: dict[str, float], histogram: str) -> float | None:
    count = delta[f"{histogram}_count"]
    return delta[f"{histogram}_sum"] / count if count else None


def _histogram_percentiles(name: str, first: Sample, last: Sample, histogram: str) -> dict[str, float | None]:
    """p50 / p99 over the window: the upper bound of the bucket holding them (the histogram's resolution)."""
    before = dict(first.buckets.get(histogram, []))
    pairs = [(le, count - before.get(le, 0.0)) for le, count in last.buckets.get(histogram, [])]
    total = pairs[-1][1] if pairs else 0.0
    return {f"{name}_p{q}": _bucket_at(pairs, total * q / 100) if total else None for q in (50, 99)}


def _bucket_at(pairs: list[tuple[float, float]], rank: float) -> float:
    return next(le for le, count in pairs if count >= rank)


def _timeline(samples: list[Sample]) -> list[list[float]]:
    """[seconds since the first sample, running, waiting, steps since the previous point]."""
    stride = max(1, len(samples) // MAX_TIMELINE)
    picked = samples[::stride]
    points, previous = [], picked[0]
    steps_of = lambda s: s.values.get("engine_step_seconds_count", 0.0)  # noqa: E731
    for sample in picked:
        steps = steps_of(sample) - steps_of(previous)
        points.append([round(sample.t - samples[0].t, 3), sample.values.get("num_requests_running", 0.0),
                       sample.values.get("num_requests_waiting", 0.0), steps])
        previous = sample
    return points
