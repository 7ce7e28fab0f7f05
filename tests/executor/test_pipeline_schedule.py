"""The pipeline's pure decisions: the stage split, the hybrid rule's counts and sizes, and the scheduler's
micro-batches over disjoint sequences (in flight ones skipped, never preempted), without any process."""

import pytest
from cli_helpers import config_of

from scaleinfer.config import SchedulerConfig
from scaleinfer.engine.block_manager import BlockManager
from scaleinfer.engine.micro_batches import MicroBatchQueue
from scaleinfer.engine.scheduler import Scheduler
from scaleinfer.engine.sequence import Sequence
from scaleinfer.outputs import RunnerOutput, SampledToken
from scaleinfer.parallel.pipeline import MicroBatchBudget, MicroBatchPlan, stage_layers
from scaleinfer.sampling_params import SamplingParams


def test_stages_own_contiguous_layers_the_first_ones_one_more():
    assert [stage_layers(5, p, 2) for p in range(2)] == [range(0, 3), range(3, 5)]
    assert [stage_layers(5, p, 4) for p in range(4)] == [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    assert [stage_layers(80, p, 4) for p in range(4)] == [range(i * 20, i * 20 + 20) for i in range(4)]
    with pytest.raises(ValueError, match="pipeline_parallel_size=6 must be in"):
        stage_layers(5, 0, 6)


def test_the_hybrid_rule():
    hybrid, fixed = MicroBatchPlan(pp_size=2), MicroBatchPlan(pp_size=2, schedule="fixed", num_micro_batches=3)
    assert (hybrid.num_slots(prompt_phase=False), hybrid.num_slots(prompt_phase=True)) == (2, 4)
    assert (fixed.num_slots(False), fixed.num_slots(True)) == (3, 3)
    # token phase: the decodes split evenly over P micro-batches, the whole budget each
    assert hybrid.budget(2048, num_running=256, num_pending_prompt=0) == MicroBatchBudget(2048, 128)
    # prompt phase, plenty pending: 2P pieces of B / 2 (plus the micro-batch's share of decodes)
    share = hybrid.budget(2048, num_running=10, num_pending_prompt=100_000)
    assert (share.num_tokens, share.max_running) == (1024 + 5, 5)
    # little pending: spread evenly over the 2P micro-batches
    assert hybrid.budget(2048, num_running=0, num_pending_prompt=400).num_tokens == 100 + 1
    assert fixed.budget(2048, num_running=256, num_pending_prompt=400) == MicroBatchBudget(2048, 86)
    assert MicroBatchPlan().budget(2048, 256, 10) == MicroBatchBudget(2048, 256)  # one stage: the step as it always was


def scheduler_with(num_seqs, pp_size=2, num_blocks=64, **config):
    plan = MicroBatchPlan(pp_size=pp_size)
    scheduler = Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, 4, True), plan)
    for i in range(num_seqs):
        scheduler.add(Sequence(str(i), [1 + i] * 6, SamplingParams(max_tokens=4, ignore_eos=True), ()))
    return scheduler


def tokens_for(output):
    return RunnerOutput(sampled={s.request_id: SampledToken(7) for s in output.scheduled if s.sample})


def test_micro_batches_hold_disjoint_sequences_until_they_come_back():
    scheduler = scheduler_with(6, max_num_batched_tokens=12)
    first, second = scheduler.schedule(), scheduler.schedule()
    ids = [{s.request_id for s in o.scheduled} for o in (first, second)]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert scheduler.in_flight == ids[0] | ids[1]
    scheduler.update(first, tokens_for(first))
    assert scheduler.in_flight == ids[1]
    third = scheduler.schedule()
    assert not {s.request_id for s in third.scheduled} & ids[1]


def test_in_flight_sequences_are_never_preempted():
    # 4 blocks of 4 tokens: two 6-token prompts fill them; their next tokens need blocks the cache lacks.
    scheduler = scheduler_with(2, num_blocks=4, max_num_batched_tokens=6)
    first, second = scheduler.schedule(), scheduler.schedule()
    scheduler.update(first, tokens_for(first))
    for _ in range(3):  # the first sequence decodes beside the second in flight: it, not the other, gives way
        output = scheduler.schedule()
        assert "1" in scheduler.in_flight and scheduler.requests["1"].num_preemptions == 0
        scheduler.update(output, tokens_for(output))
    scheduler.update(second, tokens_for(second))


def test_the_queue_fills_the_slots_and_collects_in_order():
    class Executor:
        num_stages = 2

        def __init__(self):
            self.submitted, self.collected, self.in_flight_at_collect = [], [], []

        def submit(self, output):
            self.submitted.append(output)
            return len(self.submitted) - 1

        def collect(self, handle):
            self.collected.append(handle)
            self.in_flight_at_collect.append(len(self.submitted) - handle)
            return tokens_for(self.submitted[handle])

    scheduler, executor = scheduler_with(8, max_num_batched_tokens=64), Executor()
    queue = MicroBatchQueue(scheduler, executor)
    while scheduler.has_unfinished():
        output = queue.schedule()
        scheduler.update(output, queue.execute(output))
    # what is left in flight carries only finished ids (the workers drop those sequences' state)
    assert all(output.is_empty for output, _ in queue.in_flight)
    assert executor.collected == list(range(len(executor.submitted) - len(queue.in_flight)))
    assert scheduler.block_manager.num_free_blocks == 64 and not scheduler.in_flight
    # 48 prompt tokens pending: the prompt phase fills 2P = 4 slots of at most ceil(48 / 4) = 12 tokens (+ 1 for a
    # decode), each over what is still pending (48 -> 13, 35 -> 10, 25 -> 8, 17 -> 6)
    assert executor.in_flight_at_collect[0] == 4
    assert [o.num_batched_tokens for o in executor.submitted[:4]] == [13, 10, 8, 6]
    assert max(executor.in_flight_at_collect[-6:]) <= 2  # the token phase: P micro-batches


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve"]])
def test_pipeline_flags_reach_the_parallel_config(command, monkeypatch):
    parallel = config_of([*command, "--pipeline-parallel-size", "4", "--tensor-parallel-size", "2",
                          "--pipeline-schedule", "fixed", "--pipeline-micro-batches", "6"], monkeypatch).parallel
    assert (parallel.pipeline_parallel_size, parallel.world_size, parallel.pipeline_schedule,
            parallel.pipeline_micro_batches) == (4, 8, "fixed", 6)


def test_the_mixed_prefill_cap_splits_like_the_budget():
    hybrid, fixed = MicroBatchPlan(pp_size=2), MicroBatchPlan(pp_size=2, schedule="fixed", num_micro_batches=3)
    # the prompt phase's 2P micro-batches halve it, as they halve B: P x the cap in flight beside the decodes
    assert (hybrid.prompt_budget(1024, num_pending_prompt=100), hybrid.prompt_budget(5, 1)) == (512, 3)
    assert hybrid.prompt_budget(1024, num_pending_prompt=0) == 1024  # token phase
    assert fixed.prompt_budget(1024, 100) == MicroBatchPlan().prompt_budget(1024, 100) == 1024


def decoding_then_four_long_prompts(max_mixed_prefill_tokens):
    scheduler = scheduler_with(0, num_blocks=512, max_num_batched_tokens=64,
                               max_mixed_prefill_tokens=max_mixed_prefill_tokens)
    for rid in "01":
        scheduler.add(Sequence(rid, [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True), ()))
    while any(not scheduler.requests[rid].output_token_ids for rid in "01"):  # a round at a time
        for output in [scheduler.schedule() for _ in range(scheduler.num_micro_batches())]:
            scheduler.update(output, tokens_for(output))
    for i in range(4):
        scheduler.add(Sequence(f"long{i}", [50 + i] * 200, SamplingParams(max_tokens=2, ignore_eos=True), ()))
    return scheduler, [scheduler.schedule() for _ in range(scheduler.num_micro_batches())]


def test_micro_batches_carry_the_capped_prompt_while_decodes_are_in_flight():
    _, outputs = decoding_then_four_long_prompts(16)
    assert len(outputs) == 4  # the prompt phase: 2P slots
    # each takes its share of the decodes first, then ceil(16 / 2) prompt tokens; the last two hold no decode
    # but wait in the same round as the two that do
    assert [[(s.request_id, s.num_tokens) for s in output.scheduled] for output in outputs] == [
        [("0", 1), ("long0", 8)], [("1", 1), ("long1", 8)], [("long2", 8)], [("long3", 8)]]
    _, uncapped = decoding_then_four_long_prompts(64)  # the cap at the budget: what the hybrid rule gives
    assert [[s.num_tokens for s in output.scheduled] for output in uncapped] == [[1, 32], [1, 32], [32], [32]]
