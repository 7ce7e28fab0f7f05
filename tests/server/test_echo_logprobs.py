"""echo with logprobs on /v1/completions through the openai client, as OpenAI answers it: the prompt's tokens and
their logprobs first (the first has none), then the completion's; the prompt's part equals the engine's prompt
logprobs (vLLM's prompt_logprobs field of the same request without echo), the completion's part the answer
without echo; streamed, the chunks concatenate to it, each choice's first chunk carrying the prompt's part."""

from __future__ import annotations

import openai
import pytest
from server_utils import COMPLETION_PROMPTS, MODEL

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4  # prompt logprobs are scored in a prefill either way; the completion may hit the prefix cache
KWARGS = dict(model=MODEL, prompt=COMPLETION_PROMPTS[0], max_tokens=6, temperature=0, logprobs=2)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0, timeout=60)


def test_echo_logprobs_put_the_prompt_tokens_first(server, client):
    tokenizer = server.engine.tokenizer
    prompt_ids = tokenizer.encode(KWARGS["prompt"])
    plain = client.completions.create(**KWARGS, extra_body={"prompt_logprobs": 2}).choices[0]
    echoed = client.completions.create(echo=True, **KWARGS).choices[0]
    num_prompt = len(prompt_ids)
    logprobs = echoed.logprobs
    assert echoed.text == KWARGS["prompt"] + plain.text
    assert logprobs.tokens == [tokenizer.decode([t]) for t in prompt_ids] + plain.logprobs.tokens
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    scored = plain.model_extra["prompt_logprobs"]  # vLLM's shape: token id -> {logprob, rank, decoded_token}
    expected = [entry[str(t)]["logprob"] for t, entry in zip(prompt_ids[1:], scored[1:])]
    assert logprobs.token_logprobs[1:num_prompt] == pytest.approx(expected, abs=TOLERANCE)
    for top, entry in zip(logprobs.top_logprobs[1:num_prompt], scored[1:]):
        assert set(top) == {e["decoded_token"] for e in entry.values()}
    assert logprobs.token_logprobs[num_prompt:] == pytest.approx(plain.logprobs.token_logprobs, abs=TOLERANCE)
    assert all(echoed.text[offset:].startswith(token) for offset, token in zip(logprobs.text_offset, logprobs.tokens))
    assert echoed.model_extra.get("prompt_logprobs") is None, "vLLM's field only when asked for"


def test_streamed_echo_logprobs_concatenate_to_the_whole_answer(client):
    whole = client.completions.create(echo=True, n=2, seed=3, **{**KWARGS, "temperature": 1.0}).choices
    got = {i: dict(text="", tokens=[], token_logprobs=[], text_offset=[], chunks=0) for i in (0, 1)}
    for chunk in client.completions.create(echo=True, n=2, seed=3, stream=True, **{**KWARGS, "temperature": 1.0}):
        (c,) = chunk.choices
        g = got[c.index]
        if g["chunks"] == 0:
            assert c.text.startswith(KWARGS["prompt"]) and c.logprobs.token_logprobs[0] is None
        g["chunks"] += 1
        g["text"] += c.text
        for name in ("tokens", "token_logprobs", "text_offset"):
            g[name] += getattr(c.logprobs, name)
    for choice in whole:
        g = got[choice.index]
        assert g["chunks"] > 1 and (g["text"], g["tokens"]) == (choice.text, choice.logprobs.tokens)
        assert g["text_offset"] == choice.logprobs.text_offset
        assert g["token_logprobs"][1:] == pytest.approx(choice.logprobs.token_logprobs[1:], abs=TOLERANCE)
