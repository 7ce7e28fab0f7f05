"""SamplingState over several steps: penalty statistics follow each request's own samples, whatever its row,
survive buffer growth, and start from zero for a request that reuses a finished one's slot."""

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
