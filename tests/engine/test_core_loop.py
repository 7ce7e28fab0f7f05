"""The serving loop's timing contract, without timers: a request that arrives while others decode runs in the
very next step beside them (the core loop takes commands before every step; the scheduler admits behind the
decodes), the outputs of the step before it being sent while that step runs; and the front puts a step's
outputs in all its streams at once, before the next step's."""

from __future__ import annotations

import asyncio

import pytest

from scaleinfer.config import EngineConfig
from scaleinfer.engine.async_engine import AsyncLLMEngine
from scaleinfer.engine.core import EngineCore
from scaleinfer.engine.core_loop import CoreLoop
from scaleinfer.engine.core_types import (
    CoreCommand,
    CoreMessage,
    CoreReady,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
    Shutdown,
)
from scaleinfer.sampling_params import RequestOutputKind, SamplingParams


@pytest.fixture(scope="module")
def core(tiny_models) -> EngineCore:
    config = EngineConfig.from_kwargs(model=str(tiny_models["llama3.1"][0]), device="cpu", max_model_len=128,
                                      num_blocks=64, enable_prefix_caching=False)
    return EngineCore(config, progress=False)


def _request(request_id: str, prompt_len: int, max_tokens: int) -> EngineCoreRequest:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return EngineCoreRequest(request_id, [3 + i for i in range(prompt_len)], params, 0.0)


class Script:
    """The loop's transport: A (and C) at the first recv; B once A has 2 tokens; Shutdown when all finished."""

    def __init__(self) -> None:
        self.sent: list[EngineCoreOutputs] = []
        self.b_arrived_at: int | None = None  # len(sent) when B was handed to the loop

    def tokens(self, request_id: str) -> list[int]:
        return [t for m in self.sent for o in m.outputs if o.request_id == request_id for t in o.new_token_ids]

    def finished(self) -> set[str]:
        return {o.request_id for m in self.sent for o in m.outputs if o.finished}

    def recv(self, timeout_s: float | None) -> list[CoreCommand]:
        if not self.sent and self.b_arrived_at is None and not hasattr(self, "started"):
            self.started = True
            return [_request("A", 9, 12), _request("C", 5, 12)]
        if self.b_arrived_at is None and len(self.tokens("A")) >= 2:
            self.b_arrived_at = len(self.sent)
            return [_request("B", 7, 3)]
        if self.finished() >= {"A", "B", "C"}:
            return [Shutdown()]
        return []

    def send(self, message: CoreMessage) -> None:
        assert isinstance(message, EngineCoreOutputs), message
        self.sent.append(message)


def test_a_request_arriving_while_others_decode_runs_in_the_next_step(core):
    script = Script()
    core.shutdown = lambda: None  # the module's core serves the next test too
    CoreLoop(core, script.recv, script.send).run()
    assert script.b_arrived_at is not None
    # The first message after B reached the loop is the step before's, sent once B's step was launched.
    assert {o.request_id for o in script.sent[script.b_arrived_at].outputs} == {"A", "C"}
    next_step = script.sent[script.b_arrived_at + 1]
    assert next_step.step_time_s is not None
    by_request = {o.request_id: o for o in next_step.outputs}
    # B's whole prompt ran in that step (it samples its first token there), beside the decodes of A and C.
    assert set(by_request) == {"A", "B", "C"}
    assert [len(o.new_token_ids) for o in by_request.values()] == [1, 1, 1]
    assert by_request["B"].queue_time_s is not None
    assert len(script.tokens("A")) == len(script.tokens("C")) == 12 and len(script.tokens("B")) == 3


def test_a_steps_outputs_are_sent_while_the_next_step_runs(core, monkeypatch):
    """Each message of step outputs leaves after the next step was launched and before it completes; the last
    one, with nothing left to run, right after its step."""
    events: list[str] = []
    launch, complete = core.launch, core.complete
    monkeypatch.setattr(core, "launch", lambda: events.append("launch") or launch())
    monkeypatch.setattr(core, "complete", lambda launched: events.append("complete") or complete(launched))
    monkeypatch.setattr(core, "shutdown", lambda: None)  # the module's core serves the next test too
    script = Script()

    def send(message: CoreMessage) -> None:
        script.send(message)
        events.append("send")

    CoreLoop(core, script.recv, send).run()
    assert len(script.tokens("A")) == 12 and script.finished() == {"A", "B", "C"}
    steps = events.count("launch")
    assert steps == events.count("complete") == events.count("send") >= 12  # A alone takes 12
    assert events[:2] == ["launch", "complete"]  # nothing to send before the first step
    assert events[2:-1] == ["launch", "send", "complete"] * (steps - 1)
    assert events[-1] == "send"  # the last step's outputs, nothing in flight


class ScriptedClient:
    """CoreProcess's interface with nothing behind it: the test plays the core through engine._on_message."""

    on_message = None

    def wait_ready(self) -> CoreReady:
        return CoreReady(max_model_len=256, num_blocks=64, block_size=16, vocab_size=1000, eos_token_ids=[])

    def send(self, command: CoreCommand) -> None:
        pass

    def is_alive(self) -> bool:
        return True

    def shutdown(self, timeout_s: float = 30.0) -> None:
        pass


def test_front_puts_a_steps_outputs_in_every_stream_at_once():
    engine = AsyncLLMEngine(model_name="scripted", tokenizer=None, client=ScriptedClient())
    ready_at_delivery: list[list[int]] = []

    async def run() -> list[list[int]]:
        params = SamplingParams(max_tokens=2, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        streams = [await engine.add_request(f"r{i}", [5, 6, 7], params) for i in range(8)]
        # What each stream holds when the step's delivery is done, before any reader ran.
        engine.delivery_sink = lambda lag: ready_at_delivery.append(
            [len(s._latest.outputs[0].token_ids) if s._latest else 0 for s in streams])
        for step in range(2):  # from the reader's side of the front, one message per step
            outputs = [EngineCoreOutput(f"r{i}", 0, [10 + step], finish_reason="length" if step else None)
                       for i in range(8)]
            # The delivery callback is queued on this loop before to_thread's result: it has run when this returns.
            await asyncio.to_thread(engine._on_message, EngineCoreOutputs(outputs, EngineStats(), 0.01))
        return [await _read_tokens(stream) for stream in streams]

    tokens = asyncio.run(run())
    assert ready_at_delivery == [[1] * 8, [2] * 8]  # the second step's tokens joined the first's, unread
    assert tokens == [[10, 11]] * 8


async def _read_tokens(stream) -> list[int]:
    return [t async for output in stream for t in output.outputs[0].token_ids]
