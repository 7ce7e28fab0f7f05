"""Every bad input gets its status and an OpenAI error object naming the problem; everyone else is served."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
from server_utils import MAX_BODY_BYTES, MAX_MODEL_LEN, MODEL

pytestmark = pytest.mark.slow

GOOD = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def body(**changes) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


# name: (path, raw body, status, param, message fragment)
CASES = {
    "malformed json": ("/v1/completions", b'{"model": "x", "prompt": ', 400, None, "not valid JSON"),
    "json not an object": ("/v1/completions", b"[1, 2]", 422, None, "object"),
    "empty body": ("/v1/completions", b"", 400, None, "not valid JSON"),
    "missing field": ("/v1/chat/completions", json.dumps({"model": MODEL}).encode(), 422, "messages", "messages"),
    "missing model": ("/v1/completions", json.dumps({"prompt": "x"}).encode(), 422, "model", "model"),
    "wrong type max_tokens": ("/v1/completions", body(max_tokens="ten"), 422, "max_tokens", "integer"),
    "wrong type prompt": ("/v1/completions", body(prompt={"text": "x"}), 422, "prompt", "prompt"),
    "wrong type message": ("/v1/chat/completions", json.dumps({**CHAT, "messages": ["hi"]}).encode(), 422,
                           "messages", "messages"),
    "max_tokens zero": ("/v1/completions", body(max_tokens=0), 400, "max_tokens", "max_tokens"),
    "max_tokens negative": ("/v1/completions", body(max_tokens=-5), 400, "max_tokens", "max_tokens"),
    "max_tokens past context": ("/v1/completions", body(max_tokens=MAX_MODEL_LEN + 1), 400, None, "context"),
    "chat max_tokens past context": ("/v1/chat/completions", json.dumps({**CHAT, "max_tokens": 10_000}).encode(),
                                     400, None, "context"),
    "prompt longer than context": ("/v1/completions", body(prompt=[17] * (MAX_MODEL_LEN + 10)), 400, None,
                                   "context"),
    "empty prompt": ("/v1/completions", body(prompt=""), 400, "prompt", "empty"),
    "one empty prompt of a batch": ("/v1/completions", body(prompt=["Hello", ""]), 400, "prompt", "empty"),
    "empty prompt list": ("/v1/completions", body(prompt=[]), 400, "prompt", "empty"),
    "token id out of vocabulary": ("/v1/completions", body(prompt=[1, 10**9]), 400, "prompt", "prompt"),
    "unknown model": ("/v1/completions", body(model="gpt-17"), 404, "model", "gpt-17"),
    "n too large": ("/v1/completions", body(n=1000), 400, "n", "n must be at most"),
    "temperature negative": ("/v1/completions", body(temperature=-1), 400, "temperature", "temperature"),
    "top_p zero": ("/v1/completions", body(top_p=0), 400, "top_p", "top_p"),
    "logprobs too many": ("/v1/completions", body(logprobs=99), 400, "logprobs", "logprobs"),
    "top_logprobs without logprobs": ("/v1/chat/completions", json.dumps({**CHAT, "top_logprobs": 2}).encode(),
                                      400, "top_logprobs", "logprobs"),
    "top_logprobs too many": ("/v1/chat/completions", json.dumps({**CHAT, "logprobs": True, "top_logprobs": 21}
                                                                 ).encode(), 400, "top_logprobs", "top_logprobs must"),
    "empty messages": ("/v1/chat/completions", json.dumps({**CHAT, "messages": []}).encode(), 400, "messages",
                       "empty"),
    "image content": ("/v1/chat/completions", json.dumps({**CHAT, "messages": [
        {"role": "user", "content": [{"type": "image_url"}]}]}).encode(), 400, "messages", "image_url"),
    "presence_penalty too large": ("/v1/completions", body(presence_penalty=3), 400, "presence_penalty", "3"),
    "frequency_penalty too small": ("/v1/chat/completions", json.dumps({**CHAT, "frequency_penalty": -2.5}).encode(),
                                    400, "frequency_penalty", "-2.5"),
    "repetition_penalty zero": ("/v1/completions", body(repetition_penalty=0), 400, "repetition_penalty",
                                "repetition_penalty"),
    "logit_bias key not a token id": ("/v1/completions", body(logit_bias={"yes": 1}), 400, "logit_bias", "'yes'"),
    "logit_bias value too large": ("/v1/completions", body(logit_bias={"5": 101}), 400, "logit_bias", "101"),
    "logit_bias token out of vocabulary": ("/v1/completions", body(logit_bias={"999999999": 1}), 400,
                                           "logit_bias", "999999999"),
    "invalid utf-8": ("/v1/completions", b'{"model": "smollm2-135m", "prompt": "\xff\xfe"}', 400, None, "UTF-8"),
}


def check_error(response: httpx.Response, status: int, param: str | None, fragment: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"], error
    assert error["param"] == param, error
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    return error


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request(server, case):
    path, raw, status, param, fragment = CASES[case]
    headers = {**server.headers, "Content-Type": "application/json"}
    response = httpx.post(f"{server.url}{path}", content=raw, headers=headers, timeout=30)
    check_error(response, status, param, fragment)


def test_body_over_the_limit_declared_and_chunked(server):
    big = body(prompt="x" * (MAX_BODY_BYTES + 1))
    response = httpx.post(f"{server.url}/v1/completions", content=big, headers=server.headers, timeout=30)
    check_error(response, 413, None, "over the limit")

    def chunks():  # no Content-Length: the limit holds while the body streams in
        for start in range(0, len(big), 8192):
            yield big[start:start + 8192]

    response = httpx.post(f"{server.url}/v1/completions", content=chunks(), headers=server.headers, timeout=30)
    check_error(response, 413, None, "over the limit")


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "test-key", "Basic dGVzdC1rZXk="])
def test_wrong_or_missing_api_key(server, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models")):
        response = httpx.request(method, f"{server.url}{path}", content=body(), headers=headers, timeout=30)
        error = check_error(response, 401, None, "API key")
        assert error["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200  # health and metrics need no key
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_unknown_route_is_an_openai_404(server):
    response = httpx.get(f"{server.url}/v1/nothing-here", headers=server.headers)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_openai_client_sees_the_errors(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="gpt-17"):
        client.completions.create(model="gpt-17", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    bad_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


def test_bad_requests_do_not_disturb_a_running_stream(server):
    """A stream runs while every bad request above is refused; it completes as if alone."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)
    kwargs = dict(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    alone = client.completions.create(**kwargs).choices[0].text
    stream = client.completions.create(stream=True, **kwargs)
    first = next(iter(stream)).choices[0].text
    done = threading.Event()

    def hammer():
        headers = {**server.headers, "Content-Type": "application/json"}
        for path, raw, status, _, _ in CASES.values():
            assert httpx.post(f"{server.url}{path}", content=raw, headers=headers).status_code == status
        done.set()

    thread = threading.Thread(target=hammer)
    thread.start()
    rest = "".join(c.choices[0].text for c in stream)
    thread.join(timeout=60)
    assert done.is_set()
    assert first + rest == alone


def _stream_chunks(server, path: str, payload: bytes) -> list[dict]:
    response = httpx.post(f"{server.url}{path}", content=payload,
                          headers={**server.headers, "Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 200, response.text
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]


def test_continuous_usage_stats_false_is_served(server):
    """Its default changes nothing: the stream ends with the one usage chunk include_usage asks for."""
    options = {"include_usage": True, "continuous_usage_stats": False}
    chunks = _stream_chunks(server, "/v1/completions", body(stream=True, stream_options=options))
    assert [c.get("usage") is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_puts_the_usage_so_far_in_every_chunk(server, path):
    """vLLM's continuous_usage_stats: each chunk's usage counts the tokens streamed up to it; the last chunk is
    the usage of the whole request, as without it. Without include_usage it adds nothing (vLLM's rule)."""
    def payload(**options) -> bytes:
        fields = dict(stream=True, stream_options=options, max_tokens=6, temperature=0, ignore_eos=True)
        return body(**fields) if path == "/v1/completions" else json.dumps({**CHAT, **fields}).encode()

    chunks = _stream_chunks(server, path, payload(include_usage=True, continuous_usage_stats=True))
    usages = [c["usage"] for c in chunks]
    assert all(u is not None for u in usages)
    assert len({u["prompt_tokens"] for u in usages}) == 1 and usages[0]["prompt_tokens"] > 0
    completion = [u["completion_tokens"] for u in usages]
    assert completion == sorted(completion) and completion[-1] == 6 and completion[-2] == 6
    assert completion[0] < 6  # the first chunks come before the last token
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
    alone = _stream_chunks(server, path, payload(continuous_usage_stats=True))
    assert all(c.get("usage") is None for c in alone)


