"""Faults inside the engine, on a live server over the scripted FakeEngine: a request that fails in
add_request fails alone (500, others stream on); a dead loop reaches every stream and /health."""

from __future__ import annotations

import httpx
import openai
import pytest
from fake_engine import ByteTokenizer, FakeEngine
from server_utils import LiveServer, ThreadedServer

from scaleinfer.engine.async_engine import AsyncLLMEngine
from scaleinfer.server.app import build_app


@pytest.fixture
def fake_server():
    fake = FakeEngine(tokenizer=ByteTokenizer())
    engine = AsyncLLMEngine(fake)  # type: ignore[arg-type]
    threaded = ThreadedServer(build_app(engine))
    yield fake, LiveServer(threaded.url, engine)
    threaded.stop()
    engine.shutdown()


def client_for(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_request_failing_in_the_engine_fails_alone(fake_server):
    fake, live = fake_server
    stream = client_for(live).completions.create(model="fake", prompt="hi", max_tokens=200, stream=True)
    first = next(iter(stream))
    failed = httpx.post(f"{live.url}/v1/completions", json={"model": "fake", "prompt": "boom"}, timeout=30)
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "server_error" and "exploded" in failed.json()["error"]["message"]
    chunks = [first, *stream]
    # outputs a reader has not taken yet coalesce, so chunks may carry several tokens: the text is what counts
    assert "".join(c.choices[0].text for c in chunks) == "x" * 200 and chunks[-1].choices[0].finish_reason == "length"
    assert httpx.get(f"{live.url}/health").status_code == 200


def test_dead_engine_fails_streams_health_and_new_requests(fake_server):
    fake, live = fake_server
    stream = client_for(live).completions.create(model="fake", prompt="hi", max_tokens=1000, stream=True)
    next(iter(stream))
    fake.fail_step = True
    with pytest.raises(openai.APIError, match="device lost"):
        for _ in stream:
            pass
    health = httpx.get(f"{live.url}/health")
    assert health.status_code == 503 and "device lost" in health.json()["error"]
    refused = httpx.post(f"{live.url}/v1/completions", json={"model": "fake", "prompt": "hi"}, timeout=30)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
    assert live.metrics()["scaleinfer_engine_healthy"] == 0
