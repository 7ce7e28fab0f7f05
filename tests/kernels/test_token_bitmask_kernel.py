"""The token-bitmask kernel against its torch reference, on fresh random bitmasks: vocabularies past the
bitmask's bits and short of them, float32 and bfloat16 logits, rows in any order; bad inputs named."""

import pytest
import torch

from scaleinfer.kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_ref, apply_token_bitmask_triton


def random_words(num_rows: int, num_words: int, device) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31, (num_rows, num_words), dtype=torch.int64).to(torch.int32).to(device)


@pytest.mark.parametrize(("num_seqs", "vocab", "num_words", "dtype"), [
    (4, 100, 3, torch.float32),  # 96 bits: the last 4 tokens never allowed
    (3, 2100, 70, torch.float32),  # more bits than tokens, over several blocks
    (5, 1030, 33, torch.bfloat16),
])
def test_the_kernel_matches_the_reference(num_seqs, vocab, num_words, dtype, device, triton_path):
    torch.manual_seed(vocab)
    logits = torch.randn(num_seqs, vocab, device=device).to(dtype)
    rows = torch.randperm(num_seqs, device=device)[: num_seqs - 1]
    words = random_words(rows.shape[0], num_words, device)
    expected = logits.clone()
    apply_token_bitmask_ref(expected, rows, words)
    apply_token_bitmask(logits, rows, words)
    assert torch.equal(logits, expected)


def test_bad_inputs_are_named(device, triton_path):
    logits = torch.zeros(2, 64, device=device)
    rows = torch.tensor([0], device=device)
    with pytest.raises(ValueError, match="words"):
        apply_token_bitmask_triton(logits, rows, torch.zeros(1, 2, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="rows"):
        apply_token_bitmask_triton(logits, rows.int(), torch.zeros(1, 2, dtype=torch.int32, device=device))
