"""prompt_logprobs on both endpoints through the openai client (vLLM's extension): the engine's values, in
vLLM's JSON shape; refused with stream=true as vLLM does."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_utils import CHAT_MESSAGES, COMPLETION_PROMPTS, MODEL


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0, timeout=60)


def _tokenize(server, **body) -> list[int]:
    response = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, **body}, headers=server.headers, timeout=30)
    return response.json()["tokens"]


def _check_shape(entries: list, prompt_ids: list[int], num_top: int) -> None:
    assert len(entries) == len(prompt_ids) and entries[0] is None
    for token_id, entry in zip(prompt_ids[1:], entries[1:]):
        assert str(token_id) in entry and len(entry) <= num_top + 1
        assert {e["rank"] for e in entry.values()} >= set(range(1, num_top + 1))
        best = max(e["logprob"] for e in entry.values())
        assert all(e["logprob"] <= 0 for e in entry.values()) and entry[str(token_id)]["logprob"] <= best
        assert all(isinstance(e["decoded_token"], str) for e in entry.values())


def test_completion_and_chat_prompt_logprobs(server, client):
    prompt = COMPLETION_PROMPTS[0]
    response = client.completions.create(model=MODEL, prompt=[prompt, COMPLETION_PROMPTS[1]], max_tokens=2,
                                         temperature=0, extra_body={"prompt_logprobs": 2})
    ids = [_tokenize(server, prompt=p) for p in (prompt, COMPLETION_PROMPTS[1])]
    for choice, prompt_ids in zip(response.choices, ids):
        _check_shape(choice.model_extra["prompt_logprobs"], prompt_ids, 2)
    assert response.usage.prompt_tokens == sum(map(len, ids))

    chat = client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, max_tokens=2, temperature=0,
                                          extra_body={"prompt_logprobs": 0})
    chat_ids = _tokenize(server, messages=CHAT_MESSAGES)
    _check_shape(chat.model_extra["prompt_logprobs"], chat_ids, 0)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert plain.choices[0].model_extra.get("prompt_logprobs") is None


def test_prompt_logprobs_refused_with_stream_and_out_of_range(client):
    for fields in ({"stream": True}, {}):
        value = 21 if not fields else 1
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"prompt_logprobs": value},
                                      **fields)
        assert "prompt_logprobs" in info.value.body["message"], info.value.body
