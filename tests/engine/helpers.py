"""Small builders for control-plane tests: sequences, a scheduler, and a fake runner that checks the KV.

The fake runner stores, for every KV slot it writes, a value that depends on the whole prefix up to that
position (chained from the slot of the previous position, read back through the block table), the way
real attention depends on cached KV. Checking every slot against the sequence's true tokens after each
step catches a wrong block table, a wrong prefix-cache hit or a block reused while still in use.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from scaleinfer.config import SchedulerConfig
from scaleinfer.engine.block_manager import BlockManager
from scaleinfer.engine.scheduler import Scheduler
from scaleinfer.engine.sequence import Sequence, SequenceStatus
from scaleinfer.outputs import RunnerOutput, SampledToken, ScheduledSequence, SchedulerOutput
from scaleinfer.sampling_params import SamplingParams

FIXED_TOKEN = 7


def make_seq(request_id: str, prompt: int | list[int], max_tokens: int = 4,
             eos_token_ids: tuple[int, ...] = (), **params: object) -> Sequence:
    """A sequence whose prompt is the given ids, or `prompt` distinct ids derived from the request id."""
    if isinstance(prompt, int):
        base = 100_000 * (zlib.crc32(request_id.encode()) + 1)
        prompt = [base + i for i in range(prompt)]
    sampling_params = SamplingParams(max_tokens=max_tokens, **params)  # type: ignore[arg-type]
    return Sequence(request_id, prompt, sampling_params, eos_token_ids, arrival_time=0.0)


def make_scheduler(num_blocks: int = 64, block_size: int = 4, enable_prefix_caching: bool = True,
                   **config: int | None) -> Scheduler:
    block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
    return Scheduler(SchedulerConfig(**config), block_manager)  # type: ignore[arg-type]


def prefix_value(previous: int, token_id: int) -> int:
    return hash((previous, token_id))


@dataclass
class FakeRunner:
    """Writes a prefix-dependent value per KV slot and samples next_token(seq) for each sampled chunk."""

    block_size: int
    sequences: dict[str, Sequence]
    next_token: Callable[[ScheduledSequence], int] = lambda _: FIXED_TOKEN
    kv: dict[int, int] = field(default_factory=dict)  # slot -> value of the prefix ending there

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        for scheduled in scheduler_output.scheduled:  # all writes first, as every layer does
            self._write(scheduled)
        for scheduled in scheduler_output.scheduled:
            self.check_kv(scheduled.request_id, scheduled.block_table, scheduled.context_len)
        return RunnerOutput({s.request_id: SampledToken(self.next_token(s))
                             for s in scheduler_output.scheduled if s.sample})

    def _slot(self, block_table: list[int], pos: int) -> int:
        return block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _write(self, s: ScheduledSequence) -> None:
        assert len(s.block_table) * self.block_size >= s.context_len
        value = self.kv[self._slot(s.block_table, s.start_pos - 1)] if s.start_pos else 0
        for offset, token_id in enumerate(s.token_ids):
            value = prefix_value(value, token_id)
            self.kv[self._slot(s.block_table, s.start_pos + offset)] = value

    def check_kv(self, request_id: str, block_table: list[int], context_len: int) -> None:
        value = 0
        for pos, token_id in enumerate(self.sequences[request_id].all_token_ids[:context_len]):
            value = prefix_value(value, token_id)
            assert self.kv[self._slot(block_table, pos)] == value, (request_id, pos)


def check_invariants(scheduler: Scheduler, output: SchedulerOutput | None = None) -> None:
    bm = scheduler.block_manager
    held = Counter(b for seq in scheduler.running for b in seq.block_ids)
    for block in bm.blocks:
        assert block.ref_count == held[block.block_id], block
        assert (block.ref_count == 0) == (block.block_id in bm.free_queue), block
    for block_hash, block_id in bm.cached_blocks.items():
        assert bm.blocks[block_id].block_hash == block_hash
    for seq in scheduler.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(set(seq.block_ids)) == len(seq.block_ids)
        assert seq.num_computed_tokens <= min(len(seq.block_ids) * bm.block_size, seq.num_tokens)
    for seq in scheduler.waiting:
        assert seq.status is SequenceStatus.WAITING and not seq.block_ids and seq.num_computed_tokens == 0
    assert len(scheduler.requests) == scheduler.num_running + scheduler.num_waiting
    if output is not None:
        assert output.num_batched_tokens <= scheduler.config.max_num_batched_tokens
        assert len(output.scheduled) <= scheduler.config.max_num_seqs
        assert len({s.request_id for s in output.scheduled}) == len(output.scheduled)


@dataclass
class Harness:
    """A scheduler driven by a FakeRunner, checking invariants around every step."""

    scheduler: Scheduler
    next_token: Callable[[ScheduledSequence], int] = lambda _: FIXED_TOKEN
    sequences: dict[str, Sequence] = field(default_factory=dict)
    outputs: list[SchedulerOutput] = field(default_factory=list)
    runner: FakeRunner = field(init=False)

    def __post_init__(self) -> None:
        self.runner = FakeRunner(self.scheduler.block_manager.block_size, self.sequences, self.next_token)

    def add(self, *seqs: Sequence) -> None:
        for seq in seqs:
            self.scheduler.add(seq)
            self.sequences[seq.request_id] = seq

    def step(self) -> SchedulerOutput:
        output = self.scheduler.schedule()
        check_invariants(self.scheduler, output)
        self.scheduler.update(output, self.runner.execute(output))
        check_invariants(self.scheduler)
        self.outputs.append(output)
        return output

    def run(self, max_steps: int = 1000) -> int:
        """Step until every sequence finished; returns the number of steps."""
        for num_steps in range(1, max_steps + 1):
            self.step()
            if not self.scheduler.has_unfinished():
                return num_steps
        raise AssertionError(f"not finished after {max_steps} steps")

    def assert_no_leaks(self) -> None:
        bm = self.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        assert all(block.ref_count == 0 for block in bm.blocks)

    def chunks(self, request_id: str) -> list[tuple[int, int]]:
        """(start_pos, num_tokens) of every chunk request_id computed, in order."""
        return [(s.start_pos, s.num_tokens) for out in self.outputs for s in out.scheduled
                if s.request_id == request_id]
