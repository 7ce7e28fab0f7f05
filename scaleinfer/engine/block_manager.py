"""Paged KV blocks over two tiers: allocation, reference counts, the prefix cache, and swaps to host memory.

Block ids name one block of either tier: [0, num_blocks) are the device's, [num_blocks, num_blocks +
num_host_blocks) host memory's (kv_offload; none without it). Each tier is a BlockPool (block_pool.py: ref
counts, LRU free queue, prefix cache) and keeps its invariants: every block is free or owned, never lost, and
holds as many references as it has owners. A running sequence's table holds device blocks; a sequence preempted
by swap is WAITING with no table, and its KV is here, in host blocks (`swapped`), until readmission swaps it
back in, exactly as a prefix-cache hit that only the host still holds does. The prefix cache spans both tiers:
a cached device block that allocation evicts spills to the host tier, and a lookup takes a block from whichever
tier holds it (the device first).

The copies are the worker's: each schedule() takes the step's (device block id, host block index) pairs with
take_copies(), swap-outs first, in the order made, then swap-ins. Every read of a block precedes, in that
order, any write that reuses it within the step: a device block freed by a swap-out may be reused by a
swap-in or the forward, both after; a host block a swap-in reads is held ("pinned") until the step ends, so no
later swap-out or spill of the same step overwrites it.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field
from typing import NamedTuple

from scaleinfer.engine.block_pool import ROOT_DIGEST, BlockHash, BlockPool, KVBlock
from scaleinfer.engine.sequence import Sequence

__all__ = ["BlockHash", "BlockManager", "ComputedBlocks", "KVBlock", "PrefixCacheStats", "StepCopies"]


@dataclass(slots=True)
class PrefixCacheStats:
    num_queried_tokens: int = 0  # tokens of admitted sequences
    num_hit_tokens: int = 0  # of those, served from the cache
    num_host_hit_tokens: int = 0  # of those, from blocks only host memory held (swapped back in)

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0


class ComputedBlocks(NamedTuple):
    """A waiting sequence's KV already held somewhere: block ids of either tier, and the tokens they hold."""

    block_ids: list[int]
    num_tokens: int


@dataclass(slots=True)
class SwappedOut:
    block_ids: list[int]  # host blocks, the sequence's block table while it waits
    num_tokens: int  # its computed tokens when it was preempted


@dataclass(slots=True)
class StepCopies:
    """What one step moves between the tiers: (device block id, host block index) pairs."""

    swap_out: list[tuple[int, int]] = field(default_factory=list)  # device -> host, first
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # host -> device, then
    pinned: list[int] = field(default_factory=list)  # host blocks read by swap_in: held until the step ends


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_host_blocks: int = 0) -> None:
        self.num_blocks, self.num_host_blocks = num_blocks, num_host_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.device = BlockPool(0, num_blocks)
        self.host = BlockPool(num_blocks, num_host_blocks)
        self.swapped: dict[str, SwappedOut] = {}  # request id -> its KV in host blocks
        self.copies = StepCopies()
        self.prefix_cache_stats = PrefixCacheStats()

    # the device tier, by the names the scheduler and tests read
    blocks = property(lambda self: self.device.blocks)
    free_queue = property(lambda self: self.device.free_queue)
    cached_blocks = property(lambda self: self.device.cached)

    @property
    def num_free_blocks(self) -> int:
        return self.device.num_free

    @property
    def usage(self) -> float:
        """Fraction of device blocks in use; free blocks that still hold cached KV count as free."""
        return self.device.usage

    @property
    def host_usage(self) -> float:
        return self.host.usage

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ---------------------------------------------------------------------------------

    def get_computed_blocks(self, seq: Sequence) -> ComputedBlocks:
        """The KV a waiting sequence can start from: all of it when it was swapped out, else its longest cached
        prefix, from either tier.

        Never the whole sequence: at least one token must be left to compute so the step yields logits. No prefix
        for a request that asks for prompt logprobs: they come from computing every prompt position.
        """
        swapped = self.swapped.get(seq.request_id)
        if swapped is not None:  # blocks the device still caches need no copy
            return ComputedBlocks([self._on_device(block_id) for block_id in swapped.block_ids], swapped.num_tokens)
        if not self.enable_prefix_caching or seq.sampling_params.prompt_logprobs is not None:
            return ComputedBlocks([], 0)
        num_full_blocks = (seq.num_tokens - 1) // self.block_size
        self._extend_block_hashes(seq, num_full_blocks)
        block_ids: list[int] = []
        for block_hash in seq.block_hashes[:num_full_blocks]:
            block_id = self.device.cached.get(block_hash, self.host.cached.get(block_hash))
            if block_id is None:
                break
            block_ids.append(block_id)
        return ComputedBlocks(block_ids, len(block_ids) * self.block_size)

    def _on_device(self, host_id: int) -> int:
        """The device block caching what host block host_id holds, else host_id."""
        block_hash = self.host.block(host_id).block_hash
        return host_id if block_hash is None else self.device.cached.get(block_hash, host_id)

    def cache_full_blocks(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Register the blocks that become full once seq has num_computed_tokens computed.

        Call before advancing seq.num_computed_tokens: blocks below it are already registered.
        """
        first, end = seq.num_computed_tokens // self.block_size, num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or first == end:
            return
        self._extend_block_hashes(seq, end)
        for index in range(first, end):
            self.device.register(seq.block_ids[index], seq.block_hashes[index])

    def uncache(self, block_ids: list[int]) -> None:
        """Take these device blocks out of the prefix cache: the step that was to fill them failed."""
        for block_id in block_ids:
            self.device.uncache(block_id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block of both tiers (benchmarks measuring cold prefills). Blocks in use keep their
        KV."""
        self.device.reset_cache()
        self.host.reset_cache()

    def _extend_block_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        """Make seq.block_hashes cover its first num_full_blocks blocks (which must be full)."""
        hashes, size = seq.block_hashes, self.block_size
        for index in range(len(hashes), num_full_blocks):
            parent = hashes[-1].digest if hashes else ROOT_DIGEST
            hashes.append(BlockHash.of(parent, tuple(seq.all_token_ids[index * size:(index + 1) * size])))

    # ---- allocation -----------------------------------------------------------------------------------

    def allocate_slots(
        self, seq: Sequence, num_new_tokens: int, computed_blocks: SequenceOf[int] = ()
    ) -> bool:
        """Grow seq's block table to cover num_computed_tokens + num_new_tokens slots.

        A sequence with no blocks is being admitted: computed_blocks (get_computed_blocks's block ids) are taken
        first, those in host memory swapped in, and the lookup counts in the prefix-cache stats. On shortage
        returns False, changes nothing.
        """
        if not computed_blocks and seq.num_computed_tokens + num_new_tokens <= len(seq.block_ids) * self.block_size:
            return True  # most decode steps: the last block has room (an admission holds no blocks)
        swapped = self.swapped.get(seq.request_id) if computed_blocks else None
        num_cached_tokens = swapped.num_tokens if swapped is not None else len(computed_blocks) * self.block_size
        num_total_tokens = seq.num_computed_tokens + num_cached_tokens + num_new_tokens
        num_held_blocks = len(seq.block_ids) + len(computed_blocks)
        num_new_blocks = max(0, self.num_blocks_for(num_total_tokens) - num_held_blocks)
        # a free device hit leaves the free queue; a host block takes a device block to land in
        num_taken = sum(1 for block_id in computed_blocks
                        if block_id not in self.device or self.device.block(block_id).ref_count == 0)
        if num_new_blocks + num_taken > self.num_free_blocks:
            return False
        if swapped is None and not seq.block_ids:
            self._record_lookup(seq.num_tokens, computed_blocks)
        seq.block_ids.extend(self._take_computed(seq, computed_blocks))
        seq.block_ids.extend(self._pop_device() for _ in range(num_new_blocks))
        return True

    def _take_computed(self, seq: Sequence, computed_blocks: SequenceOf[int]) -> list[int]:
        """Device blocks holding computed_blocks' KV: device hits taken, host blocks swapped in. The host blocks are
        pinned and the device hits taken before any device block is popped, whose eviction may spill into the host
        tier."""
        swapped = self.swapped.pop(seq.request_id, None)
        if swapped is not None:  # the step now owns the host blocks; those the device still caches go unread
            self.copies.pinned.extend(swapped.block_ids)
        for block_id in computed_blocks:
            if block_id in self.device:
                self.device.take(block_id)
            elif swapped is None:
                self.host.take(block_id)
                self.copies.pinned.append(block_id)
        return [block_id if block_id in self.device else self._swap_in(block_id) for block_id in computed_blocks]

    def _swap_in(self, host_id: int) -> int:
        device_id = self._pop_device()
        self.copies.swap_in.append((device_id, host_id - self.num_blocks))
        block_hash = self.host.block(host_id).block_hash
        if block_hash is not None:
            self.device.register(device_id, block_hash)
        return device_id

    def _pop_device(self) -> int:
        block_id, evicted = self.device.pop_free()
        if evicted is not None:
            self._spill(block_id, evicted)
        return block_id

    def _spill(self, device_id: int, block_hash: BlockHash) -> None:
        """The device is about to overwrite this cached block: keep its KV in host memory, cached and free there
        (evicting the host's least recently used), unless the host holds it already or has no free block."""
        if self.host.num_free == 0 or block_hash in self.host.cached:
            return
        host_id, _ = self.host.pop_free()
        self.host.register(host_id, block_hash)
        self.host.release(host_id)
        self.copies.swap_out.append((device_id, host_id - self.num_blocks))

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks, tail first, so a shared prefix outlives the tails in the LRU order; and the host
        blocks of a swapped-out sequence (one that finishes while it waits)."""
        for block_id in reversed(seq.block_ids):
            self.device.release(block_id)
        seq.block_ids = []  # rebound, not cleared: a table handed to the runner stays intact
        swapped = self.swapped.pop(seq.request_id, None)
        if swapped is not None:
            for block_id in reversed(swapped.block_ids):
                self.host.release(block_id)

    # ---- swapping -------------------------------------------------------------------------------------

    def swap_out(self, seq: Sequence) -> bool:
        """Preempt seq by swap: its computed KV to host blocks, its device blocks released. Blocks whose content the
        host already caches are shared, the rest copied. False, changing nothing, when the host lacks the room."""
        device_ids = seq.block_ids[:self.num_blocks_for(seq.num_computed_tokens)]
        shared = {index: self.host.cached[block_hash] for index, block_id in enumerate(device_ids)
                  if (block_hash := self.device.block(block_id).block_hash) in self.host.cached}
        num_shared_free = sum(1 for block_id in shared.values() if self.host.block(block_id).ref_count == 0)
        if not device_ids or len(device_ids) - len(shared) > self.host.num_free - num_shared_free:
            return False
        for block_id in shared.values():  # first: popping host blocks for the others may evict them
            self.host.take(block_id)
        host_ids = [shared[index] if index in shared else self._copy_out(block_id)
                    for index, block_id in enumerate(device_ids)]
        num_tokens = seq.num_computed_tokens
        self.free(seq)
        self.swapped[seq.request_id] = SwappedOut(host_ids, num_tokens)
        return True

    def _copy_out(self, device_id: int) -> int:
        host_id, _ = self.host.pop_free()
        block_hash = self.device.block(device_id).block_hash
        if block_hash is not None:
            self.host.register(host_id, block_hash)
        self.copies.swap_out.append((device_id, host_id - self.num_blocks))
        return host_id

    def take_copies(self) -> StepCopies:
        """The step's copies, for its SchedulerOutput; ends the step (the host blocks it reads are free again)."""
        copies, self.copies = self.copies, StepCopies()
        for block_id in copies.pinned:
            self.host.release(block_id)
        return copies

    def forget_copies(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """A step failed: the blocks its copies were to fill may not hold their KV. They leave the prefix cache, and
        a sequence swapped out into them is recomputed instead (its other host blocks released)."""
        for device_id, _ in swap_in:
            self.device.uncache(device_id)
        written = {self.num_blocks + host_index for _, host_index in swap_out}
        for host_id in written:
            self.host.uncache(host_id)
        for request_id in [r for r, swapped in self.swapped.items() if written.intersection(swapped.block_ids)]:
            for block_id in reversed(self.swapped.pop(request_id).block_ids):
                self.host.release(block_id)

    def _record_lookup(self, num_queried_tokens: int, computed_blocks: SequenceOf[int]) -> None:
        if self.enable_prefix_caching:
            stats = self.prefix_cache_stats
            stats.num_queried_tokens += num_queried_tokens
            stats.num_hit_tokens += len(computed_blocks) * self.block_size
            stats.num_host_hit_tokens += sum(self.block_size for block_id in computed_blocks
                                             if block_id not in self.device)
