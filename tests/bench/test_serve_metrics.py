"""serve_load's readings of the server: /metrics scrapes -> the run's summary, py-spy stacks -> top functions.
The scrapes are what the server's own registry renders (ServerMetrics over a stand-in engine)."""

from __future__ import annotations

import pytest
from serve_metrics import Sample, parse, summarize_samples
from serve_profile import summarize_stacks

from scaleinfer.engine.core_types import EngineCoreOutput, EngineCoreOutputs, EngineStats
from scaleinfer.server.metrics import ServerMetrics


class StatsEngine:
    def __init__(self) -> None:
        self.current = EngineStats()
        self.is_healthy = True

    def stats(self) -> EngineStats:
        return self.current


def _scrape(metrics: ServerMetrics, t: float) -> Sample:
    return Sample(t, *parse(metrics.render().decode()))


def test_summary_over_the_window_of_two_scrapes():
    engine = StatsEngine()
    metrics = ServerMetrics(engine)
    metrics.observe_step(EngineCoreOutputs([], EngineStats(), 0.5))  # before the window: not counted
    engine.current = EngineStats(num_running=2, num_generation_tokens=10, num_prompt_tokens_computed=100)
    first = _scrape(metrics, 100.0)
    for step_time in (0.015, 0.015, 0.03, 0.03):
        outputs = [EngineCoreOutput("r", 0, [1], queue_time_s=0.2)]
        metrics.observe_step(EngineCoreOutputs(outputs, EngineStats(), step_time))
    metrics.delivery_lag.observe(0.004)
    engine.current = EngineStats(num_running=6, num_waiting=3, num_generation_tokens=30,
                                 num_prompt_tokens_computed=180)
    summary = summarize_samples([first, _scrape(metrics, 101.0)])
    assert summary["steps_per_s"] == 4.0
    assert summary["step_time_s_mean"] == pytest.approx(0.0225)
    assert summary["step_time_s_p50"] == 0.02 and summary["step_time_s_p99"] == 0.04  # bucket upper bounds
    assert summary["tokens_per_step"] == 25.0  # (20 generated + 80 prompt) / 4 steps
    assert summary["generation_tokens_per_step"] == 5.0
    assert summary["core_busy_fraction"] == pytest.approx(0.09)
    assert summary["core_idle_s_per_step"] == pytest.approx((1.0 - 0.09) / 4)
    assert summary["running_mean"] == 4.0 and summary["waiting_max"] == 3.0
    assert summary["queue_time_s_mean"] == pytest.approx(0.2)
    assert summary["front_delivery_lag_s_p50"] == 0.005
    assert summary["timeline"] == [[0.0, 2.0, 0.0, 0.0], [1.0, 6.0, 3.0, 4.0]]


def test_stacks_summary_counts_self_samples_per_function_and_threads():
    text = ("thread (1): MainThread;run (loop.py:10);step (core.py:5) 6\n"
            "thread (1): MainThread;run (loop.py:10);step (core.py:7) 2\n"
            "thread (2): reader;read (proc.py:3) 2\n")
    summary = summarize_stacks(text)
    assert summary["threads"] == {"thread (1): MainThread": 0.8, "thread (2): reader": 0.2}
    assert summary["top_self"] == [["step (core.py)", 0.8], ["read (proc.py)", 0.2]]
