"""A tensor-parallel run whose worker dies or hangs ends with an error naming the rank, within a bounded time,
and leaves no process behind. The test fails on a hang (the bound is asserted, and pytest's own run would
stall visibly)."""

import signal
import time

import pytest
from tp_helpers import assert_no_process_left, signal_worker_after

from scaleinfer import LLM, SamplingParams
from scaleinfer.errors import RankFailedError

BOUND_SECONDS = 60


def start_tp2(folder, **options):
    return LLM(str(folder), device="cpu", dtype="float32", skip_tokenizer_init=True, progress=False,
               kv_cache_memory=4 << 20, tensor_parallel_size=2, **options)


def run_until_failure(llm) -> tuple[RankFailedError, float]:
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    start = time.monotonic()
    with pytest.raises(RankFailedError) as failure:
        llm.generate([[5, 6, 7], [8, 9]], params)
    return failure.value, time.monotonic() - start


def test_a_killed_worker_ends_the_run_naming_it(tiny_models):
    folder, _ = tiny_models["llama3.1"]
    with start_tp2(folder) as llm:  # stopped (its workers killed) even when an assertion fails
        pids = llm.engine.executor.worker_pids
        signal_worker_after(llm, signal.SIGKILL, num_steps=3)
        error, seconds = run_until_failure(llm)
        assert "rank 1" in str(error) and "SIGKILL" in str(error), error
        assert seconds < BOUND_SECONDS
        with pytest.raises(RankFailedError, match="rank 1"):  # and every later call says so again
            llm.generate([[5, 6]], SamplingParams(max_tokens=2))
    assert_no_process_left(pids)


def test_a_worker_stuck_in_a_collective_ends_the_run_naming_it(tiny_models):
    """SIGSTOP freezes rank 1 between two steps: alive, silent; rank 0 waits in the next all-reduce."""
    folder, _ = tiny_models["llama3.1"]
    with start_tp2(folder, collective_timeout=5.0) as llm:
        pids = llm.engine.executor.worker_pids
        signal_worker_after(llm, signal.SIGSTOP, num_steps=3)
        error, seconds = run_until_failure(llm)
        assert "rank(s) [1]" in str(error) and "hung" in str(error), error
        assert seconds < BOUND_SECONDS
    assert_no_process_left(pids)
