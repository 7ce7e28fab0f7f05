"""Prompt tokenization for the server: on one worker thread that owns its own copy of the tokenizer.

Not on the event loop, where a long prompt would hold back every stream's chunks, and not on the engine
thread, where it would hold back every running sequence's next step. HF fast tokenizers release the GIL
while they encode, but are not safe to share across threads: hence a copy that only the worker touches.
The engine gets token ids; the text stays here, for echo.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from scaleinfer.tokenizer import apply_chat_template

T = TypeVar("T")


@dataclass(slots=True)
class Prompt:
    engine_prompt: str | list[int]  # token ids; text only where there is no tokenizer (the engine decides)
    text: str | None  # as the client sent it, when it sent text

    @property
    def num_tokens(self) -> int:
        """0 when not tokenized here; the engine checks such a prompt against the context itself."""
        return len(self.engine_prompt) if isinstance(self.engine_prompt, list) else 0


class PromptTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = copy.deepcopy(tokenizer)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="scaleinfer-tokenizer")

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    async def prompts(self, prompts: list[str | list[int]], add_special_tokens: bool = True) -> list[Prompt]:
        """Each text prompt tokenized (all of them in one trip to the worker), with the tokenizer's special tokens
        (a BOS) unless add_special_tokens is false; token-id prompts as they are."""
        texts = [prompt for prompt in prompts if isinstance(prompt, str)]
        if not texts or self._tokenizer is None:
            return [Prompt(prompt, prompt if isinstance(prompt, str) else None) for prompt in prompts]
        encoded = iter(await self._run(_encode_all, texts, add_special_tokens))
        return [Prompt(next(encoded), prompt) if isinstance(prompt, str) else Prompt(prompt, None)
                for prompt in prompts]

    async def chat(self, conversation: list[dict[str, Any]], add_generation_prompt: bool = True,
                   tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Prompt token ids of a conversation under the model's chat template (raises what the template raises)."""
        return await self._run(apply_chat_template, conversation, add_generation_prompt, tools)

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return await self._run(_encode, text, add_special_tokens)

    async def decode(self, token_ids: list[int]) -> str:
        return await self._run(_decode, token_ids)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, self._tokenizer, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _encode_all(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    return [list(tokenizer.encode(text, add_special_tokens=add_special_tokens)) for text in texts]


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _decode(tokenizer: Any, token_ids: list[int]) -> str:
    return tokenizer.decode(token_ids)
