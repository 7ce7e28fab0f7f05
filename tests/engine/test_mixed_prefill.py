"""max_mixed_prefill_tokens: the prompt tokens a step carries while sequences decode (the inter-token latency's
tail), the whole budget when none does, chunking that changes no KV, and the option's validation."""

import random

import pytest
from helpers import Harness, make_scheduler, make_seq
from test_scheduler import add_random, check_every_running_sequence_scheduled

from scaleinfer.config import OFFLOAD_MAX_BATCHED_TOKENS, EngineConfig, SchedulerConfig
from scaleinfer.errors import InvalidRequestError


def is_decode(s):
    """A chunk that computes only the sequence's last sampled token."""
    return s.num_tokens == 1 and s.sample and s.num_output_tokens > 0


def prompt_tokens(output):
    return sum(s.num_tokens for s in output.scheduled if not is_decode(s))


def decodes(output):
    return [s.request_id for s in output.scheduled if is_decode(s)]


def record_decoding(scheduler):
    """Before each schedule(), the running sequences that decode (append to the returned list)."""
    decoding, schedule = [], scheduler.schedule

    def recorded():
        decoding.append({seq.request_id for seq in scheduler.running
                         if seq.num_uncomputed_tokens == 1 and seq.output_token_ids})
        return schedule()

    scheduler.schedule = recorded
    return decoding


def test_a_long_prompt_beside_decodes_is_chunked_to_the_cap_and_every_decode_advances():
    harness = Harness(make_scheduler(num_blocks=200, max_num_batched_tokens=64, max_mixed_prefill_tokens=16))
    harness.add(*(make_seq(name, 3, max_tokens=50) for name in "abc"))
    harness.step()  # nothing decodes yet: the three prompts in one step
    harness.add(make_seq("long", 100, max_tokens=2))
    check_every_running_sequence_scheduled(harness.scheduler)
    while not harness.sequences["long"].output_token_ids:
        output = harness.step()
        assert decodes(output)[:3] == ["a", "b", "c"]
        assert prompt_tokens(output) <= 16 < 64 - 3  # the cap binds, not what the budget leaves
    assert harness.chunks("long") == [(16 * i, 16) for i in range(6)] + [(96, 4)]
    assert [harness.sequences[name].num_output_tokens for name in "abc"] == [1 + 7] * 3
    harness.run()
    harness.assert_no_leaks()


def test_the_cap_is_shared_by_a_running_prefill_and_new_admissions():
    harness = Harness(make_scheduler(num_blocks=200, max_num_batched_tokens=64, max_mixed_prefill_tokens=16))
    harness.add(make_seq("a", 3, max_tokens=50))
    harness.step()
    harness.add(make_seq("p", 20, max_tokens=2), make_seq("q", 10, max_tokens=2), make_seq("r", 10, max_tokens=2))
    outputs = [harness.step() for _ in range(4)]
    assert [[(s.request_id, s.num_tokens) for s in output.scheduled] for output in outputs] == [
        [("a", 1), ("p", 16)],
        [("a", 1), ("p", 4), ("q", 10), ("r", 2)],
        [("a", 1), ("p", 1), ("q", 1), ("r", 8)],
        [("a", 1), ("r", 1)],  # p and q had their 2 tokens
    ]
    harness.run()
    harness.assert_no_leaks()


def test_with_nothing_decoding_prompts_get_the_whole_budget():
    harness = Harness(make_scheduler(num_blocks=200, max_num_batched_tokens=64, max_mixed_prefill_tokens=16))
    harness.add(make_seq("long", 100, max_tokens=3), make_seq("other", 30, max_tokens=3))
    assert [harness.step().num_batched_tokens for _ in range(2)] == [64, 64]
    assert harness.chunks("long") == [(0, 64), (64, 36)]
    assert harness.chunks("other") == [(0, 28)]
    output = harness.step()  # long decodes now: other's last 2 prompt tokens fit under the cap
    assert [(s.request_id, s.num_tokens) for s in output.scheduled] == [("long", 1), ("other", 2)]
    harness.run()
    harness.assert_no_leaks()


def test_a_cap_above_the_budget_is_the_budget():
    harness = Harness(make_scheduler(num_blocks=64, max_num_batched_tokens=32, max_mixed_prefill_tokens=4096))
    harness.add(make_seq("short", 4, max_tokens=10))
    harness.step()
    harness.add(make_seq("long", 100, max_tokens=2))
    harness.run()
    assert harness.chunks("long")[:4] == [(0, 31), (31, 31), (62, 31), (93, 7)]  # what the budget leaves the decode


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_never_carries_more_prompt_beside_decodes_than_the_cap(seed):
    rng = random.Random(seed)
    cap = rng.choice([1, 2, 5, 8])
    scheduler = make_scheduler(num_blocks=rng.randint(8, 16), block_size=rng.choice([2, 4]),
                               enable_prefix_caching=rng.random() < 0.7, max_num_seqs=rng.randint(2, 6),
                               max_num_batched_tokens=rng.randint(8, 24), max_mixed_prefill_tokens=cap,
                               max_model_len=28)
    harness = Harness(scheduler, next_token=lambda s: rng.choice([0, 1, 2, 3, 7]))  # the runner checks the KV
    check_every_running_sequence_scheduled(scheduler)  # preemption included
    decoding = record_decoding(scheduler)
    prefixes = [[rng.randrange(50) for _ in range(8)] for _ in range(3)]
    for step in range(300):
        if step < 200 and rng.random() < 0.4:
            add_random(harness, rng, prefixes, f"r{step}")
        harness.step()
    harness.run()
    harness.assert_no_leaks()
    assert all(seq.is_finished for seq in harness.sequences.values())
    steps = list(zip(decoding, harness.outputs, strict=True))
    assert all(prompt_tokens(output) <= cap for ids, output in steps if ids)
    assert any(prompt_tokens(output) > cap for ids, output in steps if not ids)  # alone, prompts get the budget


@pytest.mark.parametrize("value", [0, -1, 1.5, True, None])
def test_bad_values_are_refused_naming_the_value(value):
    with pytest.raises(InvalidRequestError, match=f"max_mixed_prefill_tokens must be an integer >= 1, got {value!r}"):
        SchedulerConfig(max_mixed_prefill_tokens=value)


def test_defaults_and_offload():
    assert EngineConfig.from_kwargs().scheduler.max_mixed_prefill_tokens == 512
    assert EngineConfig.from_kwargs(max_mixed_prefill_tokens=64).scheduler.max_mixed_prefill_tokens == 64
    # streamed weights: every step passes over all of them, so the prompt is not split over more steps
    assert EngineConfig.from_kwargs(offload="cpu").scheduler.max_mixed_prefill_tokens == OFFLOAD_MAX_BATCHED_TOKENS
    streamed = EngineConfig.from_kwargs(offload="cpu", max_num_batched_tokens=4096).scheduler
    assert streamed.max_mixed_prefill_tokens == 4096
