"""The host KV tier's copies against the block manager's contract (swap-outs in order, then swap-ins): the same
bytes in both tiers as plain sequential copies give, over several steps, on the CPU and (marked gpu) on a GPU,
where the copies run on a side stream the compute stream must wait for."""

import pytest
import torch

from scaleinfer.offload import kv_host
from scaleinfer.offload.kv_host import HostKVCache

NUM_DEVICE_BLOCKS, NUM_HOST_BLOCKS, NUM_LAYERS = 12, 10, 3
BLOCK_SHAPE = (4, 2, 8)  # block_size, kv_heads, head_dim

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# (swap_out, swap_in) per step, (device block, host block) pairs as the block manager makes them: runs of host
# blocks, a host block written twice (the last write wins), a device block swapped out then reused by a swap-in,
# a swap-in of what the same step swaps out, more swap-ins than one staging chunk.
STEPS = [
    ([(0, 0), (1, 1), (2, 2), (5, 7)], []),
    ([(3, 3), (4, 3), (6, 4)], [(0, 0), (9, 7)]),
    ([(1, 5), (2, 6)], [(1, 1), (2, 5), (7, 6), (8, 3), (10, 4)]),
    ([], [(3, 0), (4, 1), (5, 2), (6, 3), (11, 4), (0, 5), (9, 6)]),
]


def make_caches(device, dtype):
    g = torch.Generator().manual_seed(0)
    shape = (NUM_DEVICE_BLOCKS + 1, *BLOCK_SHAPE)  # the runner's scratch block too
    return [tuple(torch.randn(shape, generator=g).to(dtype).to(device) for _ in range(2)) for _ in range(NUM_LAYERS)]


def reference_step(device_blocks, host_blocks, swap_out, swap_in):
    """The contract, one block at a time: {block id: [K/V of each layer]} dicts."""
    for device, host in swap_out:
        host_blocks[host] = [t.clone() for t in device_blocks[device]]
    for device, host in swap_in:
        device_blocks[device] = [t.clone() for t in host_blocks[host]]


def device_blocks_of(caches):
    return {b: [t[b].cpu().clone() for kv in caches for t in kv] for b in range(NUM_DEVICE_BLOCKS)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swaps_move_the_same_bytes_as_sequential_copies(device, dtype, monkeypatch):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    monkeypatch.setattr(kv_host, "MAX_STAGED_BLOCKS", 3)
    caches = make_caches(device, dtype)
    tier = HostKVCache(caches, NUM_HOST_BLOCKS, torch.device(device))
    assert tier.pinned == (device == "cuda")
    want_device, want_host = device_blocks_of(caches), {}
    for swap_out, swap_in in STEPS:
        tier.swap(swap_out, swap_in)
        reference_step(want_device, want_host, swap_out, swap_in)
        if device == "cuda":
            torch.cuda.synchronize()
        assert_same(want_device, device_blocks_of(caches))
        for host, tensors in want_host.items():
            got = tier.blocks[host].view(2 * NUM_LAYERS, -1)
            for row, want in zip(got, tensors, strict=True):
                assert torch.equal(row, want.contiguous().view(torch.uint8).flatten()), host


def assert_same(want, got):
    for block, tensors in want.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, got[block], strict=True)), block


@pytest.mark.gpu
def test_the_compute_stream_waits_for_swap_ins_and_for_reads_of_blocks_going_out():
    """Right after swap(), work on the current stream overwrites the block going out and reads the block coming in:
    the host still gets the old bytes, the read the new ones."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    caches = make_caches("cuda", torch.float32)
    big = torch.randn(4096, 4096, device="cuda")
    tier = HostKVCache(caches, NUM_HOST_BLOCKS, torch.device("cuda"))
    tier.swap([(2, 4)], [])
    torch.cuda.synchronize()
    old_block_2, host_4 = caches[0][0][2].clone(), caches[0][0][2].cpu()
    for _ in range(20):  # keep the side stream busy behind the compute stream
        big = big @ big / 4096
    tier.swap([(2, 5)], [(7, 4)])
    caches[0][0][2].fill_(-1.0)  # the forward reusing the block swapped out
    read = caches[0][0][7].clone()  # the forward reading the block swapped in
    torch.cuda.synchronize()
    assert torch.equal(read.cpu(), host_4)
    got = tier.blocks[5].view(2 * NUM_LAYERS, -1)[0]
    assert torch.equal(got, old_block_2.cpu().view(torch.uint8).flatten())
