"""A grammar's token bitmask on the logits (structured outputs): for each masked row, every token whose bit is
clear becomes -inf, in place. Bit j of word w (int32, xgrammar's layout) allows token 32 * w + j; tokens past
the bitmask's 32 * num_words (a vocabulary padded past the tokenizer's) are never allowed."""

from __future__ import annotations

import torch

from scaleinfer.kernels.checks import (
    check_contiguous,
    check_device,
    check_dtype,
    check_last_dim_contiguous,
    check_shape,
)
from scaleinfer.kernels.dispatch import tl, triton, use_triton

BLOCK = 1024


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, words: torch.Tensor) -> None:
    """logits: [num_seqs, vocab], modified in place; rows: [num_masked] int64, rows of logits (each once);
    words: [num_masked, num_words] int32, the allowed tokens of each of those rows."""
    if use_triton(logits):
        apply_token_bitmask_triton(logits, rows, words)
    else:
        apply_token_bitmask_ref(logits, rows, words)


def apply_token_bitmask_ref(logits: torch.Tensor, rows: torch.Tensor, words: torch.Tensor) -> None:
    vocab, num_masked = logits.shape[1], rows.shape[0]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # [num_masked, num_words, 32]
    num_bits = min(vocab, bits.shape[1] * 32)
    allowed = torch.zeros(num_masked, vocab, dtype=torch.bool, device=logits.device)
    allowed[:, :num_bits] = bits.flatten(1)[:, :num_bits].bool()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def apply_token_bitmask_triton(logits: torch.Tensor, rows: torch.Tensor, words: torch.Tensor) -> None:
    check_shape("logits", logits, [None, None])
    check_shape("rows", rows, [None])
    check_shape("words", words, [rows.shape[0], None])
    check_dtype("rows", rows, [torch.int64])
    check_dtype("words", words, [torch.int32])
    check_last_dim_contiguous("logits", logits)
    check_contiguous("words", words)
    check_device(logits.device, rows=rows, words=words)
    num_masked, vocab = rows.shape[0], logits.shape[1]
    if num_masked == 0:
        return
    _token_bitmask_kernel[(num_masked, triton.cdiv(vocab, BLOCK))](
        logits, rows, words, logits.stride(0), vocab, words.shape[1], BLOCK=BLOCK, num_warps=4)


@triton.jit
def _token_bitmask_kernel(logits_ptr, rows_ptr, words_ptr, logits_stride, vocab, num_words, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(rows_ptr + i)
    word = cols // 32
    in_words = (cols < vocab) & (word < num_words)
    bits = tl.load(words_ptr + i * num_words + word, mask=in_words, other=0)
    allowed = ((bits >> (cols % 32)) & 1) != 0
    tl.store(logits_ptr + row * logits_stride + cols, float("-inf"), mask=(cols < vocab) & ~allowed)
