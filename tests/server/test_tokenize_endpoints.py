"""vLLM's /tokenize and /detokenize (shapes, the chat template, add_special_tokens, bad input) and /version on
the live embedded-model server."""

from __future__ import annotations

import importlib.metadata

import httpx
import pytest
from server_utils import CHAT_MESSAGES, MAX_MODEL_LEN, MODEL

from scaleinfer.tokenizer import apply_chat_template

pytestmark = pytest.mark.slow


def post(server, path: str, headers: dict | None = None, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/{path}", json=body, timeout=30,
                      headers=server.headers if headers is None else headers)


def test_tokenize_a_prompt_then_detokenize_it(server):
    tokenizer = server.engine.tokenizer
    response = post(server, "tokenize", model=MODEL, prompt="Hello, world")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {"count": len(body["tokens"]), "max_model_len": MAX_MODEL_LEN,
                    "tokens": tokenizer.encode("Hello, world")}
    plain = post(server, "tokenize", prompt="Hello, world", add_special_tokens=False).json()["tokens"]
    assert plain == tokenizer.encode("Hello, world", add_special_tokens=False)
    back = post(server, "detokenize", model=MODEL, tokens=plain)
    assert back.status_code == 200 and back.json() == {"prompt": "Hello, world"}


def test_tokenize_messages_through_the_chat_template(server):
    tokenizer = server.engine.tokenizer
    with_prompt = post(server, "tokenize", model=MODEL, messages=CHAT_MESSAGES).json()
    assert with_prompt["tokens"] == apply_chat_template(tokenizer, CHAT_MESSAGES)
    without = post(server, "tokenize", model=MODEL, messages=CHAT_MESSAGES, add_generation_prompt=False).json()
    assert without["tokens"] == apply_chat_template(tokenizer, CHAT_MESSAGES, add_generation_prompt=False)
    assert without["count"] < with_prompt["count"]


# name: (path, body, status, param)
BAD = {
    "neither prompt nor messages": ("tokenize", {"model": MODEL}, 400, "prompt"),
    "both prompt and messages": ("tokenize", {"prompt": "x", "messages": CHAT_MESSAGES}, 400, "prompt"),
    "another model": ("tokenize", {"model": "gpt-17", "prompt": "x"}, 404, "model"),
    "prompt not a string": ("tokenize", {"prompt": [1, 2]}, 422, "prompt"),
    "add_special_tokens with messages": ("tokenize", {"messages": CHAT_MESSAGES, "add_special_tokens": True}, 400,
                                         "add_special_tokens"),
    "empty messages": ("tokenize", {"messages": []}, 400, "messages"),
    "a chat field not supported": ("tokenize", {"messages": CHAT_MESSAGES, "continue_final_message": True}, 400,
                                   "continue_final_message"),
    "token past the vocabulary": ("detokenize", {"tokens": [1, 10**9]}, 400, "tokens"),
    "negative token": ("detokenize", {"tokens": [-1]}, 400, "tokens"),
    "tokens missing": ("detokenize", {"model": MODEL}, 422, "tokens"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_its_field(server, case):
    path, body, status, param = BAD[case]
    response = post(server, path, **body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_tokenize_needs_the_api_key_and_version_does_not(server):
    assert post(server, "tokenize", headers={}, prompt="x").status_code == 401
    assert post(server, "detokenize", headers={}, tokens=[1]).status_code == 401
    version = httpx.get(f"{server.url}/version", timeout=10)
    assert version.status_code == 200 and version.json() == {"version": importlib.metadata.version("scaleinfer")}
