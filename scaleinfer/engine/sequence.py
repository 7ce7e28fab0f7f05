"""A request's tokens, status and block table: the unit the scheduler moves between queues."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scaleinfer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from scaleinfer.engine.block_manager import BlockHash
    from scaleinfer.engine.structured_output import SequenceGrammar


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()  # eos, a stop token id or a stop string
    FINISHED_LENGTH = enum.auto()  # max_tokens or max_model_len
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI finish_reason: "stop", "length", "abort", or None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


@dataclass(slots=True)
class Sequence:
    """One generation stream.

    Invariants: all_token_ids == prompt_token_ids + output_token_ids (grow it only via append_token);
    num_computed_tokens <= num_tokens; a WAITING sequence holds no blocks and has num_computed_tokens == 0 (one
    preempted by swap waits with its KV in host blocks the block manager keeps for it: BlockManager.swapped);
    a RUNNING one's block_ids cover at least num_computed_tokens slots.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.time)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (or is written by the step in flight)
    block_ids: list[int] = field(default_factory=list)  # the block table
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # time.time() when it first ran: queue time ends there
    stop_reason: int | str | None = None  # the stop token id or stop string that finished it
    # Prefix-cache keys of this sequence's full blocks, filled lazily by the block manager. Tokens are
    # only ever appended, so a full block's key never changes and the cache survives preemption.
    block_hashes: list[BlockHash] = field(default_factory=list)
    grammar: SequenceGrammar | None = None  # structured outputs: the matcher its output tokens advance
    all_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.all_token_ids = self.prompt_token_ids + self.output_token_ids

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to feed the model: the rest of a prefill, or 1 for a decode."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def last_token_id(self) -> int:
        return self.all_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason
