"""One tier of KV blocks (the device's, or host memory's): reference counts, the LRU queue of free blocks and the
prefix cache of what they hold.

A block is in exactly one of two states: in use (ref_count > 0, held by that many owners: the block tables of
running sequences, or on the host a swapped-out sequence and the step that swaps it in) or free (ref_count == 0,
in the free queue). A free block keeps its hash and its KV, so a later request with the same prefix can take it
back out of the free queue (a prefix-cache hit) until allocation evicts it. Eviction order is LRU: blocks are
taken from the front of the free queue, freed blocks join at the back, and blocks holding nothing worth keeping
(no hash) join at the front.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

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


class BlockPool:
    """The blocks with ids first_id .. first_id + num_blocks - 1 (the tiers share one id space)."""

    def __init__(self, first_id: int, num_blocks: int) -> None:
        self.first_id, self.num_blocks = first_id, num_blocks
        self.blocks = [KVBlock(first_id + i) for i in range(num_blocks)]
        # Keys are block ids; values unused. Front = next to evict. O(1) removal of a reused hit.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(first_id, first_id + num_blocks))
        self.cached: dict[BlockHash, int] = {}  # full computed block content -> block id

    def __contains__(self, block_id: int) -> bool:
        return self.first_id <= block_id < self.first_id + self.num_blocks

    def block(self, block_id: int) -> KVBlock:
        return self.blocks[block_id - self.first_id]

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use; free blocks that still hold cached KV count as free."""
        return (self.num_blocks - self.num_free) / self.num_blocks if self.num_blocks else 0.0

    def take(self, block_id: int) -> None:
        """One more owner (a cache hit revives a free block)."""
        block = self.block(block_id)
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def release(self, block_id: int) -> None:
        """One owner fewer; the last one's leaving frees the block, its cached KV kept until evicted."""
        block = self.block(block_id)
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block_id] = None
            if block.block_hash is None:
                self.free_queue.move_to_end(block_id, last=False)

    def pop_free(self) -> tuple[int, BlockHash | None]:
        """Take the least recently used free block for one owner: (its id, the hash it held, now evicted, or None)."""
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.block(block_id)
        evicted, block.block_hash = block.block_hash, None
        if evicted is not None:  # its KV is about to be overwritten
            del self.cached[evicted]
        block.ref_count = 1
        return block_id, evicted

    def register(self, block_id: int, block_hash: BlockHash) -> None:
        # Two sequences admitted before either cached a shared prefix compute it twice; the first copy
        # stays the cached one and the second is a plain block, reused first once freed.
        block = self.block(block_id)
        if block.block_hash is None and block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block_id

    def uncache(self, block_id: int) -> None:
        block = self.block(block_id)
        if block.block_hash is not None and self.cached.get(block.block_hash) == block_id:
            del self.cached[block.block_hash]
        block.block_hash = None

    def reset_cache(self) -> None:
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
