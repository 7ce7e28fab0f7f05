import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FIXED_TOKEN, Harness, check_invariants, make_scheduler, make_seq

from scaleinfer.engine.scheduler import QueueFullError
from scaleinfer.engine.sequence import SequenceStatus
from scaleinfer.errors import InvalidRequestError, ScaleInferError

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_engine_does_not_import_torch():
    code = "import sys, scaleinfer.engine.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


# ---- admission -------------------------------------------------------------------------------------


def test_rejects_what_can_never_be_served():
    scheduler = make_scheduler(num_blocks=8, block_size=4, max_model_len=40)
    with pytest.raises(InvalidRequestError, match="empty prompt"):
        scheduler.add(make_seq("empty", []))
    message = "prompt has 30 tokens and max_tokens is 11; the model's context is 40"
    with pytest.raises(InvalidRequestError, match=message):
        scheduler.add(make_seq("long", 30, max_tokens=11))
    message = "prompt has 30 tokens and max_tokens is 10, which need 10 KV blocks; the KV cache has 8"
    with pytest.raises(InvalidRequestError, match=message):
        scheduler.add(make_seq("big", 30, max_tokens=10))
    scheduler.add(make_seq("fits", 30, max_tokens=3))  # 32 KV slots: exactly 8 blocks
    with pytest.raises(InvalidRequestError, match="'fits' is already in use"):
        scheduler.add(make_seq("fits", 3))
    assert scheduler.num_waiting == 1


def test_full_waiting_queue_raises_queue_full():
    scheduler = make_scheduler(max_waiting=2)
    scheduler.add(make_seq("a", 4))
    scheduler.add(make_seq("b", 4))
    with pytest.raises(QueueFullError, match="2 requests, max_waiting=2") as info:
        scheduler.add(make_seq("c", 4))
    assert isinstance(info.value, ScaleInferError) and not isinstance(info.value, InvalidRequestError)
    scheduler.schedule()  # both admitted: room again
    scheduler.add(make_seq("c", 4))


# ---- batching --------------------------------------------------------------------------------------


def test_chunked_prefill_under_token_budget_with_decodes_alongside():
    harness = Harness(make_scheduler(num_blocks=64, max_num_batched_tokens=32))
    harness.add(make_seq("short", 4, max_tokens=10))
    harness.step()
    harness.add(make_seq("long", 100, max_tokens=2))
    for _ in range(4):
        output = harness.step()
        assert [s.request_id for s in output.scheduled] == ["short", "long"]
        assert output.num_batched_tokens == 32 or output.scheduled[1].sample
    assert harness.chunks("long") == [(0, 31), (31, 31), (62, 31), (93, 7)]
    samples = [s.sample for out in harness.outputs for s in out.scheduled if s.request_id == "long"]
    assert samples == [False, False, False, True]
    assert harness.sequences["long"].output_token_ids == [FIXED_TOKEN]
    harness.run()
    harness.assert_no_leaks()


def test_prefill_alone_takes_four_steps_of_32():
    harness = Harness(make_scheduler(num_blocks=64, max_num_batched_tokens=32))
    harness.add(make_seq("long", 100, max_tokens=1))
    assert harness.run() == 4
    assert harness.chunks("long") == [(0, 32), (32, 32), (64, 32), (96, 4)]
    harness.assert_no_leaks()


def test_request_joins_mid_run():
    harness = Harness(make_scheduler())
    harness.add(make_seq("a", 5, max_tokens=6))
    harness.step()
    harness.step()
    harness.add(make_seq("b", 3, max_tokens=2))
    output = harness.step()
    assert [(s.request_id, s.start_pos, s.num_tokens, s.is_prefill) for s in output.scheduled] == [
        ("a", 6, 1, False), ("b", 0, 3, True)]
    harness.run()
    assert harness.sequences["a"].output_token_ids == [FIXED_TOKEN] * 6
    assert harness.sequences["b"].finish_reason == "length"
    harness.assert_no_leaks()


def test_max_num_seqs_limits_admission():
    harness = Harness(make_scheduler(max_num_seqs=2))
    harness.add(*(make_seq(name, 3, max_tokens=2) for name in "abc"))
    output = harness.step()
    assert [s.request_id for s in output.scheduled] == ["a", "b"] and harness.scheduler.num_waiting == 1
    harness.run()
    harness.assert_no_leaks()


def check_every_running_sequence_scheduled(scheduler):
    """From now on each schedule() must give every sequence running after it its tokens: none is left out."""
    schedule = scheduler.schedule

    def checked():
        output = schedule()
        assert [s.request_id for s in output.scheduled] == [seq.request_id for seq in scheduler.running]
        return output

    scheduler.schedule = checked


def test_running_decodes_get_a_token_every_step_while_a_huge_prompt_prefills():
    harness = Harness(make_scheduler(num_blocks=700, max_num_batched_tokens=16))
    harness.add(*(make_seq(name, 3, max_tokens=200) for name in "abc"))
    harness.step()
    harness.add(make_seq("huge", 2000, max_tokens=2))
    check_every_running_sequence_scheduled(harness.scheduler)
    while not harness.sequences["huge"].output_token_ids:
        output = harness.step()
        assert [(s.request_id, s.num_tokens) for s in output.scheduled][:3] == [("a", 1), ("b", 1), ("c", 1)]
    assert harness.chunks("huge") == [(13 * i, 13) for i in range(153)] + [(1989, 11)]
    assert harness.sequences["a"].num_output_tokens == 1 + 154
    harness.run()
    harness.assert_no_leaks()


def test_no_more_sequences_run_than_a_step_has_tokens():
    # 8 may run, but a step has 4 tokens: a 5th running sequence would get none, step after step; admission
    # with only what the running ones leave keeps it out
    harness = Harness(make_scheduler(max_num_batched_tokens=4, max_num_seqs=8))
    harness.add(*(make_seq(name, 2, max_tokens=12) for name in "abcdefgh"))
    check_every_running_sequence_scheduled(harness.scheduler)
    harness.run()
    assert max(len(output.scheduled) for output in harness.outputs) == 4
    assert all(seq.num_output_tokens == 12 for seq in harness.sequences.values())
    harness.assert_no_leaks()


def test_update_returns_only_sequences_that_sampled():
    harness = Harness(make_scheduler(max_num_batched_tokens=8))
    harness.add(make_seq("a", 3), make_seq("b", 10))
    scheduler = harness.scheduler
    output = scheduler.schedule()
    updated = scheduler.update(output, harness.runner.execute(output))
    assert [seq.request_id for seq in updated] == ["a"]


# ---- preemption ------------------------------------------------------------------------------------


@pytest.mark.parametrize("enable_prefix_caching", [False, True])
def test_preemption_under_tiny_pool_completes_everything(enable_prefix_caching):
    harness = Harness(make_scheduler(num_blocks=6, block_size=4, enable_prefix_caching=enable_prefix_caching))
    harness.add(*(make_seq(name, 6, max_tokens=10) for name in "abc"))
    harness.run()
    assert all(seq.output_token_ids == [FIXED_TOKEN] * 10 for seq in harness.sequences.values())
    assert harness.scheduler.stats().num_preempted > 0
    assert sum(out.num_preempted for out in harness.outputs) == harness.scheduler.num_preempted
    harness.assert_no_leaks()


def test_preempted_sequence_recomputes_all_its_tokens():
    harness = Harness(make_scheduler(num_blocks=6, block_size=4, enable_prefix_caching=False))
    harness.add(*(make_seq(name, 6, max_tokens=10) for name in "abc"))
    harness.run()
    victims = [seq for seq in harness.sequences.values() if seq.num_preemptions]
    assert victims
    for seq in victims:
        restarts = [(start, n) for start, n in harness.chunks(seq.request_id)[1:] if start == 0]
        assert restarts and all(n > seq.num_prompt_tokens for _, n in restarts)  # prompt + generated
        assert seq.num_cached_tokens == 0
    harness.assert_no_leaks()


def test_last_running_sequence_preempts_itself():
    # a holds 2 blocks, b holds 2; b needs a 3rd while none is free: b (the last) gives way to a
    harness = Harness(make_scheduler(num_blocks=4, block_size=4, enable_prefix_caching=False))
    harness.add(make_seq("a", 8, max_tokens=4), make_seq("b", 8, max_tokens=4))
    harness.step()
    harness.step()  # both write position 8: a takes the 3rd block, b is preempted
    assert harness.sequences["b"].status is SequenceStatus.WAITING
    assert [s.request_id for s in harness.outputs[-1].scheduled] == ["a"]
    assert harness.outputs[-1].num_preempted == 1
    harness.run()
    harness.assert_no_leaks()


# ---- stopping --------------------------------------------------------------------------------------


def run_one(seq, tokens, **config):
    """Run seq alone with the runner emitting `tokens` in order; returns the finished sequence."""
    harness = Harness(make_scheduler(**config), next_token=lambda s: tokens[harness.sequences[s.request_id]
                                                                           .num_output_tokens])
    harness.add(seq)
    harness.run()
    harness.assert_no_leaks()
    return seq


def test_eos_stops():
    seq = run_one(make_seq("a", 3, max_tokens=8, eos_token_ids=(2,)), [5, 2, 5, 5])
    assert seq.output_token_ids == [5, 2] and seq.status is SequenceStatus.FINISHED_STOPPED
    assert seq.finish_reason == "stop" and seq.stop_reason is None


def test_ignore_eos_runs_to_max_tokens():
    seq = run_one(make_seq("a", 3, max_tokens=4, eos_token_ids=(2,), ignore_eos=True), [2, 2, 2, 2])
    assert seq.output_token_ids == [2, 2, 2, 2] and seq.finish_reason == "length"


def test_min_tokens_defers_eos_and_stop_tokens():
    seq = run_one(make_seq("a", 3, max_tokens=8, eos_token_ids=(2,), min_tokens=3, stop_token_ids=[9]),
                  [2, 9, 2, 5])
    assert seq.output_token_ids == [2, 9, 2] and seq.finish_reason == "stop"


def test_stop_token_id_is_the_stop_reason():
    seq = run_one(make_seq("a", 3, max_tokens=8, stop_token_ids=[9, 11]), [5, 11, 5])
    assert seq.output_token_ids == [5, 11] and seq.stop_reason == 11 and seq.finish_reason == "stop"


def test_max_tokens_finishes_with_length():
    seq = run_one(make_seq("a", 3, max_tokens=3, eos_token_ids=(2,)), [5, 5, 5, 5])
    assert seq.output_token_ids == [5, 5, 5] and seq.status is SequenceStatus.FINISHED_LENGTH


def test_finish_for_a_stop_string():
    harness = Harness(make_scheduler())
    harness.add(make_seq("a", 3, max_tokens=8))
    harness.step()
    harness.scheduler.finish("a", SequenceStatus.FINISHED_STOPPED, "###")
    seq = harness.sequences["a"]
    assert seq.stop_reason == "###" and seq.finish_reason == "stop" and not harness.scheduler.has_unfinished()
    assert harness.scheduler.schedule().finished_request_ids == ["a"]
    harness.assert_no_leaks()


# ---- abort -----------------------------------------------------------------------------------------


def test_abort_waiting_and_running():
    harness = Harness(make_scheduler(max_num_seqs=1))
    harness.add(make_seq("run", 3, max_tokens=8), make_seq("wait", 3))
    harness.step()
    scheduler = harness.scheduler
    assert (scheduler.num_running, scheduler.num_waiting) == (1, 1)
    scheduler.abort(["wait", "run", "unknown", "run"])
    assert [harness.sequences[r].finish_reason for r in ("run", "wait")] == ["abort", "abort"]
    assert not scheduler.has_unfinished() and scheduler.get("run") is None
    output = scheduler.schedule()
    assert output.is_empty and output.finished_request_ids == ["wait", "run"]
    assert scheduler.schedule().finished_request_ids == []
    harness.assert_no_leaks()


def test_abort_while_the_step_runs_is_ignored_by_update():
    harness = Harness(make_scheduler())
    harness.add(make_seq("a", 3))
    output = harness.scheduler.schedule()
    harness.scheduler.abort(["a"])
    assert harness.scheduler.update(output, harness.runner.execute(output)) == []
    assert harness.sequences["a"].output_token_ids == []
    harness.assert_no_leaks()


# ---- prefix caching through the scheduler ----------------------------------------------------------


def test_later_request_reuses_a_cached_prompt_prefix():
    harness = Harness(make_scheduler(block_size=4))
    system = list(range(100, 112))
    harness.add(make_seq("a", system + [1, 2], max_tokens=2))
    harness.run()
    harness.add(make_seq("b", system + [3], max_tokens=2))
    harness.step()
    assert harness.chunks("b")[0] == (12, 1) and harness.sequences["b"].num_cached_tokens == 12
    harness.run()
    assert harness.scheduler.stats().prefix_cache_hit_rate == 12 / (14 + 13)
    harness.assert_no_leaks()


def test_requests_admitted_in_the_same_step_share_blocks():
    harness = Harness(make_scheduler(block_size=4))
    prompt = list(range(10))
    harness.add(make_seq("a", prompt), make_seq("b", prompt))
    output = harness.step()  # the fake runner checks b reads a's KV written in this step
    assert [(s.start_pos, s.num_tokens) for s in output.scheduled] == [(0, 10), (8, 2)]
    a, b = harness.sequences["a"], harness.sequences["b"]
    assert a.block_ids[:2] == b.block_ids[:2]
    assert [harness.scheduler.block_manager.blocks[i].ref_count for i in a.block_ids[:2]] == [2, 2]
    harness.run()
    assert a.output_token_ids == b.output_token_ids
    harness.assert_no_leaks()


def test_outputs_are_the_same_with_prefix_caching_on_and_off():
    def next_token(s):
        return sum(harness.sequences[s.request_id].all_token_ids) % 13

    results = []
    for enabled in (False, True):
        harness = Harness(make_scheduler(num_blocks=12, block_size=4, enable_prefix_caching=enabled,
                                         max_num_batched_tokens=16), next_token=next_token)
        harness.add(*(make_seq(str(i), [1, 2, 3, 4, 5, 6, 7, i], max_tokens=6) for i in range(5)))
        harness.run()
        harness.assert_no_leaks()
        results.append({rid: seq.output_token_ids for rid, seq in harness.sequences.items()})
    assert results[0] == results[1]


def test_stats():
    harness = Harness(make_scheduler(num_blocks=10, max_num_seqs=1))
    harness.add(make_seq("a", 8), make_seq("b", 3))
    harness.step()
    stats = harness.scheduler.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_preempted) == (1, 1, 0)
    assert stats.kv_cache_usage == 2 / 10 and stats.prefix_cache_hit_rate == 0.0


# ---- randomized stress -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_keeps_invariants(seed):
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=rng.randint(8, 16), block_size=rng.choice([2, 4]),
                               enable_prefix_caching=rng.random() < 0.7, max_num_seqs=rng.randint(1, 6),
                               max_num_batched_tokens=rng.randint(4, 24), max_model_len=28)
    harness = Harness(scheduler, next_token=lambda s: rng.choice([0, 1, 2, 3, FIXED_TOKEN]))
    check_every_running_sequence_scheduled(scheduler)  # preemption included
    prefixes = [[rng.randrange(50) for _ in range(8)] for _ in range(3)]
    for step in range(400):
        if step < 300 and rng.random() < 0.3:
            add_random(harness, rng, prefixes, f"r{step}")
        if rng.random() < 0.05 and scheduler.requests:
            scheduler.abort([rng.choice(list(scheduler.requests))])
        harness.step()
    harness.run()
    check_invariants(scheduler)
    harness.assert_no_leaks()
    for seq in harness.sequences.values():
        assert seq.is_finished
        assert seq.finish_reason == "abort" or seq.num_output_tokens >= seq.sampling_params.min_tokens


def add_random(harness, rng, prefixes, request_id):
    prompt = rng.choice(prefixes)[:rng.randint(0, 8)] + [rng.randrange(50) for _ in range(rng.randint(1, 10))]
    max_tokens = rng.randint(1, 10)
    seq = make_seq(request_id, prompt, max_tokens=max_tokens, eos_token_ids=(0,), stop_token_ids=[1],
                   min_tokens=rng.randint(0, max_tokens), ignore_eos=rng.random() < 0.2)
    try:
        harness.add(seq)
    except InvalidRequestError:
        assert harness.scheduler.block_manager.num_blocks_for(len(prompt) + max_tokens - 1) > \
            harness.scheduler.block_manager.num_blocks
