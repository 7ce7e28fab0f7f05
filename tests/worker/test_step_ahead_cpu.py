"""A decode step computed before the host has the step before's tokens (worker/step_ahead.py), on the CPU through
the decode-graph harness (each "replay" reruns the captured forward eagerly): the tokens equal the runner's
without graphs, most decode steps are taken from the step launched ahead, a step launched for a batch that
then changes is dropped without a trace, and rows that need the host's tokens to sample never step ahead."""

import torch
from test_decode_graphs_cpu import eager_graphs

from scaleinfer import LLM, SamplingParams


def _prompts(gen: torch.Generator, lengths) -> list[list[int]]:
    return [torch.randint(2, 200, (n,), generator=gen).tolist() for n in lengths]


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def _engines(tiny_models):
    folder = str(tiny_models["llama3.1"][0])
    options = dict(device="cpu", progress=False, dtype="float32", max_model_len=512)
    llm = LLM(folder, max_num_seqs=8, **options)
    eager_graphs(llm, 8)
    return LLM(folder, **options), llm


def test_steps_taken_ahead_give_the_tokens_and_logprobs_of_the_runner_without_graphs(tiny_models):
    eager, llm = _engines(tiny_models)
    prompts = _prompts(torch.Generator().manual_seed(4), (15, 31, 7))
    # greedy with logprobs, and unseeded sampling: the engine's generator draws in the same order
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.9, top_p=0.9, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)]
    expected = eager.generate(prompts, params)
    got = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    for ours, theirs in zip(got[0].outputs[0].logprobs, expected[0].outputs[0].logprobs):
        assert ours.keys() == theirs.keys()
        for token_id, logprob in ours.items():
            assert abs(logprob.logprob - theirs[token_id].logprob) < 1e-4
    counts = llm.engine.runner.step_ahead_counts
    # 23 decode steps; a step is not launched ahead when a row's next slot needs a new block (every 16
    # tokens) or the rows end by length with this step's token
    assert counts["taken"] == counts["launched"] >= 16, counts


def test_a_step_launched_for_a_batch_that_changes_is_dropped(tiny_models):
    """A request joins (then one is aborted) after a step was launched ahead: the next step is another batch, so
    the runner computes it as usual; every request's tokens equal those of a run without graphs."""
    eager, llm = _engines(tiny_models)
    gen = torch.Generator().manual_seed(5)
    first, joining = _prompts(gen, (20,)), _prompts(gen, (9, 12))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine, counts = llm.engine, llm.engine.runner.step_ahead_counts
    engine.add_request("a", first[0], params)
    tokens: dict[str, list[int]] = {}

    def step() -> None:
        for out in engine.step():
            tokens[out.request_id] = out.outputs[0].token_ids

    while counts["launched"] == 0:
        step()
    engine.add_request("b", joining[0], params)
    step()  # a's decode and b's prompt: not the step launched ahead
    assert counts["taken"] == 0
    launched = counts["launched"]
    while counts["launched"] == launched:
        step()
    engine.add_request("c", joining[1], params)
    engine.abort_request(["b"])
    while engine.has_unfinished_requests():
        step()
    assert tokens["a"] == _tokens(eager, first, params)[0]
    assert tokens["c"] == _tokens(eager, joining[1:], params)[0]
    assert counts["launched"] > counts["taken"] > 0


def test_rows_that_sample_from_the_host_tokens_never_step_ahead(tiny_models):
    """A seeded row (its generator's draws), a penalty (the counts of tokens so far), min_tokens (the eos ban)."""
    eager, llm = _engines(tiny_models)
    prompts = _prompts(torch.Generator().manual_seed(6), (10, 18))
    counts = llm.engine.runner.step_ahead_counts
    for special in (dict(temperature=0.8, seed=7, ignore_eos=True), dict(temperature=0, presence_penalty=0.5),
                    dict(temperature=0, min_tokens=20)):
        params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                  SamplingParams(max_tokens=20, **special)]
        assert _tokens(llm, prompts, params) == _tokens(eager, prompts, params)
        assert counts == {"launched": 0, "taken": 0}, special
