"""Prompt logprobs from the runner against HF transformers' log_softmax on the same tiny Llama weights: in
chunks through the paged cache, mixed in one step with a decode and a sequence that does not ask."""

import torch

from scaleinfer.config import CacheConfig, ModelConfig
from scaleinfer.outputs import ScheduledSequence, SchedulerOutput
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.weights.source import resolve_model
from scaleinfer.worker import prompt_logprobs
from scaleinfer.worker.model_runner import ModelRunner


def _hf_logprobs(hf_model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([token_ids])).logits[0].float(), dim=-1)  # [P, vocab]


def test_runner_prompt_logprobs_equal_hf_log_softmax(tiny_models, monkeypatch):
    monkeypatch.setattr(prompt_logprobs, "ROWS_PER_SLICE", 7)  # several LM-head slices per step
    folder, hf_model = tiny_models["llama3.1"]
    source = resolve_model(str(folder))
    runner = ModelRunner(ModelConfig(str(folder), device="cpu", dtype="float32"), CacheConfig(num_blocks=32),
                         source, progress=False)
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, source.arch.vocab_size, (37,), generator=gen).tolist()
    other = torch.randint(0, source.arch.vocab_size, (9,), generator=gen).tolist()
    asks, plain = SamplingParams(temperature=0, prompt_logprobs=3), SamplingParams(temperature=0)
    table, other_table = list(range(0, 8)), list(range(8, 12))

    def step(*seqs: ScheduledSequence):
        return runner.execute(SchedulerOutput(list(seqs))).prompt_logprobs

    first = step(ScheduledSequence("a", prompt[:20], 0, table, False, asks, prompt_token_ids=prompt),
                 ScheduledSequence("b", other, 0, other_table, True, plain, prompt_token_ids=other))
    second = step(ScheduledSequence("b", [5], 9, other_table, True, plain, 1, prompt_token_ids=other),
                  ScheduledSequence("a", prompt[20:], 20, table, True, asks, prompt_token_ids=prompt))
    assert set(first) == set(second) == {"a"}
    assert (first["a"].first_pos, len(first["a"].logprobs)) == (1, 20)
    assert (second["a"].first_pos, len(second["a"].logprobs)) == (21, 16)  # the last position is sampled

    expected = _hf_logprobs(hf_model, prompt)[:-1]  # [P - 1, vocab]: row p scores prompt[p + 1]
    targets = torch.tensor(prompt[1:])
    got = torch.tensor(first["a"].logprobs + second["a"].logprobs)
    torch.testing.assert_close(got, expected.gather(1, targets[:, None])[:, 0], atol=1e-4, rtol=1e-4)
    ranks = (expected > expected.gather(1, targets[:, None])).sum(-1) + 1
    assert first["a"].ranks + second["a"].ranks == ranks.tolist()
    top = expected.topk(3, dim=-1)
    assert first["a"].top_token_ids + second["a"].top_token_ids == top.indices.tolist()
    torch.testing.assert_close(torch.tensor(first["a"].top_logprobs + second["a"].top_logprobs), top.values,
                               atol=1e-4, rtol=1e-4)


def test_a_one_token_prompt_scores_nothing():
    from scaleinfer.worker.prompt_logprobs import prompt_logprob_rows

    asks = SamplingParams(prompt_logprobs=0)
    rows, targets, chunks = prompt_logprob_rows(SchedulerOutput([
        ScheduledSequence("one", [7], 0, [0], True, asks, prompt_token_ids=[7]),
        ScheduledSequence("two", [1, 2, 3], 0, [1], True, asks, prompt_token_ids=[1, 2, 3])]))
    # "one" is a decode-shaped row first; "two" starts after it, at row 1
    assert (rows, targets, [(c.request_id, c.first_pos, c.num_rows) for c in chunks]) == ([1, 2], [2, 3],
                                                                                          [("two", 1, 2)])
