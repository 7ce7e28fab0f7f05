"""Prompt logprobs between the runner and the user: the core gathers each sequence's chunks (a prompt may take
several steps under chunked prefill) and sends them whole with the sequence's first token; the front turns
them into vLLM's shape, one entry per prompt position: None for the first, else token id -> Logprob with
the prompt token itself included.

A request that asks for them takes no prefix-cache hits (block_manager), so every position is computed.
After a preemption the prompt is computed again; once its first token was out, the chunks are not kept.
"""

from __future__ import annotations

from typing import Any

import msgspec

from scaleinfer.outputs import Logprob, PromptLogprobsChunk


class PromptLogprobs(msgspec.Struct, array_like=True):
    """Positions 1 .. P - 1 of a P-token prompt, in order (core -> front)."""

    logprobs: list[float]
    ranks: list[int]
    top_token_ids: list[list[int]]
    top_logprobs: list[list[float]]


class PromptLogprobsCollector:
    """The core's: sequence id -> what its prompt chunks scored so far, until its first token goes out."""

    def __init__(self) -> None:
        self._chunks: dict[str, dict[int, PromptLogprobsChunk]] = {}  # by first_pos: a recompute overwrites

    def record(self, chunks: dict[str, PromptLogprobsChunk], waiting_for_first_token: Any) -> None:
        """waiting_for_first_token(sequence id) -> bool: whether its prompt logprobs are still to be sent."""
        for seq_id, chunk in chunks.items():
            if waiting_for_first_token(seq_id):
                self._chunks.setdefault(seq_id, {})[chunk.first_pos] = chunk

    def take(self, seq_id: str) -> PromptLogprobs:
        """The whole prompt's, in position order (empty for a 1-token prompt: nothing to score)."""
        chunks = self._chunks.pop(seq_id, {})
        result, next_pos = PromptLogprobs([], [], [], []), 1
        for pos in sorted(chunks):  # a recompute after preemption may have cut the prompt elsewhere
            chunk, skip = chunks[pos], next_pos - pos
            if skip < len(chunk.logprobs):
                result.logprobs += chunk.logprobs[skip:]
                result.ranks += chunk.ranks[skip:]
                result.top_token_ids += chunk.top_token_ids[skip:]
                result.top_logprobs += chunk.top_logprobs[skip:]
                next_pos = pos + len(chunk.logprobs)
        return result

    def drop(self, seq_id: str) -> None:
        self._chunks.pop(seq_id, None)


def prompt_logprob_dicts(prompt_token_ids: list[int], scored: PromptLogprobs,
                         tokenizer: Any) -> list[dict[int, Logprob] | None]:
    """vLLM's RequestOutput.prompt_logprobs: [None, {token id: Logprob}, ...], one per prompt position."""
    result: list[dict[int, Logprob] | None] = [None]
    for pos, token_id in enumerate(prompt_token_ids[1:]):
        entry = {token_id: Logprob(scored.logprobs[pos], scored.ranks[pos], _decode(tokenizer, token_id))}
        for rank, (top_id, logprob) in enumerate(zip(scored.top_token_ids[pos], scored.top_logprobs[pos]), 1):
            entry.setdefault(top_id, Logprob(logprob, rank, _decode(tokenizer, top_id)))
        result.append(entry)
    return result


def _decode(tokenizer: Any, token_id: int) -> str | None:
    return None if tokenizer is None else tokenizer.decode([token_id])
