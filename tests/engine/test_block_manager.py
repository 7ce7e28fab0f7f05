from helpers import make_seq

from scaleinfer.engine.block_manager import BlockHash, BlockManager


def admit(bm: BlockManager, seq, num_new_tokens=None):
    """Look up, allocate and mark computed, as the scheduler does for a whole prompt."""
    blocks, num_cached = bm.get_computed_blocks(seq)
    num_new = seq.num_tokens - num_cached if num_new_tokens is None else num_new_tokens
    assert bm.allocate_slots(seq, num_new, blocks)
    seq.num_computed_tokens = num_cached
    bm.cache_full_blocks(seq, num_cached + num_new)
    seq.num_computed_tokens = num_cached + num_new
    return num_cached


def test_allocate_and_free():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq("a", 10)
    assert bm.allocate_slots(seq, 10)
    assert len(seq.block_ids) == 3 and bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_ids)
    assert bm.usage == 3 / 8
    seq.num_computed_tokens = 10
    assert bm.allocate_slots(seq, 2)  # 12 tokens still fit in 3 blocks
    assert len(seq.block_ids) == 3
    assert bm.allocate_slots(seq, 3)
    assert len(seq.block_ids) == 4
    bm.free(seq)
    assert seq.block_ids == [] and bm.num_free_blocks == 8 and bm.usage == 0.0
    assert all(block.ref_count == 0 for block in bm.blocks)


def test_shortage_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq("a", 10)
    assert not bm.allocate_slots(seq, 10)
    assert seq.block_ids == [] and bm.num_free_blocks == 2


def test_prefix_shared_by_two_sequences():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq("a", list(range(10)))
    b = make_seq("b", list(range(8)) + [50, 51, 52])
    assert admit(bm, a) == 0
    assert admit(bm, b) == 8
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert [bm.blocks[i].ref_count for i in a.block_ids] == [2, 2, 1]
    assert bm.num_free_blocks == 16 - 4
    assert (bm.prefix_cache_stats.num_queried_tokens, bm.prefix_cache_stats.num_hit_tokens) == (21, 8)
    assert bm.prefix_cache_stats.hit_rate == 8 / 21
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_ids[:2]] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 16


def test_freed_blocks_are_hit_from_the_free_queue():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq("a", list(range(9)))
    admit(bm, a)
    first_two = a.block_ids[:2]
    bm.free(a)
    again = make_seq("a2", list(range(9)))
    assert admit(bm, again) == 8
    assert again.block_ids[:2] == first_two
    assert bm.num_free_blocks == 4 - 3


def test_never_hits_the_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    admit(bm, make_seq("a", list(range(8))))
    twin = make_seq("b", list(range(8)))
    blocks, num_cached = bm.get_computed_blocks(twin)
    assert num_cached == 4 and len(blocks) == 1  # one token must be left to compute for the logits
    assert bm.get_computed_blocks(make_seq("c", list(range(9))))[1] == 8


def test_lru_eviction_order_and_eviction_drops_hash():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq("a", list(range(8)))
    admit(bm, a)
    head, tail = a.block_ids
    bm.free(a)  # tail joins the queue before head: evicted first
    plain = make_seq("p", list(range(100, 104)))
    assert bm.allocate_slots(plain, 12)  # two never-hashed blocks, then the tail
    assert set(plain.block_ids[:2]).isdisjoint({head, tail}) and plain.block_ids[2] == tail
    assert bm.blocks[tail].block_hash is None and len(bm.cached_blocks) == 1
    assert bm.get_computed_blocks(make_seq("a2", list(range(9)))) == ([head], 4)
    bm.free(plain)
    # unhashed blocks go to the front of the queue, so the cached head survives the next allocation
    other = make_seq("o", list(range(200, 212)))
    assert bm.allocate_slots(other, 12) and head not in other.block_ids
    assert bm.get_computed_blocks(make_seq("a3", list(range(9)))) == ([head], 4)


def test_generated_tokens_blocks_are_cached():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq("a", [1, 2, 3])
    admit(bm, a)
    for token_id in (4, 5, 6):
        a.append_token(token_id)
        assert bm.allocate_slots(a, 1)
        bm.cache_full_blocks(a, a.num_computed_tokens + 1)
        a.num_computed_tokens += 1
    follower = make_seq("b", [1, 2, 3, 4, 5, 6, 9])
    assert bm.get_computed_blocks(follower) == (a.block_ids[:1], 4)


def test_same_block_in_another_prefix_is_no_hit():
    bm = BlockManager(num_blocks=8, block_size=4)
    admit(bm, make_seq("a", [1, 2, 3, 4, 5, 6, 7, 8, 0]))
    assert bm.get_computed_blocks(make_seq("b", [9, 9, 9, 9, 5, 6, 7, 8, 0])) == ([], 0)
    first = BlockHash.of(b"", (1, 2, 3, 4))
    assert first == BlockHash.of(b"", (1, 2, 3, 4)) and first != BlockHash.of(b"", (1, 2, 3, 5))
    assert BlockHash.of(first.digest, (5,)) != BlockHash.of(b"", (5,))


def test_prefix_computed_twice_keeps_one_cached_copy():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq("a", list(range(5))), make_seq("b", list(range(5)))
    for seq in (a, b):  # both allocated before either is marked computed: no hit for b
        assert bm.allocate_slots(seq, 5)
    for seq in (a, b):
        bm.cache_full_blocks(seq, 5)
    assert bm.cached_blocks == {bm.blocks[a.block_ids[0]].block_hash: a.block_ids[0]}
    assert bm.blocks[b.block_ids[0]].block_hash is None
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8 and len(bm.cached_blocks) == 1


def test_prefix_caching_off():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    admit(bm, make_seq("a", list(range(9))))
    assert bm.get_computed_blocks(make_seq("b", list(range(9)))) == ([], 0)
    assert not bm.cached_blocks and bm.prefix_cache_stats.num_queried_tokens == 0


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq("a", list(range(9)))
    admit(bm, a)
    bm.free(a)
    bm.reset_prefix_cache()
    assert not bm.cached_blocks and all(block.block_hash is None for block in bm.blocks)
    assert bm.get_computed_blocks(make_seq("b", list(range(9)))) == ([], 0)
