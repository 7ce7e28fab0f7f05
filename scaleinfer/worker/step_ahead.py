"""The next decode step launched before the host has this step's tokens (one step ahead).

Between two graph-replayed decode steps the device waits for the host: the sampled tokens come back, the
scheduler appends them and checks stops, the outputs go out, the next step is scheduled. At batch 1 that is
over a tenth of a step. When the next step is most likely the same sequences one token further (the
scheduler has nothing waiting, no row ends by length now, no row's sampling needs the host's tokens), the
runner replays the next step's graph and samples it right after this step's sampling, from the tokens still
on the device (the graph's rows advanced by `DecodeGraphs.advance`), and only then waits for this step's
tokens: the device computes the next step while the host does its work. When the scheduler's next output is
that step, the runner takes its tokens; otherwise they are dropped (what the dropped step wrote is the KV of
a token its sequence did sample, at a position it had not computed yet: rewritten the same, or in blocks
freed before any later step reads them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from scaleinfer.layers.sampler import SamplerOutput, SamplingBatch
from scaleinfer.outputs import SampledToken, ScheduledSequence
from scaleinfer.worker.next_step import NextDecode


class HostTokens:
    """A step's sampled fields copied to pinned host memory without synchronizing the stream: `wait` waits
    for that copy only, not for work queued after it (the step launched ahead)."""

    def __init__(self, result: SamplerOutput) -> None:
        self.fields: dict[str, torch.Tensor] = {}
        self.event = None
        on_gpu = result.token_ids.is_cuda
        for f in fields(result):
            value = getattr(result, f.name)
            if value is None:
                continue
            if on_gpu:
                host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                host.copy_(value, non_blocking=True)
                value = host
            self.fields[f.name] = value
        if on_gpu:
            self.event = torch.cuda.Event()
            self.event.record()

    def wait(self) -> list[SampledToken]:
        """The step's tokens: one per row, with logprobs when the step computed them."""
        if self.event is not None:
            self.event.synchronize()
        values = {name: tensor.tolist() for name, tensor in self.fields.items()}
        token_ids = values["token_ids"]
        if "logprobs" not in values:
            return [SampledToken(token_id=t) for t in token_ids]
        empty = [[] for _ in token_ids]
        return [SampledToken(*row) for row in zip(token_ids, values["logprobs"], values["ranks"],
                                                  values.get("top_ids", empty), values.get("top_logprobs", empty))]


@dataclass(slots=True)
class LaunchedStep:
    """A step queued on the device (ModelRunner.launch), its tokens not yet on the host. host None: it samples
    nothing (no rows scheduled, mid-prompt chunks only, or a pipeline stage before the last)."""

    sampled: list[ScheduledSequence] = field(default_factory=list)  # the sampled rows, in row order
    host: HostTokens | None = None  # their tokens on the way to the host
    failed: dict[str, str] = field(default_factory=dict)  # rows that sample nothing: sequence id -> why
    prompt_logprobs: dict = field(default_factory=dict)


@dataclass(slots=True)
class StepAhead:
    """A decode step launched ahead: the rows it computed and its samples, on their way to the host."""

    prepared: NextDecode  # what it computed; its token_ids are set once the host has the step before's
    batch: SamplingBatch  # the sampling rows it used (the step before's: the same requests in the same rows)
    result: SamplerOutput  # on the device
    host: HostTokens


def may_step_ahead(sampled: list[ScheduledSequence], batch: SamplingBatch) -> bool:
    """Whether the step after this one (the same rows, one token further) can be sampled before the host has
    this step's tokens: every row samples the same way from its logits alone (no per-request generator, whose
    draws a dropped step would spend; no penalty, ban or grammar, which read the tokens sampled so far), and
    no row ends by length with this step's token."""
    if batch.penalties is not None or batch.banned is not None or batch.allowed is not None or batch.failed:
        return False
    if any(g is not None for g in batch.generators):
        return False
    return all(s.sampling_params.max_tokens is None or s.num_output_tokens + 1 < s.sampling_params.max_tokens
               for s in sampled)
