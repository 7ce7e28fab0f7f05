"""SamplingState over several steps: penalty statistics follow each request's own samples, whatever its row,
survive buffer growth, and start from zero for a request that reuses a finished one's slot."""

import dataclasses

import pytest
import torch

from scaleinfer.layers.sampler import sample
from scaleinfer.outputs import ScheduledSequence
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.worker.sampling_batch import SamplingState

VOCAB = 40
PENALIZED = SamplingParams(temperature=0, presence_penalty=0.4, frequency_penalty=0.9, repetition_penalty=1.5)


def scheduled(request_id, params, prompt):
    return ScheduledSequence(request_id=request_id, token_ids=[prompt[-1]], start_pos=len(prompt) - 1,
                             block_table=[0], sample=True, sampling_params=params, prompt_token_ids=prompt)


def expected_logits(logits, params, prompt, generated):
    out = logits.clone()
    if not params.has_penalties:
        return out
    for t in set(prompt) | set(generated):
        out[t] = out[t] / params.repetition_penalty if out[t] > 0 else out[t] * params.repetition_penalty
    for t in set(generated):
        out[t] -= params.frequency_penalty * generated.count(t) + params.presence_penalty
    return out


def run_steps(state, requests, num_steps, gen, history):
    """Greedy steps over `requests` ({id: (params, prompt)}), rows reshuffled each step; checks every row."""
    for step in range(num_steps):
        ids = sorted(requests, reverse=step % 2 == 1)
        seqs = [scheduled(rid, *requests[rid]) for rid in ids]
        logits = torch.randn(len(seqs), VOCAB, generator=gen) * 2
        batch = state.batch(seqs, VOCAB)
        out = sample(logits.clone(), batch, None)
        state.record(batch, out.token_ids)
        for row, rid in enumerate(ids):
            params, prompt = requests[rid]
            expected = expected_logits(logits[row], params, prompt, history.setdefault(rid, []))
            assert out.token_ids[row].item() == expected.argmax().item(), (rid, step)
            history[rid].append(out.token_ids[row].item())


def test_penalty_state_follows_each_request_across_steps_growth_and_slot_reuse():
    gen = torch.Generator()
    gen.manual_seed(0)
    state = SamplingState(torch.device("cpu"), seed=0)
    plain = SamplingParams(temperature=0)
    requests = {"a": (PENALIZED, [1, 2, 3]), "b": (plain, [4, 5]), "c": (PENALIZED, [6])}
    history: dict[str, list[int]] = {}
    run_steps(state, requests, 6, gen, history)
    assert len(state.penalty_state.slots) == 2
    # Nine more penalized requests: the buffers grow past 8 rows while a and c keep their counts.
    requests |= {f"n{i}": (PENALIZED, [i, i + 1]) for i in range(9)}
    run_steps(state, requests, 4, gen, history)
    state.drop(["a"])
    requests.pop("a")
    requests["a2"] = (PENALIZED, [7, 8])  # reuses a's slot: must not inherit a's counts
    run_steps(state, requests, 3, gen, history)


def test_rows_without_penalties_build_no_penalty_batch():
    state = SamplingState(torch.device("cpu"), seed=0)
    batch = state.batch([scheduled("x", SamplingParams(temperature=0), [1, 2])], VOCAB)
    assert batch.penalties is None and batch.logit_bias is None
    assert state.penalty_state.output_counts.numel() == 0


def count_uploads(state, monkeypatch):
    calls = []
    upload = state._upload
    counted = lambda values, dtype: calls.append(list(values)) or upload(values, dtype)  # noqa: E731
    monkeypatch.setattr(state, "_upload", counted)
    monkeypatch.setattr(state.penalty_state, "upload", counted)
    return calls


def test_an_unchanged_batch_uploads_nothing_and_reuses_its_tensors(monkeypatch):
    state = SamplingState(torch.device("cpu"), seed=0)
    calls = count_uploads(state, monkeypatch)
    hot = SamplingParams(temperature=0.5, top_p=0.9, top_k=5, seed=3, logit_bias={2: 1.0})
    requests = {"a": (hot, [1, 2]), "b": (PENALIZED, [3])}
    first = state.batch([scheduled(rid, *requests[rid]) for rid in "ab"], VOCAB)
    num_first = len(calls)
    assert num_first > 0 and first.temperatures.tolist() == [0.5, 0.0]
    state.record(first, torch.tensor([4, 5]))
    again = state.batch([scheduled(rid, *requests[rid]) for rid in "ab"], VOCAB)  # new objects, same rows
    assert len(calls) == num_first
    assert again.temperatures is first.temperatures and again.top_ks is first.top_ks
    assert again.generators[0] is first.generators[0] is not None
    assert again.penalties.output_counts[0, 5].item() == 1  # the statistics are this step's
    swapped = state.batch([scheduled(rid, *requests[rid]) for rid in "ba"], VOCAB)
    assert len(calls) > num_first and swapped.temperatures.tolist() == [0.0, 0.5]


def test_a_greedy_batch_is_an_argmax_with_no_sampling_tensors(monkeypatch):
    state = SamplingState(torch.device("cpu"), seed=0)
    calls = count_uploads(state, monkeypatch)
    greedy = SamplingParams(temperature=0, top_p=0.5, top_k=3, seed=9)
    batch = state.batch([scheduled("g", greedy, [1]), scheduled("h", greedy, [2])], VOCAB)
    assert calls == [] and batch.all_greedy
    assert batch.temperatures is None and batch.top_ps is None and batch.top_ks is None
    assert batch.generators == [None, None] and state.generators == {}
    logits = torch.randn(2, VOCAB)
    assert sample(logits.clone(), batch, None).token_ids.tolist() == logits.argmax(-1).tolist()


def test_dropping_a_request_restarts_a_reused_ids_generator():
    state = SamplingState(torch.device("cpu"), seed=0)
    params = SamplingParams(temperature=1.0, seed=11)
    logits = torch.zeros(1, VOCAB)
    draws = [sample(logits.clone(), state.batch([scheduled("r", params, [1])], VOCAB), None).token_ids.item()
             for _ in range(4)]
    state.drop(["r"])
    again = [sample(logits.clone(), state.batch([scheduled("r", params, [1])], VOCAB), None).token_ids.item()
             for _ in range(4)]
    assert again == draws and len(set(draws)) > 1


def test_eos_is_banned_only_before_min_tokens():
    state = SamplingState(torch.device("cpu"), seed=0)
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[6])
    logits = torch.zeros(1, VOCAB)
    logits[0, 5], logits[0, 6] = 10.0, 9.0
    for num_output_tokens, expected in [(0, 0), (1, 0), (2, 5)]:
        seq = scheduled("m", params, [1])
        seq.num_output_tokens, seq.eos_token_ids = num_output_tokens, (5,)
        assert sample(logits.clone(), state.batch([seq], VOCAB), None).token_ids.item() == expected


def broken(**values):
    """Valid params with values set afterwards, past validation (what a bug or a bypass could hand the runner)."""
    params = SamplingParams(temperature=1.0)
    for name, value in values.items():
        setattr(params, name, value)
    return params


HEALTHY = {
    "greedy": SamplingParams(temperature=0, logprobs=2),
    "seeded": SamplingParams(temperature=0.8, top_k=7, seed=5),
    "nucleus": SamplingParams(temperature=1.2, top_p=0.8, seed=6, logit_bias={3: 2.0}),
    "penalized": dataclasses.replace(PENALIZED, temperature=0.7, seed=8),
}


def sample_rows(state, requests, logits):
    seqs = [scheduled(rid, params, [1, 2]) for rid, params in requests.items()]
    batch = state.batch(seqs, VOCAB)
    out = sample(logits[:len(seqs)].clone(), batch, None)
    state.record(batch, out.token_ids)
    return batch, dict(zip(requests, out.token_ids.tolist()))


@pytest.mark.parametrize("bad, fragment", [
    (dict(seed=2**64), "seed=18446744073709551616"), (dict(seed=-2**63 - 1), "seed=-9223372036854775809"),
    (dict(temperature=10**400), "temperature=1000"), (dict(logit_bias={VOCAB + 5: 1.0}), "logit_bias token ids [45]"),
    (dict(stop_token_ids=[VOCAB], min_tokens=3), "stop_token_ids token ids [40]"),
    (dict(logprobs=10**9), "logprobs=1000000000"), (dict(top_k=-3), "top_k=-3"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty=inf"),
])
def test_a_row_that_cannot_be_built_fails_alone(bad, fragment):
    gen = torch.Generator()
    gen.manual_seed(1)
    steps = [torch.randn(len(HEALTHY) + 1, VOCAB, generator=gen) * 3 for _ in range(3)]
    alone_state, state = SamplingState(torch.device("cpu"), seed=0), SamplingState(torch.device("cpu"), seed=0)
    requests = dict(HEALTHY)
    with_bad = {"bad": broken(**bad), **HEALTHY}  # the bad row first: every healthy row moves down one
    for logits in steps:
        _, alone = sample_rows(alone_state, requests, logits[1:])
        batch, together = sample_rows(state, with_bad, logits)
        assert list(batch.failed) == ["bad"] and fragment in batch.failed["bad"], batch.failed
        assert {rid: together[rid] for rid in HEALTHY} == alone
    assert "bad" not in state.generators and "bad" not in state.penalty_state.slots and "bad" not in state.rows


def test_top_k_past_the_vocabulary_keeps_every_token():
    logits = torch.randn(1, VOCAB)
    draws = {}
    for top_k in (0, VOCAB, 2**63, broken(top_k=2**70).top_k):
        state = SamplingState(torch.device("cpu"), seed=0)
        params = SamplingParams(temperature=1.0, seed=3)
        params.top_k = top_k
        batch = state.batch([scheduled("k", params, [1])], VOCAB)
        assert not batch.failed
        draws[top_k] = [sample(logits.clone(), batch, None).token_ids.item() for _ in range(5)]
    assert len({tuple(d) for d in draws.values()}) == 1, draws


def test_min_p_is_batched_only_when_a_sampled_row_uses_it():
    state = SamplingState(torch.device("cpu"), seed=0)
    plain = [scheduled("a", SamplingParams(temperature=1.0), [1]), scheduled("b", SamplingParams(temperature=0), [2])]
    assert state.batch(plain, VOCAB).min_ps is None
    greedy = [scheduled("c", SamplingParams(temperature=0, min_p=0.5), [1])]
    assert state.batch(greedy, VOCAB).min_ps is None
    mixed = [*plain, scheduled("d", SamplingParams(temperature=0.8, min_p=0.25), [3])]
    assert state.batch(mixed, VOCAB).min_ps.tolist() == [0.0, 0.0, 0.25]

