"""Admission control on a run_server subprocess with max_num_seqs=1, max_waiting=1: one request runs,
one waits, the next gets 503 with Retry-After at once; the server then serves on."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from server_utils import MODEL, wait_until

pytestmark = pytest.mark.slow

LONG = dict(model=MODEL, prompt="Tell me a long story:", max_tokens=200, temperature=0.0,
            extra_body={"ignore_eos": True})


def test_full_queue_answers_503_with_retry_after(admission_server):
    url = admission_server.url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    running = client.completions.create(stream=True, **LONG)
    next(iter(running))  # it has a token: it is in the batch
    waiting = client.completions.create(stream=True, **LONG)  # headers are sent once admitted to the queue
    wait_until(lambda: admission_server.metrics()["scaleinfer_num_requests_waiting"] == 1, what="1 waiting")

    start = time.monotonic()
    refused = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                         timeout=30)
    assert time.monotonic() - start < 5, "refused at once, not after a wait"
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    error = refused.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "queue_full" and "max_waiting" in error["message"]
    with pytest.raises(openai.InternalServerError, match="overloaded"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)

    running.close()
    waiting.close()
    idle = lambda: admission_server.metrics()["scaleinfer_num_requests_running"] == 0  # noqa: E731
    wait_until(idle, what="both streams aborted")
    served = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0.0)
    assert served.choices[0].finish_reason in ("length", "stop")


def test_health_and_models_without_api_key(admission_server):
    assert httpx.get(f"{admission_server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{admission_server.url}/v1/models").json()["data"][0]["id"] == MODEL
