"""Prompt logprobs (SamplingParams.prompt_logprobs): the logprob of each prompt token under the logits of the
position before it, from the hidden states a prefill chunk computes anyway; its top alternatives too.

A chunk at positions [start_pos, context_len) of a prompt of P tokens gives the tokens at start_pos + 1 ..
min(context_len, P - 1) (the last prompt position's logits are the sampler's). The rows are taken in the
step's token order (decodes first, then chunks: step_inputs.order_for_step) and pass through the LM head
in slices, so a long prompt never holds [P, vocab] logits at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scaleinfer.outputs import PromptLogprobsChunk, SchedulerOutput
from scaleinfer.worker.step_inputs import order_for_step

ROWS_PER_SLICE = 256  # [256, vocab] float32 logits: 128 MB at a 128k vocabulary


@dataclass(slots=True)
class _ChunkRows:
    request_id: str
    first_pos: int  # the position of the first prompt token these rows give
    num_rows: int
    num_top: int


def prompt_logprob_rows(output: SchedulerOutput) -> tuple[list[int], list[int], list[_ChunkRows]]:
    """(rows of the step's hidden states, the prompt token each row's logits score, the chunks they belong to)."""
    rows: list[int] = []
    targets: list[int] = []
    chunks: list[_ChunkRows] = []
    offset = 0
    for seq in order_for_step(output):
        num_top = seq.sampling_params.prompt_logprobs
        end = min(seq.context_len, len(seq.prompt_token_ids) - 1)
        if num_top is not None and seq.start_pos < end:
            rows.extend(range(offset, offset + end - seq.start_pos))
            targets.extend(seq.prompt_token_ids[seq.start_pos + 1:end + 1])
            chunks.append(_ChunkRows(seq.request_id, seq.start_pos + 1, end - seq.start_pos, num_top))
        offset += seq.num_tokens
    return rows, targets, chunks


def compute_prompt_logprobs(model: nn.Module, hidden: torch.Tensor,
                            output: SchedulerOutput) -> dict[str, PromptLogprobsChunk]:
    """hidden: [num_tokens, hidden], the step's, in step order. Sequence id -> its chunk's prompt logprobs;
    empty when no scheduled chunk asks for them."""
    rows, targets, chunks = prompt_logprob_rows(output)
    if not rows:
        return {}
    num_top = max(c.num_top for c in chunks)
    index = torch.tensor(rows, device=hidden.device)
    target = torch.tensor(targets, device=hidden.device)
    parts = [_score(model, hidden[index[i:i + ROWS_PER_SLICE]], target[i:i + ROWS_PER_SLICE], num_top)
             for i in range(0, len(rows), ROWS_PER_SLICE)]
    logprobs, ranks, top_lps, top_ids = (torch.cat(p).tolist() for p in zip(*parts))
    result, start = {}, 0
    for c in chunks:
        end = start + c.num_rows
        result[c.request_id] = PromptLogprobsChunk(
            c.first_pos, logprobs[start:end], ranks[start:end],
            [ids[:c.num_top] for ids in top_ids[start:end]], [lps[:c.num_top] for lps in top_lps[start:end]])
        start = end
    return result


def _score(model: nn.Module, hidden: torch.Tensor, target: torch.Tensor,
           num_top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden: [rows, hidden]; target: [rows]. (logprob [rows], rank [rows] (1 = most likely),
    top logprobs [rows, num_top], top ids [rows, num_top])."""
    logprobs = torch.log_softmax(model.compute_logits(hidden).float(), dim=-1)  # [rows, vocab]
    chosen = logprobs.gather(1, target[:, None])  # [rows, 1]
    ranks = (logprobs > chosen).sum(-1) + 1
    top = logprobs.topk(num_top, dim=-1) if num_top else None
    empty = logprobs.new_zeros(len(target), 0)
    return (chosen[:, 0], ranks, top.values if top else empty,
            top.indices if top else empty.long())
