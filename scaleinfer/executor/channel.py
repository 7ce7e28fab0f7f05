"""Rank 0 -> every rank: one message per step, broadcast over the gloo control group.

A message that fits FAST_BYTES (every decode step up to a few hundred sequences) costs one broadcast of a fixed
buffer; a longer one a second broadcast of the rest. The first 8 bytes hold the length; -1 means shut down.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

FAST_BYTES = 16 << 10
HEADER = 8
SHUTDOWN = -1


class StepChannel:
    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self._buffer = torch.zeros(FAST_BYTES, dtype=torch.uint8)
        self._bytes = self._buffer.numpy()
        self._length = self._bytes[:HEADER].view(np.int64)

    def send(self, payload: bytes) -> None:
        self._length[0] = len(payload)
        head = min(len(payload), FAST_BYTES - HEADER)
        self._bytes[HEADER: HEADER + head] = np.frombuffer(payload, np.uint8, head)
        dist.broadcast(self._buffer, src=0, group=self.group)
        if head < len(payload):
            rest = torch.frombuffer(bytearray(payload[head:]), dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.group)

    def send_shutdown(self) -> None:
        self._length[0] = SHUTDOWN
        dist.broadcast(self._buffer, src=0, group=self.group)

    def recv(self) -> bytes | None:
        """The next step's payload, or None when rank 0 shuts the run down."""
        dist.broadcast(self._buffer, src=0, group=self.group)
        length = int(self._length[0])
        if length == SHUTDOWN:
            return None
        head = min(length, FAST_BYTES - HEADER)
        payload = self._bytes[HEADER: HEADER + head].tobytes()
        if head < length:
            rest = torch.empty(length - head, dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.group)
            payload += rest.numpy().tobytes()
        return payload
