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
