"""LLMEngine.step with a core that launches: the next step is queued before the finished one's outputs are
processed, a request added or aborted between steps joins or leaves cleanly, and the tokens equal one step at a
time (the core's own step)."""

import torch

from scaleinfer import LLM, SamplingParams


def _llm(tiny_models) -> LLM:
    return LLM(str(tiny_models["llama3.1"][0]), device="cpu", progress=False, dtype="float32", max_model_len=128)


def _prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(2, 200, (8 + 5 * i,), generator=gen).tolist() for i in range(n)]


def test_the_next_step_is_launched_before_the_outputs_are_processed(tiny_models, monkeypatch):
    engine = _llm(tiny_models).engine
    assert engine.core.launches
    calls = []
    for owner, name in ((engine.core, "launch"), (engine.core, "complete"), (engine.output_processor, "process")):
        method = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _m=method, _n=name: calls.append(_n) or _m(*a))
    engine.add_request("a", _prompts(1)[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    # three steps: each completes the launched one, launches the next while any request is unfinished, processes
    assert calls == ["launch", "complete", "launch", "process", "complete", "launch", "process", "complete",
                     "process"]
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks


def test_tokens_equal_the_core_stepping_alone_with_joins_and_aborts(tiny_models):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = _prompts(4)

    def run(engine, step) -> dict[str, list[int]]:
        tokens: dict[str, list[int]] = {}
        engine.add_request("r0", prompts[0], params)
        engine.add_request("r1", prompts[1], params)
        for i in range(40):
            if i == 2:
                engine.add_request("r2", prompts[2], params)
            if i == 3:
                engine.abort_request(["r1"])
            if i == 4:
                engine.add_request("r3", prompts[3], params)
            for out in step():
                tokens[out.request_id] = out.outputs[0].token_ids
            if not engine.has_unfinished_requests():
                break
        return tokens

    overlapped = _llm(tiny_models).engine
    got = run(overlapped, overlapped.step)
    alone = _llm(tiny_models).engine

    def one_at_a_time():
        processed = alone.output_processor.process(alone.core.step())
        alone.core.abort(processed.to_abort, processed.to_stop)
        return processed.request_outputs

    expected = run(alone, one_at_a_time)
    for request_id in ("r0", "r2", "r3"):
        assert len(got[request_id]) == 10 and got[request_id] == expected[request_id], request_id
    assert len(got["r1"]) < 10
    manager = overlapped.core.block_manager
    assert not overlapped.has_unfinished_requests() and manager.num_free_blocks == manager.num_blocks
