"""A scripted stand-in for LLMEngine (same methods, no model): one token per step per request; and a byte-level
stand-in tokenizer that records which threads call it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from scaleinfer.config import EngineConfig
from scaleinfer.errors import InvalidRequestError
from scaleinfer.outputs import CompletionOutput, RequestOutput
from scaleinfer.sampling_params import SamplingParams


@dataclass
class FakeStats:
    num_running: int
    num_waiting: int = 0
    num_used_blocks: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0


@dataclass
class FakeEngine:
    """One token per step per request; prompts "bad" and "boom" fail in add_request; step can be made to fail."""

    model_name: str = "fake"
    max_model_len: int = 2048
    tokenizer: object = None
    config: EngineConfig = field(default_factory=EngineConfig)
    fail_step: bool = False
    requests: dict[str, tuple[int, list[int]]] = field(default_factory=dict)
    prompts: dict[str, str | list[int]] = field(default_factory=dict)  # as add_request got them
    aborted: list[str] = field(default_factory=list)
    caller_threads: set[str] = field(default_factory=set)
    shut_down: bool = False  # LLMEngine.shutdown stops worker processes; the loop calls it when it ends

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        self._touch()
        text = prompt if isinstance(prompt, str) else ByteTokenizer().decode(prompt)
        if text == "bad":
            raise InvalidRequestError("prompt is bad")
        if text == "boom":
            raise RuntimeError("tokenizer exploded")
        self.prompts[request_id] = prompt
        self.requests[request_id] = (params.max_tokens, [])

    def abort_request(self, request_ids: list[str]) -> None:
        self._touch()
        for request_id in request_ids:
            self.requests.pop(request_id, None)
            self.aborted.append(request_id)

    def step(self) -> list[RequestOutput]:
        self._touch()
        if self.fail_step:
            raise RuntimeError("device lost")
        time.sleep(0.002)
        return [self._advance(request_id) for request_id in list(self.requests)]

    def _advance(self, request_id: str) -> RequestOutput:
        max_tokens, tokens = self.requests[request_id]
        tokens.append(len(tokens))
        finished = len(tokens) >= max_tokens
        if finished:
            del self.requests[request_id]
        completion = CompletionOutput(0, "x" * len(tokens), list(tokens), finish_reason="length" if finished else None)
        return RequestOutput(request_id, None, [1, 2], [completion], finished)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> FakeStats:
        return FakeStats(num_running=len(self.requests))

    def shutdown(self) -> None:
        self._touch()
        self.shut_down = True

    def _touch(self) -> None:
        self.caller_threads.add(threading.current_thread().name)


class ByteTokenizer:
    """Token ids are UTF-8 bytes. Copies are the same object, so that every caller's thread is recorded here."""

    chat_template = "role: content per message"
    name_or_path = "bytes"

    def __init__(self) -> None:
        self.caller_threads: set[str] = set()

    def __deepcopy__(self, memo: dict) -> ByteTokenizer:
        return self

    def encode(self, text: str) -> list[int]:
        self.caller_threads.add(threading.current_thread().name)
        return list(text.encode())

    def decode(self, token_ids: list[int], **kwargs: object) -> str:
        return bytes(token_ids).decode(errors="replace")

    def apply_chat_template(self, messages: list[dict], **kwargs: object) -> list[int]:
        return self.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages))
