"""Byte messages between two ranks of a pipeline column, point to point over its gloo group.

A message is a fixed FAST_BYTES buffer (the first 8 bytes its length; -1 shuts the run down) and, when longer,
a second send of the rest, as StepChannel's broadcast. Sends are asynchronous, so that a stage hands a step on
and computes while the next stage is still busy with the one before; each send keeps its buffer until done.
Messages between one pair in one direction arrive in the order sent. A receive may be bounded (rank 0's wait for
a micro-batch's sampled tokens is), and raises TimeoutError when nothing came.
"""

from __future__ import annotations

from collections import deque
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from scaleinfer.executor.channel import FAST_BYTES, HEADER, SHUTDOWN

MAX_PENDING_SENDS = 16  # sends in flight before the oldest is waited for


class PeerChannel:
    def __init__(self, group: dist.ProcessGroup, peer: int, tag: int) -> None:
        """peer: the other rank's world rank; tag: this channel's pair of tags (tag, tag + 1) apart from others."""
        self.group, self.peer, self.tag = group, peer, tag
        self._sends: deque[tuple[dist.Work, torch.Tensor]] = deque()
        self._buffer = torch.zeros(FAST_BYTES, dtype=torch.uint8)
        self._length = self._buffer.numpy()[:HEADER].view(np.int64)

    def send(self, payload: bytes) -> None:
        head = min(len(payload), FAST_BYTES - HEADER)
        buffer = torch.zeros(FAST_BYTES, dtype=torch.uint8)
        data = buffer.numpy()
        data[:HEADER].view(np.int64)[0] = len(payload)
        data[HEADER: HEADER + head] = np.frombuffer(payload, np.uint8, head)
        self._isend(buffer, self.tag)
        if head < len(payload):
            self._isend(torch.frombuffer(bytearray(payload[head:]), dtype=torch.uint8), self.tag + 1)

    def send_shutdown(self) -> None:
        buffer = torch.zeros(FAST_BYTES, dtype=torch.uint8)
        buffer.numpy()[:HEADER].view(np.int64)[0] = SHUTDOWN
        self._isend(buffer, self.tag)

    def recv(self, timeout: float | None = None) -> bytes | None:
        """The next message, or None when the run shuts down. timeout: seconds to wait for each part before
        TimeoutError (None: the group's own, which on the control groups is an idle server's days)."""
        self._recv(self._buffer, self.tag, timeout)
        length = int(self._length[0])
        if length == SHUTDOWN:
            return None
        head = min(length, FAST_BYTES - HEADER)
        payload = self._buffer.numpy()[HEADER: HEADER + head].tobytes()
        if head < length:
            rest = torch.empty(length - head, dtype=torch.uint8)
            self._recv(rest, self.tag + 1, timeout)
            payload += rest.numpy().tobytes()
        return payload

    def _recv(self, tensor: torch.Tensor, tag: int, timeout: float | None) -> None:
        if timeout is None:
            dist.recv(tensor, src=self.peer, group=self.group, tag=tag)
            return
        work = dist.irecv(tensor, src=self.peer, group=self.group, tag=tag)
        try:
            done = work.wait(timedelta(seconds=timeout))
        except RuntimeError as exc:  # gloo: "Timed out waiting ...ms for recv operation to complete"
            if "timed out" not in str(exc).lower():
                raise
            done = False
        if not done:  # (the pair is closed after a timeout: the run is over)
            raise TimeoutError(f"no message from rank {self.peer} within {timeout:g} s")

    def flush(self) -> None:
        """Wait for every send in flight (before the process leaves the group)."""
        while self._sends:
            self._sends.popleft()[0].wait()

    def _isend(self, tensor: torch.Tensor, tag: int) -> None:
        while self._sends and (self._sends[0][0].is_completed() or len(self._sends) >= MAX_PENDING_SENDS):
            self._sends.popleft()[0].wait()
        self._sends.append((dist.isend(tensor, dst=self.peer, group=self.group, tag=tag), tensor))
