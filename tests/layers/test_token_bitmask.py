"""The grammar bitmask on the logits: the disallowed tokens of the masked rows are -inf, nothing else changes;
through SamplingState the rows are found by request id, and the sampler draws only allowed tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scaleinfer.layers.sampler import NEG_INF, TokenBitmask, apply_token_bitmask, sample
from scaleinfer.outputs import GrammarBitmask, ScheduledSequence
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.worker.sampling_batch import SamplingState


def random_bitmask(num_rows: int, num_words: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-(2**31), 2**31, size=(num_rows, num_words), dtype=np.int64).astype(np.int32)


def reference_allowed(words: np.ndarray, vocab: int) -> np.ndarray:
    """[num_rows, vocab] bool, bit by bit in Python."""
    out = np.zeros((words.shape[0], vocab), dtype=bool)
    for r, row in enumerate(words):
        for t in range(min(vocab, 32 * len(row))):
            out[r, t] = (int(row[t // 32]) >> (t % 32)) & 1
    return out


def test_masked_rows_keep_only_allowed_tokens_and_other_rows_are_untouched():
    vocab, num_words = 100, 3  # 96 bits: the last 4 tokens (a padded vocabulary) are never allowed
    words = random_bitmask(2, num_words, seed=0)
    logits = torch.randn(4, vocab)
    original = logits.clone()
    apply_token_bitmask(logits, TokenBitmask(rows=torch.tensor([3, 1]), words=torch.from_numpy(words)))
    expected = original.clone()
    for row, allowed in zip([3, 1], reference_allowed(words, vocab)):
        expected[row, ~torch.from_numpy(allowed)] = NEG_INF
    assert torch.equal(logits, expected)
    assert torch.equal(logits[[0, 2]], original[[0, 2]])
    assert torch.isinf(logits[[1, 3], 96:]).all()


def test_a_bitmask_wider_than_the_logits_is_cut_to_them():
    words = np.full((1, 4), -1, dtype=np.int32)  # 128 bits, all allowed
    words[0, 0] = 0b101  # tokens 0 and 2 of the first word
    logits = torch.zeros(1, 40)
    apply_token_bitmask(logits, TokenBitmask(rows=torch.tensor([0]), words=torch.from_numpy(words)))
    assert torch.isinf(logits[0, :32]).sum() == 30 and logits[0, 0] == 0 and logits[0, 2] == 0
    assert (logits[0, 32:] == 0).all()


def seq(request_id: str, temperature: float = 0.0) -> ScheduledSequence:
    return ScheduledSequence(request_id, [1], 4, [0], True, SamplingParams(temperature=temperature, seed=1))


def test_sampling_state_maps_the_bitmask_rows_by_request_id_and_sampling_obeys_it():
    vocab, num_words = 64, 2
    words = np.zeros((2, num_words), dtype=np.int32)
    words[0, 1] = 1 << 7  # "c" may only draw token 39
    words[1, 0] = 1 << 3  # "a" may only draw token 3
    bitmask = GrammarBitmask(request_ids=["c", "a"], num_words=num_words, data=words.astype("<i4").tobytes())
    seqs = [seq("a"), seq("b"), seq("c", temperature=1.0)]
    state = SamplingState(torch.device("cpu"), seed=0)
    batch = state.batch(seqs, vocab, bitmask)
    assert batch.allowed.rows.tolist() == [2, 0]
    logits = torch.randn(3, vocab)
    free = logits[1].argmax().item()
    tokens = sample(logits, batch, state.default_generator).token_ids.tolist()
    assert tokens == [3, free, 39]
    assert state.batch(seqs, vocab).allowed is None  # a step without a bitmask masks nothing


@pytest.mark.gpu
def test_on_the_gpu_the_bitmask_masks_as_on_the_cpu():
    vocab, num_words = 49_155, 1537  # a vocabulary padded past the bitmask's bits
    words = torch.from_numpy(random_bitmask(5, num_words, seed=1))
    logits = torch.randn(8, vocab)
    rows = torch.tensor([7, 0, 3, 4, 5])
    on_cpu = logits.clone()
    apply_token_bitmask(on_cpu, TokenBitmask(rows=rows, words=words))
    on_gpu = logits.cuda()
    apply_token_bitmask(on_gpu, TokenBitmask(rows=rows.cuda(), words=words.cuda()))
    assert torch.equal(on_gpu.cpu(), on_cpu)
