"""AsyncLLMEngine against a scripted fake LLMEngine: streams, abort, failures that stay local or kill all."""

from __future__ import annotations

import asyncio
import time

import pytest
from fake_engine import ByteTokenizer, FakeEngine

from scaleinfer.engine.async_engine import AsyncLLMEngine
from scaleinfer.engine.core_thread import THREAD_NAME
from scaleinfer.errors import EngineDeadError, InvalidRequestError, RequestFailedError
from scaleinfer.outputs import RequestOutput
from scaleinfer.sampling_params import SamplingParams


def params(max_tokens: int = 4) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens)


async def collect(engine: AsyncLLMEngine, request_id: str, prompt: str, max_tokens: int = 4) -> list[RequestOutput]:
    return [out async for out in engine.generate(request_id, prompt, params(max_tokens))]


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@pytest.fixture
def fake():
    engine = FakeEngine(tokenizer=ByteTokenizer())
    async_engine = AsyncLLMEngine(engine)  # type: ignore[arg-type]
    yield engine, async_engine
    async_engine.shutdown()


def test_generate_streams_cumulative_outputs(fake):
    engine, async_engine = fake
    outputs = asyncio.run(collect(async_engine, "a", "hi", max_tokens=3))
    assert [o.outputs[0].token_ids for o in outputs] == [[120], [120] * 2, [120] * 3]  # b"x" each
    assert [o.outputs[0].text for o in outputs] == ["x", "xx", "xxx"]  # detokenized by the front
    assert [o.finished for o in outputs] == [False, False, True]
    assert engine.caller_threads == {"scaleinfer-engine"}  # only the engine thread touches the engine


def test_failing_request_fails_alone(fake):
    engine, async_engine = fake

    async def main():
        return await asyncio.gather(collect(async_engine, "good", "hi", 5), collect(async_engine, "bad", "bad"),
                                    collect(async_engine, "boom", "boom"), return_exceptions=True)

    good, bad, boom = asyncio.run(main())
    assert good[-1].finished and len(good[-1].outputs[0].token_ids) == 5
    assert isinstance(bad, InvalidRequestError) and "bad" in str(bad)
    assert isinstance(boom, RequestFailedError) and "RuntimeError: tokenizer exploded" in str(boom)
    assert async_engine.is_healthy
    assert asyncio.run(collect(async_engine, "after", "hi"))[-1].finished


def test_closing_the_stream_aborts_the_request(fake):
    engine, async_engine = fake

    async def main():
        stream = async_engine.generate("long", "hi", params(max_tokens=10_000))
        await anext(stream)
        await stream.aclose()

    asyncio.run(main())
    wait_until(lambda: "long" in engine.aborted and not engine.requests)


def test_cancelling_the_consumer_aborts_the_request(fake):
    engine, async_engine = fake

    async def main():
        task = asyncio.ensure_future(collect(async_engine, "long", "hi", max_tokens=10_000))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    wait_until(lambda: "long" in engine.aborted and not engine.requests)


def test_duplicate_request_id_is_refused(fake):
    _, async_engine = fake

    async def main():
        first = async_engine.generate("same", "hi", params(max_tokens=10_000))
        await anext(first)
        with pytest.raises(InvalidRequestError, match="already running"):
            await collect(async_engine, "same", "hi")
        await first.aclose()

    asyncio.run(main())


def test_dead_loop_fails_every_stream_and_later_calls(fake):
    engine, async_engine = fake

    async def main():
        streams = [async_engine.generate(f"r{i}", "hi", params(max_tokens=10_000)) for i in range(3)]
        for stream in streams:
            await anext(stream)
        engine.fail_step = True
        for stream in streams:
            with pytest.raises(EngineDeadError, match="device lost"):
                async for _ in stream:
                    pass
        with pytest.raises(EngineDeadError):
            await collect(async_engine, "late", "hi")

    asyncio.run(main())
    assert not async_engine.is_healthy


def test_stats_snapshot_follows_the_engine(fake):
    """The snapshot starts at zero: it must be seen at one running request, then back at zero."""
    _, async_engine = fake
    assert async_engine.stats().num_running == 0

    async def main():
        stream = async_engine.generate("long", "hi", params(max_tokens=10_000))
        await anext(stream)
        wait_until(lambda: async_engine.stats().num_running == 1)
        await stream.aclose()

    asyncio.run(main())
    wait_until(lambda: async_engine.stats().num_running == 0)


def test_shutdown_fails_pending_streams(fake):
    _, async_engine = fake

    async def main():
        stream = async_engine.generate("long", "hi", params(max_tokens=10_000))
        await anext(stream)
        await asyncio.get_running_loop().run_in_executor(None, async_engine.shutdown)
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in stream:
                pass

    asyncio.run(main())


def test_the_loop_shuts_its_engine_down_when_it_ends(fake):
    engine, async_engine = fake
    async_engine.shutdown()
    assert engine.shut_down and engine.caller_threads <= {THREAD_NAME}
