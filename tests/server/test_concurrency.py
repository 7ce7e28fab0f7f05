"""64 concurrent streams, a quarter disconnecting mid-stream: the rest complete correctly, and the
disconnected ones are aborted at once (0 running, 0 KV blocks in /metrics)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from server_utils import COMPLETION_PROMPTS, GREEDY, MODEL, wait_until

pytestmark = pytest.mark.slow

NUM_REQUESTS = 64
DISCONNECT_EVERY = 4  # a quarter
DROPPED_MAX_TOKENS = 300


async def one_stream(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
    """(text, finish_reason); every DISCONNECT_EVERY-th request drops its connection after two chunks."""
    disconnects = i % DISCONNECT_EVERY == 0
    # A dropped request would run for seconds more if it were not aborted.
    max_tokens = DROPPED_MAX_TOKENS if disconnects else GREEDY["max_tokens"]
    stream = await client.completions.create(model=MODEL, prompt=COMPLETION_PROMPTS[i % len(COMPLETION_PROMPTS)],
                                             stream=True, temperature=0.0, max_tokens=max_tokens,
                                             extra_body={"ignore_eos": disconnects})
    text, finish_reason = "", None
    async with stream:
        async for num_chunks, chunk in aiter_enumerate(stream):
            text += chunk.choices[0].text
            finish_reason = chunk.choices[0].finish_reason
            if disconnects and num_chunks == 1:
                break  # leaving the block closes the connection mid-stream
    return text, finish_reason


async def aiter_enumerate(iterable):
    i = 0
    async for item in iterable:
        yield i, item
        i += 1


async def run_all(url: str, api_key: str) -> list[tuple[str, str | None]]:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120) as client:
        return await asyncio.gather(*(one_stream(client, i) for i in range(NUM_REQUESTS)))


def test_64_streams_with_a_quarter_disconnecting(server):
    before = server.metrics()
    results = asyncio.run(run_all(server.url, server.api_key))
    for i, (text, finish_reason) in enumerate(results):
        if i % DISCONNECT_EVERY == 0:
            assert finish_reason is None, "the disconnecting client left before the end"
        else:
            assert text == server.references.completions[COMPLETION_PROMPTS[i % len(COMPLETION_PROMPTS)]], i
            assert finish_reason in ("length", "stop")

    def drained() -> bool:
        metrics = server.metrics()
        return metrics["scaleinfer_num_requests_running"] == 0 and metrics["scaleinfer_kv_cache_used_blocks"] == 0

    wait_until(drained, timeout_s=10, what="0 running requests and 0 KV blocks in /metrics")
    metrics = server.metrics()
    assert metrics["scaleinfer_num_requests_waiting"] == 0
    abort = 'scaleinfer_requests_total{finish_reason="abort"}'
    assert metrics[abort] - before.get(abort, 0.0) == NUM_REQUESTS // DISCONNECT_EVERY
    generated = metrics["scaleinfer_generation_tokens_total"] - before["scaleinfer_generation_tokens_total"]
    num_dropped = NUM_REQUESTS // DISCONNECT_EVERY
    assert generated < (NUM_REQUESTS - num_dropped) * GREEDY["max_tokens"] + num_dropped * DROPPED_MAX_TOKENS / 4


def test_non_streaming_client_that_leaves_is_aborted(server):
    """A non-streaming request holds no socket writes to fail on; the server watches for the disconnect."""
    before = server.metrics()['scaleinfer_requests_total{finish_reason="abort"}']
    request = {"model": MODEL, "prompt": "Tell me a story:", "max_tokens": 480, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # ~15 s of decoding if it were not aborted
        httpx.post(f"{server.url}/v1/completions", json=request, headers=server.headers, timeout=1.0)
    wait_until(lambda: server.engine.stats().num_running == 0, timeout_s=5, what="the request aborted")
    assert server.metrics()['scaleinfer_requests_total{finish_reason="abort"}'] == before + 1
