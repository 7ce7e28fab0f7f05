"""Requests too large for anyone's good are refused with a 400 naming the bound: too many prompts, too many
tokens, a prompt string too long to be worth tokenizing (refused at once, while a running stream goes on),
and a request the waiting queue could never hold (400, where a full queue is a 503)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from server_utils import API_KEY, MAX_MODEL_LEN, MODEL, ThreadedServer

from scaleinfer.config import SchedulerConfig
from scaleinfer.errors import InvalidRequestError
from scaleinfer.server.app import build_app
from scaleinfer.server.errors import ApiError
from scaleinfer.server.limits import CHARS_PER_TOKEN, MAX_PROMPTS, RequestLimits
from scaleinfer.server.middleware import DEFAULT_MAX_BODY_BYTES

MAX_REQUEST_TOKENS = 16 * MAX_MODEL_LEN  # max_n x the context
# About 0.1 s on an idle 2-core machine (most of it parsing the 4 MB of JSON); tokenizing 4 MB takes about 4 s
# there. Generous for a loaded machine; the message (characters, not tokens) is what shows the size check.
REFUSED_WITHIN_S = 1.5


@pytest.fixture(scope="module")
def big_body_url(server):
    """A second app over the same engine, taking bodies up to the default 4 MiB (the shared one takes 64 KiB)."""
    threaded = ThreadedServer(build_app(server.engine, api_key=API_KEY, max_body_bytes=DEFAULT_MAX_BODY_BYTES))
    yield threaded.url
    threaded.stop()


def post(url: str, path: str, body: dict, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/v1/{path}", json={"model": MODEL, **body}, timeout=timeout,
                      headers={"Authorization": f"Bearer {API_KEY}"})


def error_of(response: httpx.Response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    return error["message"]


# ---- the bounds, as arithmetic --------------------------------------------------------------------------


def test_request_limits_count_tokens_as_n_times_prompt_plus_max_tokens():
    limits = RequestLimits(max_model_len=512, max_waiting=4, max_n=16)
    limits.check_tokens([500], max_tokens=12, n=16)  # the largest one-prompt request: 16 x 512
    with pytest.raises(ApiError, match="prompt has 500 tokens and max_tokens is 13; the model's context is 512"):
        limits.check_tokens([500], max_tokens=13, n=1)
    limits.check_tokens([200, 200], max_tokens=56, n=16)
    with pytest.raises(ApiError, match=r"8224 tokens .* at most 8192"):
        limits.check_tokens([200, 200], max_tokens=57, n=16)
    limits.check_tokens([100] * 64, max_tokens=28, n=1)  # 64 x 128
    with pytest.raises(ApiError, match="at most 64 prompts, got 65"):
        limits.check_prompts(["x"] * 65)
    limits.check_prompts(["x" * 512 * CHARS_PER_TOKEN])
    with pytest.raises(ApiError, match=f"{512 * CHARS_PER_TOKEN + 1} characters; at most {512 * CHARS_PER_TOKEN}"):
        limits.check_prompts(["x" * (512 * CHARS_PER_TOKEN + 1)])
    limits.check_admissible(n=4, num_prompts=1)
    with pytest.raises(ApiError, match=r"5 sequences .*max_waiting=4"):
        limits.check_admissible(n=1, num_prompts=5)


def test_max_waiting_0_is_refused_before_anything_loads():
    with pytest.raises(InvalidRequestError, match="max_waiting must be at least 1"):
        SchedulerConfig(max_waiting=0)


# ---- on the live server -----------------------------------------------------------------------------


@pytest.mark.slow
def test_1000_prompts_are_refused_at_once(big_body_url):
    """The issue's request: 1,000 prompts (here of 400 tokens each, to fit the test model's context) once held
    the engine for minutes. The timeout makes a request that was admitted instead fail here, and abort."""
    prompts = ["hi" + " hi" * 399] * 1000
    message = error_of(post(big_body_url, "completions", {"prompt": prompts, "max_tokens": 16}), "prompt")
    assert f"at most {MAX_PROMPTS} prompts, got 1000" in message


@pytest.mark.slow
def test_too_many_tokens_in_one_request_are_refused(server):
    prompts = [[17] * 450] * 20  # 20 x (450 + 1) tokens
    message = error_of(post(server.url, "completions", {"prompt": prompts, "max_tokens": 1}), "prompt")
    assert "needs 9020 tokens" in message and f"at most {MAX_REQUEST_TOKENS}" in message


@pytest.mark.slow
def test_4mb_prompt_is_refused_at_once_while_a_stream_runs(server, big_body_url):
    """Refused by its size before any tokenizer sees it (the message counts characters, not tokens), quickly,
    on both endpoints, while a stream that was running completes."""
    stream_body = {"model": MODEL, "prompt": "Once upon a time,", "max_tokens": 48, "temperature": 0,
                   "ignore_eos": True, "stream": True}
    chunks: list[str] = []
    first = threading.Event()

    def read_stream() -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=stream_body, headers=server.headers,
                          timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
                    first.set()

    reader = threading.Thread(target=read_stream)
    reader.start()
    assert first.wait(timeout=60), "the stream started"
    huge = "x" * 4_000_000
    bound = MAX_MODEL_LEN * CHARS_PER_TOKEN
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=f"{big_body_url}/v1", headers=headers, timeout=30) as client:
        client.get("/models")  # connected: what is timed below is the server's
        for path, body, param in (("completions", {"prompt": huge, "max_tokens": 4}, "prompt"),
                                  ("chat/completions", {"messages": [{"role": "user", "content": huge}]},
                                   "messages")):
            raw = json.dumps({"model": MODEL, **body}).encode()
            start = time.monotonic()
            response = client.post(path, content=raw)
            elapsed = time.monotonic() - start
            assert f"4000000 characters; at most {bound}" in error_of(response, param)
            assert elapsed < REFUSED_WITHIN_S, f"{path}: refused after {elapsed:.2f} s"
    reader.join(timeout=60)
    # a chunk may carry several tokens (outputs coalesce while a reader is away); the stream ran to its length
    assert chunks[-1] == "[DONE]" and json.loads(chunks[-2])["choices"][0]["finish_reason"] == "length"


@pytest.mark.slow
def test_request_the_queue_could_never_hold_is_400(admission_server):
    """max_waiting=1: n=2, or two prompts, can never be queued at once, even on an idle server."""
    url = admission_server.url
    for path, body in (("completions", {"prompt": "hi", "n": 2}),
                       ("completions", {"prompt": ["hi", "yo"]}),
                       ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2})):
        response = httpx.post(f"{url}/v1/{path}", json={"model": MODEL, "max_tokens": 2, **body}, timeout=30)
        message = error_of(response, "n")
        assert "2 sequences" in message and "max_waiting=1" in message and "never" in message
    served = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=30)
    assert served.status_code == 200
