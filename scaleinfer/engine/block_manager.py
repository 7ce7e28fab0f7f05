"""Paged KV blocks: allocation, reference counts and the prefix cache.

A block is in exactly one of two states: in use (ref_count > 0, held by the block tables of ref_count
running sequences) or free (ref_count == 0, in the free queue). A free block keeps its hash and its KV,
so a later request with the same prefix can take it back out of the free queue (a prefix-cache hit)
until allocation evicts it. Eviction order is LRU: blocks are taken from the front of the free queue,
freed blocks join at the back, and blocks holding nothing worth keeping (no hash) join at the front.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field

from scaleinfer.engine.sequence import Sequence

ROOT_DIGEST = b""  # the parent digest of a sequence's first block


@dataclass(frozen=True, slots=True)
class BlockHash:
    """Identity of a full block's KV: its token ids and a digest of every token before them.

    The dict key compares the token ids exactly and chains the prefix through SHA-256, so two different
    prefixes cannot share a key: Python's hash() of int tuples is unseeded and can be made to collide,
    which would hand one request another's KV.
    """

    parent_digest: bytes
    token_ids: tuple[int, ...]
    digest: bytes = field(compare=False)  # sha256(parent_digest + token_ids), the next block's parent

    @classmethod
    def of(cls, parent_digest: bytes, token_ids: tuple[int, ...]) -> BlockHash:
        digest = hashlib.sha256(parent_digest + array("q", token_ids).tobytes()).digest()
        return cls(parent_digest, token_ids, digest)


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None  # set once the block is full, computed and in the prefix cache


@dataclass(slots=True)
class PrefixCacheStats:
    num_queried_tokens: int = 0  # tokens of admitted sequences
    num_hit_tokens: int = 0  # of those, served from the cache

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Keys are block ids; values unused. Front = next to evict. O(1) removal of a reused hit.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_blocks: dict[BlockHash, int] = {}  # full computed block content -> block id
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use; free blocks that still hold cached KV count as free."""
        return (self.num_blocks - self.num_free_blocks) / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ---------------------------------------------------------------------------------

    def get_computed_blocks(self, seq: Sequence) -> tuple[list[int], int]:
        """The longest cached prefix of a waiting sequence: (block ids, number of tokens they hold).

        Never the whole sequence: at least one token must be left to compute so the step yields logits. None for
        a request that asks for prompt logprobs: they come from computing every prompt position.
        """
        if not self.enable_prefix_caching or seq.sampling_params.prompt_logprobs is not None:
            return [], 0
        num_full_blocks = (seq.num_tokens - 1) // self.block_size
        self._extend_block_hashes(seq, num_full_blocks)
        block_ids: list[int] = []
        for block_hash in seq.block_hashes[:num_full_blocks]:
            block_id = self.cached_blocks.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids, len(block_ids) * self.block_size

    def cache_full_blocks(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Register the blocks that become full once seq has num_computed_tokens computed.

        Call before advancing seq.num_computed_tokens: blocks below it are already registered.
        """
        first, end = seq.num_computed_tokens // self.block_size, num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or first == end:
            return
        self._extend_block_hashes(seq, end)
        for index in range(first, end):
            self._register(self.blocks[seq.block_ids[index]], seq.block_hashes[index])

    def uncache(self, block_ids: list[int]) -> None:
        """Take these blocks out of the prefix cache: the step that was to fill them failed."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.block_hash is not None and self.cached_blocks.get(block.block_hash) == block_id:
                del self.cached_blocks[block.block_hash]
            block.block_hash = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (benchmarks measuring cold prefills). Blocks in use keep their KV."""
        for block in self.blocks:
            block.block_hash = None
        self.cached_blocks.clear()

    def _register(self, block: KVBlock, block_hash: BlockHash) -> None:
        # Two sequences admitted before either cached a shared prefix compute it twice; the first copy
        # stays the cached one and the second is a plain block, reused first once freed.
        if block.block_hash is None and block_hash not in self.cached_blocks:
            block.block_hash = block_hash
            self.cached_blocks[block_hash] = block.block_id

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

        A sequence with no blocks is being admitted: computed_blocks (from get_computed_blocks) are taken
        first and the lookup counts in the prefix-cache stats. On shortage returns False, changes nothing.
        """
        if not computed_blocks and seq.num_computed_tokens + num_new_tokens <= len(seq.block_ids) * self.block_size:
            return True  # most decode steps: the last block has room (an admission holds no blocks)
        num_cached_tokens = len(computed_blocks) * self.block_size
        num_total_tokens = seq.num_computed_tokens + num_cached_tokens + num_new_tokens
        num_held_blocks = len(seq.block_ids) + len(computed_blocks)
        num_new_blocks = max(0, self.num_blocks_for(num_total_tokens) - num_held_blocks)
        num_revived = sum(1 for block_id in computed_blocks if self.blocks[block_id].ref_count == 0)
        if num_new_blocks + num_revived > self.num_free_blocks:
            return False
        if not seq.block_ids:
            self._record_lookup(seq.num_tokens, num_cached_tokens)
        for block_id in computed_blocks:
            self._take(self.blocks[block_id])
        seq.block_ids.extend(computed_blocks)
        seq.block_ids.extend(self._pop_free() for _ in range(num_new_blocks))
        return True

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks, tail first, so a shared prefix outlives the tails in the LRU order."""
        for block_id in reversed(seq.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.block_hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
        seq.block_ids = []  # rebound, not cleared: a table handed to the runner stays intact

    def _take(self, block: KVBlock) -> None:
        if block.ref_count == 0:
            del self.free_queue[block.block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: its KV is about to be overwritten
            del self.cached_blocks[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def _record_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        if self.enable_prefix_caching:
            self.prefix_cache_stats.num_queried_tokens += num_queried_tokens
            self.prefix_cache_stats.num_hit_tokens += num_hit_tokens
