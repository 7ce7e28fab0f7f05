"""An EngineCore whose executor misbehaves for requests that ask by their seed: for the server tests of faults
across the process boundary (run_server(core_class=FaultyCore) starts it in the core process)."""

from __future__ import annotations

import time

from scaleinfer.engine.core import EngineCore
from scaleinfer.outputs import RunnerOutput, SchedulerOutput

SLOW_SEED = 1001  # every step that runs such a request takes STEP_DELAY_S longer
BAD_ROW_SEED = 1002  # such a request's row cannot be sampled: it fails alone (the runner's per-row failure)
DEVICE_FAULT_SEED = 1003  # once such a request has 2 tokens, the step raises a CUDA illegal memory access
STEP_DELAY_S = 0.02
DEVICE_FAULT = "CUDA error: an illegal memory access was encountered"


class FaultyCore(EngineCore):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        execute = self._execute  # the step's execute (the executor's own with one pipeline stage)

        def faulty_execute(scheduler_output: SchedulerOutput) -> RunnerOutput:
            seeds = {s.sampling_params.seed: s for s in scheduler_output.scheduled}
            if DEVICE_FAULT_SEED in seeds and seeds[DEVICE_FAULT_SEED].num_output_tokens >= 2:
                raise RuntimeError(DEVICE_FAULT)
            if SLOW_SEED in seeds:
                time.sleep(STEP_DELAY_S)
            output = execute(scheduler_output)
            if BAD_ROW_SEED in seeds:
                request_id = seeds[BAD_ROW_SEED].request_id
                output.sampled.pop(request_id, None)
                output.failed[request_id] = "injected: its sampling state could not be built"
            return output

        self._execute = faulty_execute
