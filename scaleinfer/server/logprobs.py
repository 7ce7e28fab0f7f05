"""Engine logprobs (one dict token_id -> Logprob per generated token) in OpenAI's two shapes."""

from __future__ import annotations

from typing import Any

from scaleinfer.outputs import CompletionOutput, Logprob, RequestOutput
from scaleinfer.server.protocol import (
    ChatLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TokenLogprob,
    TopLogprob,
)


def completion_logprobs(tokenizer: Any, output: CompletionOutput, text_offset: int) -> CompletionLogprobs | None:
    """Logprobs of output.token_ids; text_offset is where the first of them starts in the text."""
    if output.logprobs is None:
        return None
    result = CompletionLogprobs()
    for token_id, entry in zip(output.token_ids, output.logprobs):
        token = token_text(tokenizer, token_id, entry[token_id])
        result.tokens.append(token)
        result.token_logprobs.append(entry[token_id].logprob)
        result.top_logprobs.append({token_text(tokenizer, t, lp): lp.logprob for t, lp in entry.items()})
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result


def echo_logprobs(tokenizer: Any, output: RequestOutput, num_top: int) -> CompletionLogprobs:
    """The prompt's tokens as OpenAI's echo with logprobs shows them before the completion's, from the prompt
    logprobs: the first token has none (None), the others their logprob and the num_top best alternatives."""
    result, offset = CompletionLogprobs(), 0
    for token_id, entry in zip(output.prompt_token_ids, output.prompt_logprobs or []):
        if entry is None:
            token, logprob, top = tokenizer.decode([token_id]), None, None
        else:
            token, logprob = token_text(tokenizer, token_id, entry[token_id]), entry[token_id].logprob
            top = {token_text(tokenizer, t, lp): lp.logprob for t, lp in entry.items()
                   if t == token_id or lp.rank <= num_top}
        result.tokens.append(token)
        result.token_logprobs.append(logprob)
        result.top_logprobs.append(top)
        result.text_offset.append(offset)
        offset += len(token)
    return result


def joined(first: CompletionLogprobs, then: CompletionLogprobs | None) -> CompletionLogprobs:
    if then is None:
        return first
    return CompletionLogprobs(tokens=first.tokens + then.tokens,
                              token_logprobs=first.token_logprobs + then.token_logprobs,
                              top_logprobs=first.top_logprobs + then.top_logprobs,
                              text_offset=first.text_offset + then.text_offset)


def prompt_logprobs_out(output: RequestOutput) -> PromptLogprobs | None:
    """RequestOutput.prompt_logprobs as vLLM's server sends them (token ids as JSON keys)."""
    if output.prompt_logprobs is None:
        return None
    return [None if entry is None else {str(t): PromptLogprob(logprob=lp.logprob, rank=lp.rank,
                                                              decoded_token=lp.decoded_token)
                                        for t, lp in entry.items()}
            for entry in output.prompt_logprobs]


def chat_logprobs(tokenizer: Any, output: CompletionOutput, num_top: int) -> ChatLogprobs | None:
    if output.logprobs is None:
        return None
    content = [_token_logprob(tokenizer, token_id, entry, num_top)
               for token_id, entry in zip(output.token_ids, output.logprobs)]
    return ChatLogprobs(content=content)


def _token_logprob(tokenizer: Any, token_id: int, entry: dict[int, Logprob], num_top: int) -> TokenLogprob:
    ranked = sorted(entry.items(), key=lambda item: item[1].rank)[:num_top]
    top = [_top(token_text(tokenizer, t, lp), lp.logprob) for t, lp in ranked]
    token = token_text(tokenizer, token_id, entry[token_id])
    return TokenLogprob(token=token, logprob=entry[token_id].logprob, bytes=list(token.encode()), top_logprobs=top)


def _top(token: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))


def token_text(tokenizer: Any, token_id: int, logprob: Logprob) -> str:
    if logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id])
