"""Structured outputs through the openai client against the live embedded-model server: response_format
(json_schema, json_object) and vLLM's structured_outputs / guided_* fields on both endpoints, streamed and
not; a schema that does not compile, or two constraints at once, is a 400 naming it."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from server_utils import MODEL

pytestmark = pytest.mark.slow

ENUM = {"type": "object", "additionalProperties": False, "required": ["color", "count"], "properties": {
    "color": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer", "minimum": 1, "maximum": 9}}}
COLOR_CHAT = [{"role": "user", "content": "Pick a color and a count."}]
CHOICES = ["Paris", "London", "Berlin"]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0, timeout=120)


def test_chat_response_format_json_schema_validates(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "pick", "schema": ENUM, "strict": True}}
    chat = client.chat.completions.create(model=MODEL, messages=COLOR_CHAT, max_tokens=32, temperature=0,
                                          response_format=response_format)
    choice = chat.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), ENUM)


def test_completions_response_format_json_object_parses(client):
    completion = client.completions.create(model=MODEL, prompt="A JSON object describing Paris:", max_tokens=40,
                                           temperature=0, extra_body={"response_format": {"type": "json_object"}})
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].text), dict)


def test_vllm_fields_on_both_endpoints(client):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Capital of France?"}],
                                          max_tokens=8, temperature=0,
                                          extra_body={"structured_outputs": {"choice": CHOICES}})
    assert chat.choices[0].message.content in CHOICES
    date = client.completions.create(model=MODEL, prompt="The date today is", max_tokens=16, temperature=0,
                                     extra_body={"guided_regex": r"\d{4}-\d{2}-\d{2}"})
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date.choices[0].text)
    answer = client.completions.create(model=MODEL, prompt="Is the sky blue? Answer:", max_tokens=8, temperature=0,
                                       extra_body={"guided_grammar": 'root ::= ("yes" | "no") "."'})
    assert answer.choices[0].text in ("yes.", "no.")
    picked = client.completions.create(model=MODEL, prompt="A color and a count as JSON:", max_tokens=32,
                                       temperature=0, extra_body={"guided_json": ENUM})
    jsonschema.validate(json.loads(picked.choices[0].text), ENUM)


def test_a_streamed_constrained_chat_joins_to_a_choice(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Capital of France?"}],
                                            max_tokens=8, temperature=0, stream=True,
                                            extra_body={"guided_choice": CHOICES})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text in CHOICES and chunks[-1].choices[0].finish_reason == "stop"


def test_a_schema_that_does_not_compile_is_400_naming_it(client):
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objekt"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=COLOR_CHAT, max_tokens=4, response_format=bad)
    body = info.value.body
    assert "objekt" in body["message"] and body["param"] == "response_format"
    assert body["message"].startswith("response_format.json_schema.schema does not compile")  # the field sent
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, extra_body={"guided_regex": "[0-9"})
    body = info.value.body
    assert "[0-9" in body["message"] and body["param"] == "guided_regex"
    assert body["message"].startswith("guided_regex does not compile")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=4,
                                  extra_body={"structured_outputs": {"regex": "(a"}})
    assert info.value.body["message"].startswith("structured_outputs.regex does not compile")
    assert info.value.body["param"] == "structured_outputs"


def test_two_constraints_or_a_malformed_one_are_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=4,
                                  extra_body={"guided_regex": "a+", "response_format": {"type": "json_object"}})
    assert info.value.body["param"] == "response_format" and "guided_regex" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=4,
                                  extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}})
    assert "exactly one" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=COLOR_CHAT, max_tokens=4,
                                       response_format={"type": "json_schema"})
    assert info.value.body["param"] == "response_format"
