"""The block manager's two tiers: swap-out and back, the prefix cache spilling to host memory and hit there, and
the step's copies (never a host block overwritten by the step that reads it), with every block owned or free."""

from collections import Counter

from helpers import make_seq
from test_block_manager import admit

from scaleinfer.engine.block_manager import BlockManager

BLOCK = 4


def swap_out(bm: BlockManager, seq) -> bool:
    """Preempt seq by swap, as the scheduler does: a waiting sequence computes from 0 until readmitted."""
    swapped = bm.swap_out(seq)
    if swapped:
        seq.num_computed_tokens = 0
    return swapped


def check_tiers(bm: BlockManager, *tables: list[int]) -> None:
    """Each block held by as many of `tables` (and swapped-out sequences) as its ref count says, or free."""
    held = Counter(b for table in tables for b in table)
    held.update(b for swapped in bm.swapped.values() for b in swapped.block_ids)
    for pool in (bm.device, bm.host):
        for block in pool.blocks:
            assert block.ref_count == held[block.block_id] and (block.ref_count == 0) == (block.block_id in
                                                                                           pool.free_queue), block
        for block_hash, block_id in pool.cached.items():
            assert pool.block(block_id).block_hash == block_hash


def test_swap_out_and_back_copies_only_what_the_device_lost():
    bm = BlockManager(num_blocks=4, block_size=BLOCK, num_host_blocks=4)
    a = make_seq("a", list(range(10)))
    admit(bm, a)
    table = list(a.block_ids)
    assert swap_out(bm, a)
    assert a.block_ids == [] and bm.num_free_blocks == 4 and bm.host.num_free == 1
    host_ids = bm.swapped["a"].block_ids
    assert bm.copies.swap_out == [(d, h - 4) for d, h in zip(table, host_ids)]
    assert [bm.host.block(h).block_hash for h in host_ids[:2]] == [bm.blocks[d].block_hash for d in table[:2]]
    bm.take_copies()
    check_tiers(bm)
    # The device still caches the two full blocks: only the tail comes back from the host.
    computed = bm.get_computed_blocks(a)
    assert computed == (table[:2] + host_ids[2:], 10)
    assert bm.allocate_slots(a, 1, computed.block_ids)
    assert a.block_ids[:2] == table[:2] and len(a.block_ids) == 3
    assert bm.copies.swap_in == [(a.block_ids[2], host_ids[2] - 4)] and "a" not in bm.swapped
    assert bm.prefix_cache_stats.num_queried_tokens == 10  # the readmission is no prefix lookup
    bm.take_copies()
    check_tiers(bm, a.block_ids)
    bm.free(a)
    check_tiers(bm)
    assert bm.num_free_blocks == 4 and bm.host.num_free == 4


def test_swap_out_shares_host_copies_and_refuses_without_room():
    bm = BlockManager(num_blocks=3, block_size=BLOCK, num_host_blocks=4)
    b = make_seq("b", list(range(9)))
    admit(bm, b)
    assert swap_out(bm, b)
    shared_seq = make_seq("c", list(range(9)))
    admit(bm, shared_seq)  # its prefix from the device cache, the tail fresh
    bm.take_copies()
    assert swap_out(bm, shared_seq)  # the two full blocks: the host copies b's swap-out made, shared
    assert len(bm.copies.swap_out) == 1
    assert bm.swapped["c"].block_ids[:2] == bm.swapped["b"].block_ids[:2]
    assert [bm.host.block(h).ref_count for h in bm.swapped["b"].block_ids] == [2, 2, 1]
    bm.take_copies()
    check_tiers(bm)
    d = make_seq("d", list(range(100, 110)))
    admit(bm, d)
    assert bm.host.num_free == 0
    assert not swap_out(bm, d) and len(d.block_ids) == 3 and not bm.copies.swap_out  # changes nothing
    check_tiers(bm, d.block_ids)
    for seq in (b, shared_seq, d):
        bm.free(seq)
    check_tiers(bm)
    assert bm.num_free_blocks == 3 and bm.host.num_free == 4


def test_evicted_prefix_spills_and_hits_from_the_host():
    bm = BlockManager(num_blocks=3, block_size=BLOCK, num_host_blocks=4)
    a = make_seq("a", list(range(9)))
    admit(bm, a)
    bm.free(a)
    x = make_seq("x", list(range(50, 62)))
    admit(bm, x)
    bm.free(x)
    spilled = bm.take_copies().swap_out
    c = make_seq("c", list(range(8)) + [99])
    computed = bm.get_computed_blocks(c)
    assert computed.num_tokens == 8 and all(b in bm.host for b in computed.block_ids)
    assert bm.allocate_slots(c, 1, computed.block_ids)
    copies = bm.take_copies()
    assert sorted(h for _, h in copies.swap_in) == sorted(h for _, h in spilled)  # back from where they went
    assert [d for d, _ in copies.swap_in] == c.block_ids[:2]
    assert [bm.blocks[d].block_hash for d in c.block_ids[:2]] == c.block_hashes[:2]  # cached on the device again
    assert bm.prefix_cache_stats.num_host_hit_tokens == 8 and bm.prefix_cache_stats.num_hit_tokens == 8
    check_tiers(bm, c.block_ids)
    assert len(bm.host.cached) == 2 + 2  # the host keeps a's blocks and x's two full blocks that spilled
    bm.free(c)
    check_tiers(bm)


def test_a_host_block_read_by_the_step_is_not_rewritten_in_it():
    bm = BlockManager(num_blocks=4, block_size=BLOCK, num_host_blocks=1)
    a = make_seq("a", list(range(5)))
    admit(bm, a)
    bm.free(a)
    admit(bm, x := make_seq("x", list(range(50, 66))))  # a's full block spills to the only host block
    bm.free(x)
    assert len(bm.take_copies().swap_out) == 1
    c = make_seq("c", list(range(4)) + [99])
    computed = bm.get_computed_blocks(c)
    assert bm.allocate_slots(c, 1, computed.block_ids)  # swapped in from host block 0, which the step now holds
    y = make_seq("y", list(range(70, 74)) + [1])
    assert bm.allocate_slots(y, 5)  # evicts x's cached blocks, as c did: no host block to spill them to
    copies = bm.take_copies()
    assert [h for _, h in copies.swap_in] == [0] and copies.swap_out == []
    assert bm.host.num_free == 1  # the step ended: host block 0 is free again, still caching a's block
    check_tiers(bm, c.block_ids, y.block_ids)


def test_a_block_spilled_and_hit_in_one_step_is_swapped_out_first():
    """The swap-in reads what the same step's swap-out writes: the worker runs swap-outs first."""
    bm = BlockManager(num_blocks=3, block_size=BLOCK, num_host_blocks=2)
    a = make_seq("a", list(range(5)))
    admit(bm, a)
    bm.free(a)
    x = make_seq("x", list(range(60, 68)))
    assert bm.allocate_slots(x, 8)  # a's unhashed tail and the unused block first
    assert not bm.copies.swap_out
    y = make_seq("y", [70, 71])
    assert bm.allocate_slots(y, 2)  # a's cached block: spilled
    bm.free(x)
    c = make_seq("c", list(range(4)) + [99])
    computed = bm.get_computed_blocks(c)
    assert bm.allocate_slots(c, 1, computed.block_ids)
    copies = bm.take_copies()
    (out_device, out_host), = copies.swap_out
    (in_device, in_host), = copies.swap_in
    assert in_host == out_host and out_device == y.block_ids[0] and in_device == c.block_ids[0]
    check_tiers(bm, y.block_ids, c.block_ids)


def test_freeing_a_swapped_sequence_releases_its_host_blocks():
    bm = BlockManager(num_blocks=4, block_size=BLOCK, enable_prefix_caching=False, num_host_blocks=4)
    a = make_seq("a", list(range(6)))
    admit(bm, a)
    assert swap_out(bm, a)
    bm.take_copies()
    assert bm.host.num_free == 2 and not bm.host.cached  # no hashes without the prefix cache
    bm.free(a)
    check_tiers(bm)
    assert bm.host.num_free == 4 and not bm.swapped


def test_a_failed_steps_copies_are_forgotten_and_its_swapped_sequences_recompute():
    bm = BlockManager(num_blocks=4, block_size=BLOCK, num_host_blocks=4)
    a = make_seq("a", list(range(10)))
    admit(bm, a)
    assert swap_out(bm, a)
    copies = bm.take_copies()
    bm.forget_copies(copies.swap_out, copies.swap_in)  # the step that was to copy them raised
    assert not bm.swapped and bm.host.num_free == 4 and not bm.host.cached
    assert bm.get_computed_blocks(a).num_tokens == 8  # a prefix lookup now: the device's cached blocks
    check_tiers(bm)
