"""A request whose sampling state cannot be built fails alone: the 8 requests sampled in the same step finish
with the output they have without it, the bad one finishes with its error, and no KV block is left held."""

import pytest

from scaleinfer import LLM, SamplingParams

PROMPTS = [[5 + 11 * i + j for j in range(6 + i)] for i in range(9)]
HEALTHY = [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0.8, top_k=20, seed=1, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=1.0, top_p=0.9, seed=2, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.7, top_k=2**63, seed=3, max_tokens=12, ignore_eos=True),  # past the vocabulary
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, frequency_penalty=1.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.9, seed=4, max_tokens=12, logit_bias={40: 3.0}, ignore_eos=True),
    SamplingParams(temperature=1.1, seed=5, max_tokens=12, min_tokens=4),
]


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(model=str(tiny_models["llama2"][0]), device="cpu", progress=False, kv_cache_memory=16 << 20)


@pytest.fixture(scope="module")
def alone(llm):
    """What the 8 healthy requests give without the bad one."""
    outputs = run(llm.engine, {f"alone{i}": (PROMPTS[i], p) for i, p in enumerate(HEALTHY)})
    assert all(out.error is None for out in outputs.values())
    return [outputs[f"alone{i}"] for i in range(len(HEALTHY))]


def run(engine, requests=None):
    """Adds requests ({request id: (prompt, params)}) and steps until none is left -> {request id: its finished
    RequestOutput}."""
    for request_id, (prompt, params) in (requests or {}).items():
        engine.add_request(request_id, prompt, params)
    finished = {}
    while engine.has_unfinished_requests():
        finished |= {out.request_id: out for out in engine.step() if out.finished}
    return finished


def record_steps(monkeypatch, runner):
    steps = []
    launch, complete = runner.launch, runner.complete  # the engine's two halves of each step

    def recording_launch(scheduler_output):
        return scheduler_output, launch(scheduler_output)

    def recording_complete(launched):
        scheduler_output, inner = launched
        result = complete(inner)
        steps.append(([s.request_id for s in scheduler_output.scheduled if s.sample], result))
        return result

    monkeypatch.setattr(runner, "launch", recording_launch)
    monkeypatch.setattr(runner, "complete", recording_complete)
    return steps


@pytest.mark.parametrize("bad_values", [dict(seed=2**64), dict(seed=-2**63 - 1), dict(logit_bias={10**6: 1.0})])
def test_a_request_whose_sampling_state_fails_fails_alone(llm, alone, monkeypatch, bad_values):
    engine = llm.engine
    bad = SamplingParams(temperature=1.0, max_tokens=12, seed=9)
    requests = {f"ok{i}": (PROMPTS[i], p) for i, p in enumerate(HEALTHY)} | {"bad": (PROMPTS[8], bad)}
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    for name, value in bad_values.items():  # past validation: what a bug or a bypass could hand the runner
        setattr(bad, name, value)
    steps = record_steps(monkeypatch, engine.runner)
    finished = run(engine)

    first_ids, first = steps[0]
    assert sorted(first_ids) == sorted(requests), "the bad request must share its step with the 8"
    assert list(first.failed) == ["bad"] and "bad" not in first.sampled
    assert "sampling state" in finished["bad"].error and finished["bad"].outputs[0].token_ids == []
    for i in range(len(HEALTHY)):
        ok, reference = finished[f"ok{i}"], alone[i]
        assert ok.error is None, ok.error
        assert ok.outputs[0].token_ids == reference.outputs[0].token_ids, i
        assert ok.outputs[0].finish_reason == reference.outputs[0].finish_reason
    block_manager = engine.block_manager
    assert block_manager.num_free_blocks == block_manager.num_blocks
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    engine.step()  # hands the runner the last finished ids
    assert not engine.runner.sampling.rows and not engine.runner.sampling.generators
