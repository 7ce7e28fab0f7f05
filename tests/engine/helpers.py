"""Small builders for control-plane tests: sequences, a scheduler, and a fake runner that checks the KV.

The fake runner stores, for every KV slot it writes, a value that depends on the whole prefix up to that
position (chained from the slot of the previous position, read back through the block table), the way
real attention depends on cached KV. Checking every slot against the sequence's true tokens after each
step catches a wrong block table, a wrong prefix-cache hit or a block reused while still in use. It moves
the step's swapped blocks between its device slots and its host slots first, as the worker's contract says
(swap-outs in order, then swap-ins), so a block swapped back wrong is caught the same way.
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
from scaleinfer.engine.swap_cost import SwapCost
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
                   num_host_blocks: int = 0, swap_cost: SwapCost | None = None, **config: int | None) -> Scheduler:
    """swap_cost: with num_host_blocks, SWAP_ALWAYS unless given."""
    block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching, num_host_blocks)
    if num_host_blocks and swap_cost is None:
        swap_cost = SWAP_ALWAYS
    return Scheduler(SchedulerConfig(**config), block_manager, swap_cost=swap_cost)  # type: ignore[arg-type]


# Swapping costs nothing next to recomputing (an unbounded host link).
SWAP_ALWAYS = SwapCost(kv_bytes_per_token=1, linear_flops_per_token=1.0, attention_flops_per_pair=0.0,
                       h2d_bytes_per_s=float("inf"), flops_per_s=1.0)


def prefix_value(previous: int, token_id: int) -> int:
    return hash((previous, token_id))


@dataclass
class FakeRunner:
    """Writes a prefix-dependent value per KV slot and samples next_token(seq) for each sampled chunk."""

    block_size: int
    sequences: dict[str, Sequence]
    next_token: Callable[[ScheduledSequence], int] = lambda _: FIXED_TOKEN
    kv: dict[int, int] = field(default_factory=dict)  # slot -> value of the prefix ending there
    host_kv: dict[int, int] = field(default_factory=dict)  # slot of the host tier (host block index) -> value
    num_copied: int = 0  # blocks moved between the tiers

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        for device_id, host_index in scheduler_output.swap_out:
            self._copy_block(self.kv, device_id, self.host_kv, host_index)
        for device_id, host_index in scheduler_output.swap_in:
            self._copy_block(self.host_kv, host_index, self.kv, device_id)
        for scheduled in scheduler_output.scheduled:  # all writes first, as every layer does
            self._write(scheduled)
        for scheduled in scheduler_output.scheduled:
            self.check_kv(scheduled.request_id, scheduled.block_table, scheduled.context_len)
        return RunnerOutput({s.request_id: SampledToken(self.next_token(s))
                             for s in scheduler_output.scheduled if s.sample})

    def _copy_block(self, source: dict[int, int], source_id: int, target: dict[int, int], target_id: int) -> None:
        self.num_copied += 1
        for offset in range(self.block_size):
            value = source.get(source_id * self.block_size + offset)
            target.pop(target_id * self.block_size + offset, None)
            if value is not None:
                target[target_id * self.block_size + offset] = value

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
    """Both tiers: every block owned as often as its ref count says (running tables on the device, swapped-out
    sequences on the host) or free, never both; every cached hash names its block; swapped KV belongs to waiting
    sequences."""
    bm = scheduler.block_manager
    held = Counter(b for seq in scheduler.running for b in seq.block_ids)
    held.update(b for swapped in bm.swapped.values() for b in swapped.block_ids)
    for pool in (bm.device, bm.host):
        for block in pool.blocks:
            assert block.ref_count == held[block.block_id], block
            assert (block.ref_count == 0) == (block.block_id in pool.free_queue), block
        for block_hash, block_id in pool.cached.items():
            assert pool.block(block_id).block_hash == block_hash
    assert all(b in bm.device for seq in scheduler.running for b in seq.block_ids)
    assert not bm.copies.pinned and not bm.copies.swap_out and not bm.copies.swap_in  # schedule() took them
    waiting = {seq.request_id for seq in scheduler.waiting}
    for request_id, swapped in bm.swapped.items():
        assert request_id in waiting and all(b in bm.host for b in swapped.block_ids)
        assert len(swapped.block_ids) == bm.num_blocks_for(swapped.num_tokens)
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
        assert bm.num_free_blocks == bm.num_blocks and bm.host.num_free == bm.num_host_blocks and not bm.swapped
        assert all(block.ref_count == 0 for block in bm.blocks + bm.host.blocks)

    def chunks(self, request_id: str) -> list[tuple[int, int]]:
        """(start_pos, num_tokens) of every chunk request_id computed, in order."""
        return [(s.start_pos, s.num_tokens) for out in self.outputs for s in out.scheduled
                if s.request_id == request_id]
