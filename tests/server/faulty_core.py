"""An EngineCore whose executor misbehaves for requests that ask by their seed: for the server tests of faults
across the process boundary (run_server(core_class=FaultyCore) starts it in the core process)."""

from __future__ import annotations

import time
from typing import Any

from scaleinfer.engine.core import EngineCore
from scaleinfer.outputs import RunnerOutput, SchedulerOutput

SLOW_SEED = 1001  # every step that runs such a request takes STEP_DELAY_S longer
BAD_ROW_SEED = 1002  # such a request's row cannot be sampled: it fails alone (the runner's per-row failure)
DEVICE_FAULT_SEED = 1003  # once such a request has 2 tokens, the step raises a CUDA illegal memory access
STEP_DELAY_S = 0.02
DEVICE_FAULT = "CUDA error: an illegal memory access was encountered"


class FaultyCore(EngineCore):
    """Faults where the real ones arise: a device fault when the step is launched (kernels queued), a slow step
    and a failed row when its tokens are taken (complete)."""

    def _launch_step(self, scheduler_output: SchedulerOutput) -> tuple[dict, Any]:
        seeds = {s.sampling_params.seed: s for s in scheduler_output.scheduled}
        if DEVICE_FAULT_SEED in seeds and seeds[DEVICE_FAULT_SEED].num_output_tokens >= 2:
            raise RuntimeError(DEVICE_FAULT)
        return seeds, super()._launch_step(scheduler_output)

    def _complete_step(self, handle: tuple[dict, Any]) -> RunnerOutput:
        seeds, launched = handle
        if SLOW_SEED in seeds:
            time.sleep(STEP_DELAY_S)
        output = super()._complete_step(launched)
        if BAD_ROW_SEED in seeds:
            request_id = seeds[BAD_ROW_SEED].request_id
            output.sampled.pop(request_id, None)
            output.failed[request_id] = "injected: its sampling state could not be built"
        return output
