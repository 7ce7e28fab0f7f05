"""What one HTTP request may ask of the engine, checked before the engine sees it; each refusal is a 400
naming the value and the bound.

- Prompts: at most MAX_PROMPTS per completions request, and none empty.
- Characters: a text prompt (a chat: its messages' contents together) of at most
  max_model_len * CHARS_PER_TOKEN characters, checked before tokenizing, so that no client can buy seconds
  of tokenizer time with a prompt that could never fit the context anyway.
- Tokens: each prompt's tokens + max_tokens within the context, and at most max_n * max_model_len per
  request, counted as n * the sum over its prompts of (prompt tokens + max_tokens): the KV positions its
  sequences may come to hold. The largest one-prompt request (n = max_n, the whole context) fits; many
  prompts share that budget.
- Admission: a request queues n * prompts sequences at once; more than max_waiting can never be queued,
  so that is a 400, not the 503 (retry later) of a queue that is merely full now.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scaleinfer.server.errors import bad_request

MAX_PROMPTS = 64
# Tokenizers average 3-5 characters per token on prose and code; 32 leaves room for long runs of
# whitespace or repeated symbols, which merge into long tokens.
CHARS_PER_TOKEN = 32


@dataclass(slots=True)
class RequestLimits:
    max_model_len: int
    max_waiting: int | None = None  # the engine's waiting queue, in sequences; None: unbounded
    max_n: int = 16  # choices per prompt
    max_prompts: int = MAX_PROMPTS

    @property
    def max_prompt_chars(self) -> int:
        return self.max_model_len * CHARS_PER_TOKEN

    @property
    def max_request_tokens(self) -> int:
        return self.max_n * self.max_model_len

    def check_prompts(self, prompts: Sequence[str | list[int]], param: str = "prompt") -> None:
        """Count, emptiness and size of a request's prompts (param: the field holding them, e.g. embeddings'
        "input"), before any is tokenized."""
        if len(prompts) > self.max_prompts:
            raise bad_request(f"a request may have at most {self.max_prompts} {param}s, got {len(prompts)}", param)
        for index, prompt in enumerate(prompts):
            where = param if len(prompts) == 1 else f"{param} {index}"
            if len(prompt) == 0:
                raise bad_request(f"{where} is empty", param)
            if isinstance(prompt, str):
                self.check_chars(len(prompt), where, param)

    def check_chars(self, num_chars: int, what: str, param: str) -> None:
        if num_chars > self.max_prompt_chars:
            raise bad_request(f"{what}: {num_chars} characters; at most {self.max_prompt_chars} are accepted "
                              f"({CHARS_PER_TOKEN} per token of the {self.max_model_len}-token context)", param)

    def check_n(self, n: int) -> None:
        if n > self.max_n:
            raise bad_request(f"n must be at most {self.max_n}, got {n}", "n")

    def check_admissible(self, n: int, num_prompts: int) -> None:
        """n within max_n, and n * prompts sequences within what the waiting queue can ever hold."""
        self.check_n(n)
        num_seqs = n * num_prompts
        if self.max_waiting is not None and num_seqs > self.max_waiting:
            raise bad_request(f"this request queues {num_seqs} sequences at once (n={n} x {num_prompts} "
                              f"prompt{'s' * (num_prompts != 1)}), more than the server ever queues "
                              f"(max_waiting={self.max_waiting}): it could never be admitted", "n")

    def check_tokens(self, num_prompt_tokens: Sequence[int], max_tokens: int, n: int) -> None:
        """Each prompt within the context (as the engine checks it: a request too long is refused at the first
        one), then the request within its token budget."""
        for num in num_prompt_tokens:
            if num + max_tokens > self.max_model_len:
                raise bad_request(f"prompt has {num} tokens and max_tokens is {max_tokens}; the model's context "
                                  f"is {self.max_model_len}")
        num_tokens = n * sum(num + max_tokens for num in num_prompt_tokens)
        if num_tokens > self.max_request_tokens:
            raise bad_request(
                f"this request needs {num_tokens} tokens (n={n} x the sum over its {len(num_prompt_tokens)} "
                f"prompts of prompt tokens + max_tokens={max_tokens}); at most {self.max_request_tokens} are "
                f"accepted (max_n={self.max_n} x the {self.max_model_len}-token context)", "prompt")
