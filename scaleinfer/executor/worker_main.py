"""A tensor-parallel worker: ranks 1..T-1, spawned by the engine's executor or started by torchrun. It builds
its shard of the model, then runs every step rank 0 broadcasts until told to stop."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any

from scaleinfer.executor.rank import RankRunnerSpec, build_rank_runner, share_cpu_cores
from scaleinfer.executor.stage_link import StageLink
from scaleinfer.executor.step_codec import StepDecoder
from scaleinfer.heap import frozen_heap
from scaleinfer.parallel.groups import leave_tensor_parallel
from scaleinfer.worker.model_runner import ModelRunner


def serve_steps(runner: ModelRunner, on_step: Any = None) -> None:
    """Run rank 0's steps until it shuts the run down; on_step(n) after the n-th."""
    link, decoder = StageLink(runner.parallel_state), StepDecoder()
    num_steps = 0
    with frozen_heap():  # the model and everything built so far: no garbage collection walks them again
        while (payload := link.recv()) is not None:
            link.reply(runner.execute(decoder.decode(payload)))
            num_steps += 1
            if on_step is not None:
                on_step(num_steps)
    link.close()
    if runner.streamer is not None:  # its NVMe files: a worker process runs no atexit or finalizer work
        runner.streamer.close()


def spawned_worker_main(spec: RankRunnerSpec, steps_done: Any, errors: Connection, parent: Connection) -> None:
    """The target of a worker process the engine spawned. steps_done: a shared array, one count per rank (the
    engine names a rank that hangs from it); errors: where a failure's text goes before the process exits 1;
    parent: EOF on it means the engine process is gone, and so this one goes too."""
    # Ctrl-C reaches the terminal's whole process group: the engine's process decides what it means (chat stops
    # a reply, serve drains), and this one ends with it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    rank = spec.rank.rank
    share_cpu_cores(spec.model)
    try:
        runner = build_rank_runner(spec, progress=False)
        steps_done[rank] = 0  # built: the engine counts this rank as ready
        serve_steps(runner, lambda n: steps_done.__setitem__(rank, n))
    except BaseException as exc:  # reported to the engine, then this process ends
        errors.send(f"{type(exc).__name__}: {exc}\n{_short_traceback()}")
        errors.close()
        sys.exit(1)
    leave_tensor_parallel()


def run_torchrun_worker(spec: RankRunnerSpec) -> None:
    """A rank other than 0 under torchrun: build, serve, leave. A failure raises here and torchrun reports it."""
    runner = build_rank_runner(spec, progress=False)
    serve_steps(runner)
    leave_tensor_parallel()


def _exit_with_parent(parent: Connection) -> None:
    with contextlib.suppress(EOFError, OSError):
        parent.recv()
    os._exit(1)


def _short_traceback() -> str:
    lines = traceback.format_exc().strip().splitlines()
    return "\n".join(lines[-12:])
