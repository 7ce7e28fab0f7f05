"""The next decode step of the same sequences, prepared on the device while the current one runs.

After a graph-replayed pure-decode step, the sequences that continue are most often exactly the same ones,
each one token further. The runner then sets the graph's input rows up for that step on the device right
after sampling (input ids from the sampled tokens, positions, slots and context lengths one further), while
the GPU is still busy; when the scheduler's next output is that step, the runner replays the graph with no
host-to-device work at all, which takes input building and uploads out of the time the GPU waits for the
host between steps. Any other next step builds its inputs as usual and overwrites the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaleinfer.outputs import ScheduledSequence


@dataclass(slots=True)
class NextDecode:
    """What the prepared rows hold, for the check against the scheduler's next output."""

    request_ids: list[str]
    start_pos: list[int]  # each sequence's next position
    block_tables: list[list[int]]  # the live tables: the scheduler only appends to one until it rebinds it
    token_ids: list[int] | None = None  # the sampled tokens, once the host has them

    @classmethod
    def after(cls, step: list[ScheduledSequence], block_size: int) -> NextDecode | None:
        """The step after `step` (a pure decode, every row sampled), or None when a row is not sampled or a
        sequence's next slot needs a block that the scheduler has not given it yet."""
        for seq in step:
            if not seq.sample or (seq.start_pos + 1) // block_size >= len(seq.block_table):
                return None
        return cls([s.request_id for s in step], [s.start_pos + 1 for s in step], [s.block_table for s in step])

    def matches(self, scheduled: list[ScheduledSequence]) -> bool:
        """Whether `scheduled` is exactly the prepared step: same sequences in the same order, one token each
        at the prepared position, over the same block tables, computing the tokens just sampled."""
        if self.token_ids is None or len(scheduled) != len(self.request_ids):
            return False
        for i, seq in enumerate(scheduled):
            if (seq.request_id != self.request_ids[i] or seq.start_pos != self.start_pos[i]
                    or seq.block_table is not self.block_tables[i] or len(seq.token_ids) != 1
                    or seq.token_ids[0] != self.token_ids[i]):
                return False
        return True
