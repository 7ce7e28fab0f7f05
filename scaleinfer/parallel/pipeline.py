"""Pipeline parallelism's two decisions, in pure Python (the scheduler imports this; no torch here):

- the stage split: stage p of P owns a contiguous range of the decoder layers, the first stages one more each
  when P does not divide them; the embedding lives on the first stage, the final norm, LM head and sampling
  on the last;
- the hybrid prompt/token schedule (DeepSpeed Inference, SC22, section IV-B): how many micro-batches the
  engine keeps in flight and how large each is.

The rule, with P stages, B = max_num_batched_tokens (the step's token budget) and the batch as it stands:
- token phase (no prompt tokens left to compute): P micro-batches, the fewest that keep every stage busy;
  each takes up to ceil(num_running / P) running sequences, so the decodes split evenly over them and no
  micro-batch rereads the weights for a handful of rows while another carries the rest;
- prompt phase ("hybrid"): 2P micro-batches of at most ceil(B / 2) tokens each, evened out over the pending
  prompt tokens: ceil(pending / 2P) each when fewer than P * B are pending (plus room for the micro-batch's
  share of the decodes, which go first). The same tokens are in flight as P
  micro-batches of B, but the first stage hands its first micro-batch on after half the tokens, which halves
  the fill and drain bubble; prompts are compute-bound, so the smaller pieces cost little efficiency;
- "fixed" (the baseline the benchmark compares against): num_micro_batches (default P) micro-batches of up to
  B tokens in both phases, each with up to ceil(num_running / num_micro_batches) running sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaleinfer.config import PIPELINE_SCHEDULES, ParallelConfig
from scaleinfer.parallel.state import get_parallel_state

PROMPT_SPLIT = 2  # hybrid: prompt-phase micro-batches per stage


@dataclass(slots=True, frozen=True)
class PipelineStage:
    """Which part of the model one rank's stage holds."""

    pp_rank: int
    pp_size: int
    layers: range  # the decoder layers this stage builds, loads and runs

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """The contiguous layer range of stage pp_rank; the first num_layers % pp_size stages take one more."""
    if not 1 <= pp_size <= num_layers:
        raise ValueError(f"pipeline_parallel_size={pp_size} must be in [1, num_hidden_layers={num_layers}]")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (pp_rank < extra))


def pipeline_stage(num_layers: int, pp_rank: int = 0, pp_size: int = 1) -> PipelineStage:
    return PipelineStage(pp_rank=pp_rank, pp_size=pp_size, layers=stage_layers(num_layers, pp_rank, pp_size))


def current_stage(num_layers: int) -> PipelineStage:
    """This rank's stage of a model with num_layers decoder layers (the whole model in one process)."""
    state = get_parallel_state()
    return pipeline_stage(num_layers, state.pp_rank, state.pp_size)


@dataclass(slots=True, frozen=True)
class MicroBatchBudget:
    num_tokens: int  # this micro-batch's token budget
    max_running: int  # running sequences it may take


@dataclass(slots=True, frozen=True)
class MicroBatchPlan:
    """The micro-batch counts and sizes of one pipeline; with pp_size 1, one micro-batch of the whole step."""

    pp_size: int = 1
    schedule: str = "hybrid"  # hybrid | fixed
    num_micro_batches: int | None = None  # fixed: the count (None: pp_size)

    def __post_init__(self) -> None:
        if self.schedule not in PIPELINE_SCHEDULES:
            raise ValueError(f"pipeline_schedule must be one of {PIPELINE_SCHEDULES}, got {self.schedule!r}")

    @property
    def _fixed_count(self) -> int:
        return self.num_micro_batches or self.pp_size

    def prompt_tokens_to_count(self, step_tokens: int) -> int:
        """How many pending prompt tokens the budget can tell apart: past P * B it is the same (0 without a
        pipeline, so the scheduler counts none)."""
        return 0 if self.pp_size == 1 else self.pp_size * step_tokens

    def num_slots(self, prompt_phase: bool) -> int:
        """How many micro-batches may be in flight at once."""
        if self.pp_size == 1:
            return 1
        if self.schedule == "fixed":
            return self._fixed_count
        return PROMPT_SPLIT * self.pp_size if prompt_phase else self.pp_size

    def budget(self, step_tokens: int, num_running: int, num_pending_prompt: int) -> MicroBatchBudget:
        """One micro-batch's share; num_pending_prompt: prompt tokens left to schedule (0: token phase)."""
        if self.pp_size == 1:
            return MicroBatchBudget(num_tokens=step_tokens, max_running=max(num_running, 1))
        count = self.num_slots(num_pending_prompt > 0)
        max_running = max(1, -(-num_running // (count if self.schedule == "fixed" else self.pp_size)))
        if self.schedule == "fixed" or num_pending_prompt == 0:
            return MicroBatchBudget(num_tokens=step_tokens, max_running=max_running)
        piece = min(-(-step_tokens // PROMPT_SPLIT), -(-num_pending_prompt // count))
        # Room for the micro-batch's share of the decodes (scheduled first) beside its piece of prompt.
        return MicroBatchBudget(num_tokens=min(step_tokens, piece + max_running), max_running=max_running)

    def prompt_budget(self, max_prompt_tokens: int, num_pending_prompt: int) -> int:
        """One micro-batch's share of max_prompt_tokens, the prompt tokens a step may carry beside decodes, split
        as budget() splits B: whole with one stage, in the token phase and under the fixed schedule, halved over
        the hybrid prompt phase's 2P micro-batches. A decode waits for every micro-batch in flight, so the prompt
        tokens it waits for add up over them: 2P halves carry what P whole ones do, P x max_prompt_tokens, about
        one capped step's time on one GPU (each stage holds 1/P of the layers)."""
        if self.pp_size == 1 or self.schedule == "fixed" or num_pending_prompt == 0:
            return max_prompt_tokens
        return -(-max_prompt_tokens // PROMPT_SPLIT)


def micro_batch_plan(config: ParallelConfig) -> MicroBatchPlan:
    return MicroBatchPlan(pp_size=config.pipeline_parallel_size, schedule=config.pipeline_schedule,
                          num_micro_batches=config.pipeline_micro_batches)
