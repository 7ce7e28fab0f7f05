"""Argument checks for kernel launchers: each failure is a ValueError naming the argument and its value."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


class _Checking(threading.local):
    on = True


_checking = _Checking()


def checking() -> bool:
    """Whether the hot launchers (RMSNorm, rotary+KV write, decode and prefill attention) check their arguments: always,
    except inside trusted_inputs()."""
    return _checking.on


@contextmanager
def trusted_inputs() -> Iterator[None]:
    """The hot launchers skip their checks inside (this thread only). For the model runner's eager steps of a
    kind (decode, prefill, mixed) after its first checked one: it builds every tensor itself, in the layout the
    first step's checks passed, and those checks cost about a fifth of an eager step's host time (cProfile of
    the 8B shape, 32 layers, on an H200 host)."""
    before, _checking.on = _checking.on, False
    try:
        yield
    finally:
        _checking.on = before


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int | None]) -> None:
    """shape: expected sizes, None where any size is fine."""
    ok = t.dim() == len(shape) and all(want is None or want == got for want, got in zip(shape, t.shape))
    if not ok:
        expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {expected}")


def check_dtype(name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}, expected one of {list(dtypes)}")


def check_bias(bias: torch.Tensor | None, n: int, dtype: torch.dtype) -> None:
    """An optional [n] bias in the output's dtype."""
    if bias is not None:
        check_shape("bias", bias, [n])
        check_dtype("bias", bias, (dtype,))


def check_same_dtype(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.dtype != like.dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {like.dtype} like the input")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    """Kernels address rows by stride but read each row's last dimension as one contiguous vector."""
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} has strides {t.stride()}: its last dimension must be contiguous (stride 1)")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} has strides {t.stride()} for shape {list(t.shape)}: it must be contiguous")


def check_device(device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device}")


def is_power_of_two(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def floor_power_of_two(v: int) -> int:
    """The largest power of two <= v (v >= 1)."""
    return 1 << (v.bit_length() - 1)


def check_power_of_two(name: str, value: int) -> None:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} is {value}, expected a power of two")


def check_query_and_caches(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """q: [*, num_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim], q's dtype or
    FP8 (float8_e4m3fn)."""
    check_shape("q", q, [None, None, None])
    num_heads, head_dim = q.shape[1:]
    check_dtype("q", q, FLOAT_DTYPES)
    check_last_dim_contiguous("q", q)
    check_shape("k_cache", k_cache, [None, None, None, head_dim])
    check_shape("v_cache", v_cache, list(k_cache.shape))
    if num_heads % k_cache.shape[2]:
        raise ValueError(f"q has {num_heads} heads, not a multiple of the caches' {k_cache.shape[2]} KV heads")
    for name, t in dict(k_cache=k_cache, v_cache=v_cache).items():
        check_cache_dtype(name, t, q)
        check_contiguous(name, t)


def check_cache_dtype(name: str, cache: torch.Tensor, like: torch.Tensor) -> None:
    """A KV cache holds like's dtype or FP8."""
    if cache.dtype not in (like.dtype, torch.float8_e4m3fn):
        raise ValueError(f"{name} has dtype {cache.dtype}, expected {like.dtype} like the input or "
                         "torch.float8_e4m3fn")


def check_out(out: torch.Tensor | None, like: torch.Tensor) -> None:
    """An optional output buffer: like's shape, dtype and device, last dim contiguous."""
    if out is not None:
        check_shape("out", out, list(like.shape))
        check_same_dtype("out", out, like)
        check_last_dim_contiguous("out", out)
        check_device(like.device, out=out)
