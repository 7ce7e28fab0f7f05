"""The vLLM sampling fields on both endpoints (min_p, stop_token_ids, include_stop_str_in_output), and every
field that would change the output and is not built answering 400 naming it; the live embedded-model server."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_utils import CHAT_MESSAGES, COMPLETION_PROMPTS, GREEDY, MODEL

from scaleinfer.server.unsupported import _CHAT, _COMPLETION

pytestmark = pytest.mark.slow

PROMPT = COMPLETION_PROMPTS[0]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0, timeout=60)


def test_min_p_one_keeps_only_the_top_token_on_both_endpoints(server, client):
    sampled = dict(temperature=1.0, max_tokens=GREEDY["max_tokens"], extra_body={"min_p": 1.0})
    completion = client.completions.create(model=MODEL, prompt=PROMPT, seed=3, **sampled)
    assert completion.choices[0].text == server.references.completions[PROMPT]
    chat = client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, seed=3, **sampled)
    assert chat.choices[0].message.content == server.references.chat


def test_min_p_out_of_range_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, extra_body={"min_p": 1.5})
    assert info.value.body["param"] == "min_p"


def test_stop_token_ids_end_the_output_on_both_endpoints(server, client):
    tokenizer = server.engine.tokenizer
    for reference, create in (
        (server.references.completions[PROMPT], lambda **kw: client.completions.create(prompt=PROMPT, **kw)),
        (server.references.chat, lambda **kw: client.chat.completions.create(messages=CHAT_MESSAGES, **kw)),
    ):
        stop_ids = sorted(set(tokenizer.encode(reference)))  # the greedy output reaches one of them early
        response = create(model=MODEL, **GREEDY, extra_body={"stop_token_ids": stop_ids})
        choice = response.choices[0]
        text = choice.text if hasattr(choice, "text") else choice.message.content
        assert choice.finish_reason == "stop" and response.usage.completion_tokens < GREEDY["max_tokens"]
        assert reference.startswith(text)


def test_include_stop_str_in_output(client):
    kwargs = dict(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=12, temperature=0, stop=[","])
    cut = client.completions.create(**kwargs).choices[0].text
    kept = client.completions.create(**kwargs, extra_body={"include_stop_str_in_output": True}).choices[0].text
    assert "," not in cut and kept == cut + ","


# ---- refused fields ---------------------------------------------------------------------------------

# a value that is not inert, per field
REFUSED_VALUES = {
    "best_of": 2, "use_beam_search": True, "length_penalty": 0.5, "prompt_logprobs": 1,
    "allowed_token_ids": [1, 2], "bad_words": ["x"], "logits_processors": ["p"],
    "truncate_prompt_tokens": 4, "spaces_between_special_tokens": False, "return_tokens_as_token_ids": True,
    "return_token_ids": True, "suffix": " end", "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "auto", "functions": [{"name": "f"}], "function_call": "auto", "audio": {"voice": "alloy"},
    "modalities": ["text", "audio"], "reasoning_effort": "high", "verbosity": "low", "web_search_options": {},
    "echo": True, "chat_template": "{{ messages }}", "chat_template_kwargs": {"enable_thinking": True},
    "documents": [{"text": "x"}], "continue_final_message": True, "add_generation_prompt": False,
    "add_special_tokens": True, "mm_processor_kwargs": {"a": 1},
}
CASES = [("completions", name) for name in _COMPLETION] + [("chat/completions", name) for name in _CHAT]
BODIES = {"completions": {"model": MODEL, "prompt": "Hi", "max_tokens": 2},
          "chat/completions": {"model": MODEL, "messages": CHAT_MESSAGES, "max_tokens": 2}}


def post(server, path: str, **fields) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{path}", json={**BODIES[path], **fields}, headers=server.headers, timeout=60)


@pytest.mark.parametrize(("path", "name"), CASES, ids=[f"{p}:{n}" for p, n in CASES])
def test_an_unsupported_field_is_400_naming_it(server, path, name):
    response = post(server, path, **{name: REFUSED_VALUES[name]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == name and name in error["message"], error


def test_through_the_openai_client_best_of_suffix_tools(client):
    refused = [
        ("best_of", lambda: client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, best_of=3)),
        ("suffix", lambda: client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, suffix="!")),
        # tools under tool_choice auto on a chat template that writes no tool-call format (test_tool_calling.py)
        ("tool_choice", lambda: client.chat.completions.create(
            model=MODEL, messages=CHAT_MESSAGES, max_tokens=2,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])),
        ("tool_choice", lambda: client.chat.completions.create(
            model=MODEL, messages=CHAT_MESSAGES, max_tokens=2, tool_choice="required")),
    ]
    for name, call in refused:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.body["param"] == name and name in info.value.body["message"], name


def test_inert_values_and_caller_fields_are_served(server):
    inert = dict(best_of=1, response_format={"type": "text"}, prompt_logprobs=None, user="u", metadata={"k": "v"},
                 store=False, service_tier="auto", priority=0)
    assert post(server, "completions", **inert, suffix="").status_code == 200
    chat = post(server, "chat/completions", **inert, tools=[], tool_choice="none", modalities=["text"])
    assert chat.status_code == 200, chat.text

