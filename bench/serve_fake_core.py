"""serve_load --fake-step-ms MS: an engine core whose model is a sleep, to load the front and the clients as a
GPU would (every step MS long, one token per running sequence) on a machine without one.

The scheduler, block manager, core loop, IPC and the whole front are the real ones; only the executor is
replaced: a step takes MS from its launch, as a device runs it while the core's host work goes on, and it
samples ordinary word-piece ids (FAKE_TOKEN_IDS), so detokenization does real work. With the model's cost
fixed, online output tok/s against its ceiling (running sequences x 1000 / MS) and the ITL against MS show
what the serving path alone costs.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace
from typing import Any

import scaleinfer.executor
from scaleinfer.engine.core import EngineCore
from scaleinfer.outputs import RunnerOutput, SampledToken, SchedulerOutput

STEP_MS_ENV = "SERVE_LOAD_FAKE_STEP_MS"  # read by this bench module only, in the core process it starts
FAKE_TOKEN_IDS = range(1000, 1500)
NUM_BLOCKS = 1 << 16


class SleepExecutor:
    num_stages = 1
    num_host_blocks = 0

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.num_blocks = NUM_BLOCKS
        self.runner = SimpleNamespace(device="sleep", dtype="none")  # what the core's start-up line names

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        return self.complete(self.launch(output))

    def launch(self, output: SchedulerOutput) -> tuple[float, SchedulerOutput]:
        """A device's step: it runs from now on, while the core does its host work (EngineCore.launch)."""
        return time.perf_counter() + self.step_s, output

    def complete(self, launched: tuple[float, SchedulerOutput]) -> RunnerOutput:
        done_at, output = launched
        time.sleep(max(0.0, done_at - time.perf_counter()))
        return RunnerOutput({s.request_id: SampledToken(FAKE_TOKEN_IDS[s.num_output_tokens % len(FAKE_TOKEN_IDS)])
                             for s in output.scheduled if s.sample})

    def any_rank_busy(self, busy: bool) -> bool:
        return busy

    def shutdown(self) -> None:
        pass


class SleepCore(EngineCore):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        step_s = float(os.environ[STEP_MS_ENV]) / 1000
        make_executor = scaleinfer.executor.make_executor
        scaleinfer.executor.make_executor = lambda *_: SleepExecutor(step_s)  # EngineCore imports it at init
        try:
            super().__init__(*args, **kwargs)
        finally:
            scaleinfer.executor.make_executor = make_executor
