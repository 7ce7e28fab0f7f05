"""vLLM's whitespace_pattern (structured_outputs.whitespace_pattern, and the older top-level
guided_whitespace_pattern) through the openai client on the embedded model: the JSON parses, validates and
has exactly the whitespace the pattern allows; a pattern that cannot be honoured is a 400 naming it."""

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
PROMPT = "A color and a count as JSON:"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0, timeout=120)


def _complete(client, **extra) -> str:
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0,
                                           extra_body=extra)
    assert completion.choices[0].finish_reason == "stop"
    text = completion.choices[0].text
    jsonschema.validate(json.loads(text), ENUM)
    return text


def test_the_pattern_decides_the_whitespace(client):
    spaced = _complete(client, structured_outputs={"json": ENUM, "whitespace_pattern": " "})
    assert re.fullmatch(r'\{ "color" : "(red|green|blue)" , "count" : [1-9] \}', spaced), spaced
    compact = _complete(client, guided_json=ENUM, guided_whitespace_pattern="")
    assert compact == json.dumps(json.loads(compact), separators=(",", ":"))
    response_format = {"type": "json_schema", "json_schema": {"name": "pick", "schema": ENUM}}
    lines = _complete(client, response_format=response_format, guided_whitespace_pattern=r"\n?")
    assert " " not in lines and "\n\n" not in lines


@pytest.mark.parametrize(("extra", "words"), [
    ({"structured_outputs": {"json": ENUM, "whitespace_pattern": "[ "}},
     "whitespace_pattern '[ ' cannot be honoured (Regex"),
    ({"guided_regex": "a+", "guided_whitespace_pattern": " "}, "JSON outputs (json, json_object) only"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern needs a JSON constraint"),
    ({"structured_outputs": {"json_object": True, "whitespace_pattern": " ", "disable_any_whitespace": True}},
     "cannot be combined with disable_any_whitespace"),
])
def test_a_pattern_that_cannot_be_honoured_is_400(client, extra, words):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, extra_body=extra)
    assert words in info.value.body["message"]
