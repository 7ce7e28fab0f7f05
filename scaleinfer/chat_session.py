"""`scaleinfer chat`: a conversation with the model through its chat template, on a terminal.

Enter sends a line; an empty line sends nothing. Ctrl-C while the model replies stops the reply (the part already
shown stays in the history as the assistant's turn); Ctrl-C at the prompt clears it; Ctrl-D or /exit ends the
session. When the history no longer fits the context (its prompt plus --max-tokens), the oldest turns are dropped
with a note, the system message kept; a message that cannot fit even alone is not sent, and the session goes on.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from scaleinfer.errors import InvalidRequestError
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.tokenizer import apply_chat_template

EXIT_COMMANDS = ("/exit", "/quit")
Message = dict[str, str]


@dataclass(slots=True)
class ChatHistory:
    system: list[Message] = field(default_factory=list)  # kept whatever is trimmed
    turns: list[Message] = field(default_factory=list)  # user and assistant messages, oldest first

    @property
    def messages(self) -> list[Message]:
        return self.system + self.turns

    def drop_oldest_turn(self) -> int:
        """Drop the oldest user message and the replies after it; the number of messages dropped."""
        end = 1
        while end < len(self.turns) and self.turns[end]["role"] != "user":
            end += 1
        del self.turns[:end]
        return end


def fit_history(history: ChatHistory, render: Callable[[list[Message]], list[int]], budget: int) -> tuple[list[int],
                                                                                                          int]:
    """The prompt token ids of the history, oldest turns dropped until it holds at most `budget` tokens, and how many
    messages were dropped. Raises InvalidRequestError when the newest user message alone does not fit."""
    num_dropped = 0
    prompt = render(history.messages)
    while len(prompt) > budget and len(history.turns) > 1:
        num_dropped += history.drop_oldest_turn()
        prompt = render(history.messages)
    if len(prompt) > budget:
        raise InvalidRequestError(f"this message makes a prompt of {len(prompt)} tokens, more than the {budget} the "
                                  "context leaves beside --max-tokens; it was not sent")
    return prompt, num_dropped


def prompt_budget(engine: Any, max_tokens: int) -> int:
    """The most prompt tokens a turn may have: the context and the KV cache less the reply's max_tokens."""
    kv_tokens = engine.block_manager.num_blocks * engine.config.cache.block_size + 1  # the last token needs no slot
    return min(engine.max_model_len, kv_tokens) - max_tokens


def require_chat_template(engine: Any) -> None:
    if engine.tokenizer is None or not engine.tokenizer.chat_template:
        raise InvalidRequestError(f"model {engine.config.model.model!r} has no chat template, which `scaleinfer chat` "
                                  "needs: pass --chat-template (a file or the template), or use `scaleinfer generate` "
                                  "for plain completion")


class StopOnInterrupt:
    """While a reply streams, SIGINT sets `stopped` (checked between engine steps, so no step is cut in half)
    instead of raising KeyboardInterrupt."""

    def __init__(self) -> None:
        self.stopped = False
        self._previous: Any = None

    def __enter__(self) -> StopOnInterrupt:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.stopped = True

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


def read_messages(stdin: TextIO, err: TextIO) -> Iterator[str]:
    """Non-empty lines from stdin until EOF or /exit; Ctrl-C at the prompt starts a new one."""
    while True:
        print("> ", end="", file=err, flush=True)
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit ends the chat)", file=err, flush=True)
            continue
        if not line:  # EOF: Ctrl-D
            print(file=err)
            return
        if line.strip() in EXIT_COMMANDS:
            return
        if line.strip():
            yield line.strip()


def run_chat(engine: Any, params: SamplingParams, system: str | None, stdin: TextIO = sys.stdin,
             out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
    from scaleinfer.cli import stream

    require_chat_template(engine)
    history = ChatHistory(system=[{"role": "system", "content": system}] if system else [])
    budget = prompt_budget(engine, params.max_tokens)
    render = lambda messages: apply_chat_template(engine.tokenizer, messages)
    print("chat with the model; Ctrl-C stops a reply, Ctrl-D or /exit ends the chat", file=err)
    for line in read_messages(stdin, err):
        history.turns.append({"role": "user", "content": line})
        try:
            prompt, num_dropped = fit_history(history, render, budget)
        except InvalidRequestError as exc:
            history.turns.pop()
            print(f"[{exc}]", file=err, flush=True)
            continue
        if num_dropped:
            print(f"[the {num_dropped} oldest messages were dropped: the history no longer fit the context of "
                  f"{engine.max_model_len} tokens with --max-tokens {params.max_tokens}]", file=err, flush=True)
        with StopOnInterrupt() as interrupt:
            summary = stream(engine, prompt, params, out, should_stop=lambda: interrupt.stopped)
        print(f"\n{'[stopped] ' if interrupt.stopped else ''}{summary.line()}", file=err, flush=True)
        history.turns.append({"role": "assistant", "content": summary.text})
