"""A scripted stand-in for LLMEngine whose core is itself (same methods as EngineCore, no model): one token per
step per request, each the byte "x"; and a byte-level stand-in tokenizer that records which
threads call it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from scaleinfer.config import EngineConfig
from scaleinfer.engine.core_types import CoreReady, EngineCoreOutput, EngineCoreRequest, EngineStats
from scaleinfer.errors import InvalidRequestError


@dataclass
class FakeEngine:
    """One token per step per request; prompts "bad" and "boom" fail in add_request; step can be made to fail."""

    model_name: str = "fake"
    max_model_len: int = 65536
    tokenizer: object = None  # the front's (None: token id prompts only)
    config: EngineConfig = field(default_factory=EngineConfig)
    fail_step: bool = False
    requests: dict[str, tuple[int, list[int]]] = field(default_factory=dict)
    prompts: dict[str, list[int]] = field(default_factory=dict)  # as add_request got them
    aborted: list[str] = field(default_factory=list)
    caller_threads: set[str] = field(default_factory=set)
    shut_down: bool = False  # EngineCore.shutdown stops worker processes; the loop calls it when it ends

    @property
    def core(self) -> FakeEngine:
        return self

    def ready(self) -> CoreReady:
        return CoreReady(max_model_len=self.max_model_len, num_blocks=1 << 20, block_size=16, vocab_size=1 << 20,
                         eos_token_ids=[])

    def add_request(self, request: EngineCoreRequest) -> None:
        self._touch()
        text = bytes(request.prompt_token_ids).decode(errors="replace")
        if text == "bad":
            raise InvalidRequestError("prompt is bad")
        if text == "boom":
            raise RuntimeError("tokenizer exploded")
        self.prompts[request.request_id] = request.prompt_token_ids
        self.requests[request.request_id] = (request.sampling_params.max_tokens, [])

    def abort(self, request_ids: list[str], sequences: list[tuple[str, int]] = ()) -> None:
        self._touch()
        for request_id in [*request_ids, *(rid for rid, _ in sequences)]:
            self.requests.pop(request_id, None)
            self.aborted.append(request_id)

    def launch(self) -> str:
        """EngineCore's first half: this stand-in does the whole step in complete()."""
        self._touch()
        return "launched"

    def complete(self, launched: str) -> list[EngineCoreOutput]:
        assert launched == "launched", launched
        return self.step()

    def step(self) -> list[EngineCoreOutput]:
        self._touch()
        if self.fail_step:
            raise RuntimeError("device lost")
        time.sleep(0.002)
        return [self._advance(request_id) for request_id in list(self.requests)]

    def _advance(self, request_id: str) -> EngineCoreOutput:
        max_tokens, tokens = self.requests[request_id]
        tokens.append(ord("x"))
        return self.output(request_id, tokens[-1:], len(tokens) >= max_tokens, "length")

    def output(self, request_id: str, new_token_ids: list[int], finished: bool, reason: str) -> EngineCoreOutput:
        if finished:
            del self.requests[request_id]
        return EngineCoreOutput(request_id, 0, new_token_ids, finish_reason=reason if finished else None)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.requests))

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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:  # no special tokens to add
        self.caller_threads.add(threading.current_thread().name)
        return list(text.encode())

    def decode(self, token_ids: list[int], **kwargs: object) -> str:
        return bytes(token_ids).decode(errors="replace")

    def apply_chat_template(self, messages: list[dict], **kwargs: object) -> list[int]:
        return self.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages))
