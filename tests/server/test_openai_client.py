"""The official openai client against a live server: completions and chat, streaming and not."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_utils import CHAT_MESSAGES, COMPLETION_PROMPTS, GREEDY, MAX_MODEL_LEN, MODEL, PENALTIES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0, timeout=60)


def test_completion_greedy_equals_llm_generate(server, client):
    prompt = COMPLETION_PROMPTS[0]
    response = client.completions.create(model=MODEL, prompt=prompt, **GREEDY)
    assert response.object == "text_completion" and response.model == MODEL
    assert response.choices[0].text == server.references.completions[prompt]
    assert response.choices[0].finish_reason in ("length", "stop")
    usage = response.usage
    assert usage.completion_tokens <= GREEDY["max_tokens"] and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completion_stream_concatenates_to_the_same_text(server, client):
    prompt = COMPLETION_PROMPTS[1]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1, "streamed token by token"
    assert "".join(c.choices[0].text for c in text_chunks) == server.references.completions[prompt]
    assert text_chunks[-1].choices[0].finish_reason is not None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(text_chunks)


def test_batched_prompts_each_match(server, client):
    prompts = COMPLETION_PROMPTS[:3]
    response = client.completions.create(model=MODEL, prompt=prompts, **GREEDY)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text for c in response.choices] == [server.references.completions[p] for p in prompts]


def test_chat_greedy_equals_llm_chat_stream_and_not(server, client):
    response = client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, **GREEDY)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == server.references.chat
    stream = client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, stream=True, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == server.references.chat
    assert chunks[-1].choices[0].finish_reason == response.choices[0].finish_reason


def test_max_completion_tokens_and_default_limit(client):
    response = client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, max_completion_tokens=3,
                                              temperature=0)
    assert response.usage.completion_tokens <= 3


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=MODEL, prompt="My favourite animal is", max_tokens=8, temperature=1.0, top_p=0.95)
    first = client.completions.create(seed=1234, **kwargs).choices[0].text
    again = client.completions.create(seed=1234, **kwargs).choices[0].text
    assert first == again
    streamed = "".join(c.choices[0].text for c in client.completions.create(seed=1234, stream=True, **kwargs))
    assert streamed == first


def test_n_choices_and_stop(client):
    response = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", n=3, max_tokens=6,
                                         temperature=1.0, seed=7)
    assert sorted(c.index for c in response.choices) == [0, 1, 2]
    stopped = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=12, temperature=0,
                                        stop=[","])
    assert "," not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_stop_string_is_never_streamed(client):
    kwargs = dict(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=12, temperature=0, stop=[" 5"])
    whole = client.completions.create(**kwargs).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
    assert streamed == whole and " 5" not in streamed


def test_logprobs(client):
    response = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3,
                                         temperature=0, logprobs=2)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 3
    assert "".join(logprobs.tokens) == response.choices[0].text
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) >= 2 for top in logprobs.top_logprobs)
    chat = client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob


def test_token_id_prompt(server, client):
    tokenizer = server.engine.tokenizer
    ids = tokenizer.encode(COMPLETION_PROMPTS[0])
    response = client.completions.create(model=MODEL, prompt=ids, **GREEDY)
    assert response.choices[0].text == server.references.completions[COMPLETION_PROMPTS[0]]


def test_models_health_metrics(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].max_model_len == MAX_MODEL_LEN
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    metrics = server.metrics()
    for name in ("scaleinfer_num_requests_running", "scaleinfer_num_requests_waiting",
                 "scaleinfer_kv_cache_usage_perc", "scaleinfer_kv_cache_used_blocks",
                 "scaleinfer_prefix_cache_hit_rate", "scaleinfer_prompt_tokens_total",
                 "scaleinfer_generation_tokens_total", "scaleinfer_time_to_first_token_seconds_count",
                 "scaleinfer_time_per_output_token_seconds_count", "scaleinfer_e2e_request_latency_seconds_count"):
        assert name in metrics, name
    assert metrics["scaleinfer_generation_tokens_total"] > 0
    assert metrics["scaleinfer_time_to_first_token_seconds_count"] > 0


def test_penalties_equal_llm_generate_with_the_same_penalties(server, client):
    prompt = COMPLETION_PROMPTS[0]
    assert server.references.penalized != server.references.completions[prompt], "the penalties change the text"
    penalties = dict(presence_penalty=PENALTIES["presence_penalty"], frequency_penalty=PENALTIES["frequency_penalty"],
                     extra_body={"repetition_penalty": PENALTIES["repetition_penalty"]})
    response = client.completions.create(model=MODEL, prompt=prompt, **GREEDY, **penalties)
    assert response.choices[0].text == server.references.penalized
    streamed = client.completions.create(model=MODEL, prompt=prompt, stream=True, **GREEDY, **penalties)
    assert "".join(c.choices[0].text for c in streamed) == server.references.penalized
    chat = client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, **GREEDY, **penalties)
    assert chat.choices[0].message.content


def test_logit_bias_forces_a_token(server, client):
    token_id = server.engine.tokenizer.encode(" yes")[-1]
    response = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                                         logit_bias={str(token_id): 100})
    assert response.choices[0].text == server.engine.tokenizer.decode([token_id] * 4)


def test_echo_prepends_the_prompt_and_keeps_usage(server, client):
    prompt = COMPLETION_PROMPTS[2]
    plain = client.completions.create(model=MODEL, prompt=prompt, **GREEDY)
    echoed = client.completions.create(model=MODEL, prompt=prompt, echo=True, **GREEDY)
    assert echoed.choices[0].text == prompt + server.references.completions[prompt]
    assert echoed.usage == plain.usage, "the prompt is counted once, as prompt tokens"
    chunks = client.completions.create(model=MODEL, prompt=[prompt, prompt], echo=True, stream=True, **GREEDY)
    texts = ["", ""]
    for chunk in chunks:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [prompt + server.references.completions[prompt]] * 2
    ids = server.engine.tokenizer.encode(prompt)
    by_ids = client.completions.create(model=MODEL, prompt=ids, echo=True, **GREEDY)
    assert by_ids.choices[0].text == server.engine.tokenizer.decode(ids) + server.references.completions[prompt]
