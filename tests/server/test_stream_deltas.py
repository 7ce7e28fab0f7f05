"""Streamed answers are built from the engine's DELTA outputs, non-streamed ones from its FINAL_ONLY output: over
the official openai client the chunks concatenate to the non-streamed answer token for token (text, tokens,
logprobs, offsets, finish reasons, usage), with n > 1, sampling and stop strings, and stop-string completions
equal LLM.generate's token ids."""

from __future__ import annotations

import openai
import pytest
from server_utils import CHAT_MESSAGES, COMPLETION_PROMPTS, MODEL

pytestmark = pytest.mark.slow
LOGPROB_TOLERANCE = 1e-4  # the same tokens; a prefix-cache hit on the second run may round differently


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0, timeout=60)


def _streamed_completion(chunks) -> tuple[dict[int, dict], object]:
    """Per choice index: its text and logprob lists concatenated over the chunks, its finish reason; the usage."""
    choices: dict[int, dict] = {}
    usage = None
    for chunk in chunks:
        usage = chunk.usage or usage
        for c in chunk.choices:
            got = choices.setdefault(c.index, dict(text="", tokens=[], token_logprobs=[], top_logprobs=[],
                                                   text_offset=[], finish_reason=None))
            got["text"] += c.text
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                got[name] += getattr(c.logprobs, name)
            got["finish_reason"] = c.finish_reason or got["finish_reason"]
    return choices, usage


def test_completion_chunks_concatenate_to_the_whole_answer(client):
    kwargs = dict(model=MODEL, prompt=COMPLETION_PROMPTS[1], n=2, max_tokens=24, temperature=0.8, seed=11,
                  logprobs=2, stop=[" the", "."])
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    streamed, usage = _streamed_completion(chunks)
    assert sorted(streamed) == [0, 1] and usage == whole.usage and len(chunks) > 2 * 3
    for choice in whole.choices:
        got = streamed[choice.index]
        assert (got["text"], got["finish_reason"]) == (choice.text, choice.finish_reason)
        assert got["tokens"] == choice.logprobs.tokens and got["text_offset"] == choice.logprobs.text_offset
        assert got["token_logprobs"] == pytest.approx(choice.logprobs.token_logprobs, abs=LOGPROB_TOLERANCE)
        assert [list(top) for top in got["top_logprobs"]] == [list(top) for top in choice.logprobs.top_logprobs]
    assert streamed[0]["text"] != streamed[1]["text"], "two different samples"


def test_streamed_stop_strings_equal_llm_generate_token_for_token(server, client):
    """References: LLM.generate in-process; the server's core runs in its own process."""
    tokenizer = server.engine.tokenizer
    assert any(r.outputs[0].stop_reason in server.references.stop_params["stop"] for r in server.references.stopped)
    for prompt, reference in zip(COMPLETION_PROMPTS, server.references.stopped):
        chunks = client.completions.create(model=MODEL, prompt=prompt, stream=True, logprobs=0,
                                           **server.references.stop_params)
        streamed, _ = _streamed_completion(chunks)
        got = streamed[0]
        expected = reference.outputs[0]
        assert got["text"] == expected.text and got["finish_reason"] == expected.finish_reason
        assert got["tokens"] == [tokenizer.decode([t]) for t in expected.token_ids]


def test_chat_chunks_concatenate_to_the_whole_answer(client):
    kwargs = dict(model=MODEL, messages=CHAT_MESSAGES, max_tokens=16, temperature=0.7, seed=5, logprobs=True,
                  top_logprobs=2)
    whole = client.chat.completions.create(**kwargs).choices[0]
    content, logprobs, finish_reason = "", [], None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            content += c.delta.content or ""
            logprobs += c.logprobs.content if c.logprobs is not None else []
            finish_reason = c.finish_reason or finish_reason
    assert (content, finish_reason) == (whole.message.content, whole.finish_reason)
    assert [t.token for t in logprobs] == [t.token for t in whole.logprobs.content]
    assert [[top.token for top in t.top_logprobs] for t in logprobs] == [
        [top.token for top in t.top_logprobs] for t in whole.logprobs.content]
    assert [t.logprob for t in logprobs] == pytest.approx([t.logprob for t in whole.logprobs.content],
                                                          abs=LOGPROB_TOLERANCE)
