"""The scheduler over two KV tiers: preempted sequences swap out and back instead of recomputing, when that is
cheaper; the fake runner moves the swapped blocks and checks every KV slot against the true prefix each step."""

import random

import pytest
from helpers import Harness, check_invariants, make_scheduler, make_seq

from scaleinfer.config import ArchConfig, CacheConfig
from scaleinfer.engine.sequence import SequenceStatus
from scaleinfer.engine.swap_cost import SwapCost

RECOMPUTE_ALWAYS = SwapCost(kv_bytes_per_token=1, linear_flops_per_token=1.0, attention_flops_per_pair=0.0,
                            h2d_bytes_per_s=1.0, flops_per_s=float("inf"))


LLAMA3_8B = ArchConfig(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=8192)
SMOLLM2_135M = ArchConfig(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                          num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                          max_position_embeddings=8192)


def next_of_prefix(scheduled):
    """A token that depends on the whole sequence so far: tokens swapped back wrong would change what follows."""
    return 1 + hash(tuple(scheduled.prompt_token_ids)) % 1000 + scheduled.num_output_tokens


def run(num_blocks, num_host_blocks, swap_cost=None, **seqs_and_config):
    harness = Harness(make_scheduler(num_blocks=num_blocks, block_size=4, num_host_blocks=num_host_blocks,
                                     swap_cost=swap_cost), next_token=next_of_prefix)
    harness.add(*(make_seq(name, 10, max_tokens=12) for name in "abcdef"))
    harness.run()
    return harness


def outputs(harness):
    return {name: seq.output_token_ids for name, seq in harness.sequences.items()}


def test_twice_the_device_budget_swaps_instead_of_recomputing():
    # six sequences of 22 tokens need 6 x 6 = 36 blocks at once; the device holds 18, the host the rest
    unconstrained = run(num_blocks=64, num_host_blocks=0)
    harness = run(num_blocks=18, num_host_blocks=24)
    stats = harness.scheduler.stats()
    assert stats.num_preempted > 0 and stats.num_swapped == stats.num_preempted  # no recompute
    assert harness.runner.num_copied > 0
    assert outputs(harness) == outputs(unconstrained)
    for seq in harness.sequences.values():  # each chunk after a swap resumes where the sequence stood
        starts = [start for start, _ in harness.chunks(seq.request_id)]
        assert starts == sorted(set(starts)), (seq.request_id, starts)
    harness.assert_no_leaks()


def test_recompute_when_it_is_cheaper_or_the_host_is_full():
    cheaper = run(num_blocks=18, num_host_blocks=24, swap_cost=RECOMPUTE_ALWAYS)
    full = run(num_blocks=18, num_host_blocks=2)  # a victim of 2 or more blocks does not fit
    for harness in (cheaper, full):
        stats = harness.scheduler.stats()
        assert stats.num_preempted > stats.num_swapped
        assert outputs(harness) == outputs(run(num_blocks=64, num_host_blocks=0))
        harness.assert_no_leaks()
    assert cheaper.scheduler.stats().num_swapped == 0


def test_a_swapped_sequence_aborted_while_it_waits_frees_its_host_blocks():
    harness = Harness(make_scheduler(num_blocks=4, block_size=4, num_host_blocks=8, enable_prefix_caching=False))
    harness.add(make_seq("a", 8, max_tokens=4), make_seq("b", 8, max_tokens=4))
    harness.step()
    output = harness.step()  # b gives way to a: its two blocks go to the host
    assert harness.scheduler.num_swapped == 1 and len(output.swap_out) == 2
    assert harness.scheduler.block_manager.host.num_free == 6
    harness.scheduler.abort(["b"])
    check_invariants(harness.scheduler)
    harness.run()
    harness.assert_no_leaks()


def test_swap_cost_by_model_shape():
    """At an H200's rates the 8B shape swaps and a 135M one recomputes (a small model's tokens are cheap to run
    again, its KV not much smaller); on a CPU, swapping wins for both."""
    cache = CacheConfig(kv_offload="cpu", kv_offload_memory=1 << 30)
    big, small = LLAMA3_8B, SMOLLM2_135M
    assert SwapCost.for_model(big, cache, 2, "cuda").prefers_swap(544)
    assert not SwapCost.for_model(small, cache, 2, "cuda").prefers_swap(544)
    assert SwapCost.for_model(small, cache, 4, "cpu").prefers_swap(544)
    slow_link = CacheConfig(kv_offload="cpu", kv_offload_memory=1 << 30, kv_offload_h2d_gb_s=0.1)
    assert not SwapCost.for_model(big, slow_link, 2, "cuda").prefers_swap(544)
    assert not SwapCost.for_model(big, cache, 2, "cuda").prefers_swap(0)


@pytest.mark.parametrize("seed", range(6))
def test_random_load_with_shared_prefixes_aborts_and_a_small_host(seed):
    """Mixed prompts sharing prefixes, chunked prefill, aborts, a host tier too small for every victim: invariants
    of both tiers around every step, every KV slot checked, no block left anywhere at the end."""
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=10, block_size=4, num_host_blocks=rng.choice([3, 8, 16]),
                               max_num_batched_tokens=rng.choice([6, 16]))
    harness = Harness(scheduler, next_token=next_of_prefix)
    shared = [list(range(100 * k, 100 * k + 9)) for k in range(3)]
    for step in range(400):
        if step < 60 and rng.random() < 0.5:
            tail = [rng.randrange(1000, 2000) for _ in range(rng.randint(1, 6))]
            prompt = rng.choice(shared)[:rng.randint(1, 9)] + tail
            harness.add(make_seq(f"r{step}", prompt, max_tokens=rng.randint(1, 16)))
        if scheduler.waiting and rng.random() < 0.05:
            scheduler.abort([rng.choice(list(scheduler.waiting)).request_id])
        harness.step()
        if step >= 60 and not scheduler.has_unfinished():
            break
    assert not scheduler.has_unfinished()
    assert all(seq.status is not SequenceStatus.RUNNING for seq in harness.sequences.values())
    harness.assert_no_leaks()
