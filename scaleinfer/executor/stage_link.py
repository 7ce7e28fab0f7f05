"""Where a rank's steps come from and where its results go, with or without pipeline stages.

One stage: rank 0 broadcasts each step to every rank (StepChannel); nothing comes back (rank 0 samples too).
P stages: rank 0 broadcasts each micro-batch's step to its stage's T ranks; every rank (t, p) hands the step's
bytes on to (t, p + 1) before computing, so the next stage decodes it while this one computes; the hidden
states follow on the pipeline group (worker/stage_io.StageIO). The last stage's tp_rank 0 sends the
sampled tokens (the RunnerOutput, as msgspec MessagePack) back to rank 0, which collects them in submit order.
A shutdown travels the same way, behind every step before it.
"""

from __future__ import annotations

import msgspec

from scaleinfer.executor.channel import StepChannel
from scaleinfer.executor.peer_channel import PeerChannel
from scaleinfer.outputs import RunnerOutput
from scaleinfer.parallel.state import ParallelState

STEP_TAG, RESULT_TAG = 10, 20


class StageLink:
    """A worker's end: recv() the next step (None: shut down), reply() with what it computed."""

    def __init__(self, state: ParallelState) -> None:
        first, last = state.pp_rank == 0, state.pp_rank == state.pp_size - 1
        self._source = (StepChannel(state.step_group) if first
                        else PeerChannel(state.pp_control_group, state.rank - state.tp_size, STEP_TAG))
        self._next = None if last else PeerChannel(state.pp_control_group, state.rank + state.tp_size, STEP_TAG)
        self._results = results_channel(state) if last and state.pp_size > 1 and state.tp_rank == 0 else None
        self._encoder = msgspec.msgpack.Encoder()

    def recv(self) -> bytes | None:
        payload = self._source.recv()
        if self._next is not None:
            self._next.send(payload) if payload is not None else self._next.send_shutdown()
        return payload

    def reply(self, output: RunnerOutput) -> None:
        if self._results is not None:
            self._results.send(self._encoder.encode(output))

    def close(self) -> None:
        for channel in (self._next, self._results):
            if channel is not None:
                channel.flush()


class FirstStageLink:
    """Rank 0's end of the step path: the broadcast to its stage and the hand-on to the second stage."""

    def __init__(self, state: ParallelState) -> None:
        self._stage = StepChannel(state.step_group)
        self._next = PeerChannel(state.pp_control_group, state.rank + state.tp_size, STEP_TAG)

    def send(self, payload: bytes) -> None:
        self._stage.send(payload)
        self._next.send(payload)

    def send_shutdown(self) -> None:
        self._stage.send_shutdown()
        self._next.send_shutdown()
        self._next.flush()


def results_channel(state: ParallelState) -> PeerChannel:
    """Between the last stage's tp_rank 0 and rank 0 (both in pipeline column 0), seen from either end."""
    peer = 0 if state.rank != 0 else state.tp_size * (state.pp_size - 1)
    return PeerChannel(state.pp_control_group, peer, RESULT_TAG)
