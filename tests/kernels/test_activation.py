"""SiLU-and-mul kernel against its torch reference."""

import pytest
import torch
from kernel_helpers import tolerance

from scaleinfer.kernels.activation import silu_and_mul, silu_and_mul_ref, silu_and_mul_triton


@pytest.mark.parametrize("num_tokens,d,dtype", [(3, 48, torch.float32), (2, 1100, torch.float32),
                                                (4, 64, torch.bfloat16), (1, 200, torch.bfloat16)])
def test_silu_and_mul_matches_reference(num_tokens, d, dtype, device, triton_path):
    torch.manual_seed(num_tokens * 1000 + d)
    x = 3 * torch.randn(num_tokens, 2 * d, dtype=dtype, device=device)
    got = silu_and_mul(x)
    assert got.shape == (num_tokens, d) and got.dtype == dtype
    torch.testing.assert_close(got, silu_and_mul_ref(x), **tolerance(dtype))


def test_silu_and_mul_rejects_odd_width(device, triton_path):
    with pytest.raises(ValueError, match="must be even"):
        silu_and_mul_triton(torch.randn(2, 7, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 64, 2048])
def test_silu_and_mul_gpu(num_tokens, cuda):
    torch.manual_seed(num_tokens)
    x = torch.randn(num_tokens, 2 * 14336, dtype=torch.bfloat16, device=cuda)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **tolerance(torch.bfloat16))
