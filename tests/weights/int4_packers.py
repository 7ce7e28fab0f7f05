"""Reference packers for the AWQ / GPTQ checkpoint tests, and the tiny checkpoints they write.

Written from the tools' own pack loops, vectorized (the words' nibbles are disjoint, so their OR is a sum):
AutoAWQ's awq/modules/linear/gemm.py (WQLinear_GEMM.from_linear: `qweight[:, col] |= intweight[:, col * 8 +
order_map[i]] << (i * 4)` with order_map [0, 2, 4, 6, 1, 3, 5, 7], qzeros alike) and AutoGPTQ's
auto_gptq/nn_modules/qlinear/qlinear_cuda.py (QuantLinear.pack: `qweight[row] |= intweight[j] << (4 * (j - i))`
over eight input features a row; `zeros -= 1` then `qzeros[:, col] |= zeros[:, j] << (4 * (j - i))`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
SHIFTS = 4 * torch.arange(8, dtype=torch.int64)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Linears that read the same input share GPTQ's act-order (its Hessian is the input's): q/k/v, gate/up.
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


@dataclass(slots=True)
class Quantized:
    """A weight [N, K] in 4-bit groups: w ~ (q - zeros[:, g_idx]) * scales[:, g_idx]."""

    q: torch.Tensor  # [N, K] int64 in 0..15
    zeros: torch.Tensor  # [N, G] int64 in 0..15
    scales: torch.Tensor  # [N, G] float16
    g_idx: torch.Tensor  # [K] int64

    def dequantized(self) -> torch.Tensor:
        """[N, K] float32, as the tools' own torch paths compute it."""
        return (self.q - self.zeros[:, self.g_idx]).float() * self.scales[:, self.g_idx].float()


def quantize(w: torch.Tensor, g_idx: torch.Tensor, num_groups: int, sym: bool) -> Quantized:
    """Min-max 4-bit groups (AWQ's zero point, or GPTQ's symmetric grid: zero 8) over the features g_idx names."""
    n, k = w.shape
    index = g_idx.expand(n, k)
    hi = torch.full((n, num_groups), -torch.inf).scatter_reduce(1, index, w, "amax")
    lo = torch.full((n, num_groups), torch.inf).scatter_reduce(1, index, w, "amin")
    if sym:
        scales = (2 * torch.maximum(hi.abs(), lo.abs()) / 15).clamp_min(1e-5).half()
        zeros = torch.full((n, num_groups), 8, dtype=torch.int64)
    else:
        scales = ((hi - lo) / 15).clamp_min(1e-5).half()
        zeros = (-torch.round(lo / scales.float())).clamp(0, 15).to(torch.int64)
    q = torch.round(w / scales.float()[:, g_idx]) + zeros[:, g_idx]
    return Quantized(q.clamp(0, 15).to(torch.int64), zeros, scales, g_idx)


def as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) -> int32 with the same bits (numpy's uint32 .astype(np.int32))."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_columns(values: torch.Tensor, order: list[int] | None) -> torch.Tensor:
    """[R, C] -> [R, C / 8] int32, nibble i of word c holding column 8c + order[i] (plain order: None)."""
    r, c = values.shape
    grouped = values.to(torch.int64).reshape(r, c // 8, 8)
    if order is not None:
        grouped = grouped[..., order]
    return as_int32((grouped << SHIFTS).sum(-1))


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """[K, N] -> [K / 8, N] int32, nibble j of word r holding row 8r + j (GPTQ's qweight)."""
    k, n = values.shape
    return as_int32((values.to(torch.int64).reshape(k // 8, 8, n) << SHIFTS[None, :, None]).sum(1))


def pack_awq(qz: Quantized, order: list[int] | None = AWQ_ORDER) -> dict[str, torch.Tensor]:
    """AutoAWQ's GEMM tensors; order=None packs without the interleave (a wrong layout, for the tests)."""
    return {"qweight": pack_columns(qz.q.T, order), "qzeros": pack_columns(qz.zeros.T, order),
            "scales": qz.scales.T.contiguous()}


def pack_gptq(qz: Quantized, v1: bool) -> dict[str, torch.Tensor]:
    """GPTQ's tensors; v1 stores zero - 1 (a zero of 0 would be -1, whose uint32 corrupts the word: not made)."""
    zeros = qz.zeros - 1 if v1 else qz.zeros
    assert zeros.min() >= 0, "GPTQ v1 cannot store a zero point of 0"
    return {"qweight": pack_rows(qz.q.T), "qzeros": pack_columns(zeros.T, None), "scales": qz.scales.T.contiguous(),
            "g_idx": qz.g_idx.to(torch.int32)}


@dataclass(frozen=True, slots=True)
class Layout:
    """One checkpoint layout of the tests."""

    method: str  # awq | gptq
    group_size: int
    act_order: bool = False  # gptq desc_act
    checkpoint_format: str = "gptq"  # gptq: v1 (symmetric, zero - 1 stored) or gptq_v2 (asymmetric, as is)
    awq_order: tuple[int, ...] | None = tuple(AWQ_ORDER)  # None: the interleave ignored

    @property
    def symmetric(self) -> bool:
        return self.method == "gptq" and self.checkpoint_format == "gptq"

    @property
    def name(self) -> str:
        order = "" if self.awq_order else "-no-interleave"
        kind = f"{self.checkpoint_format}{'-act-order' if self.act_order else ''}" if self.method == "gptq" else ""
        return f"{self.method}{kind}-g{self.group_size}{order}"

    def quantization_config(self) -> dict:
        if self.method == "awq":
            return {"quant_method": "awq", "bits": 4, "group_size": self.group_size, "zero_point": True,
                    "version": "gemm", "modules_to_not_convert": None}
        return {"quant_method": "gptq", "bits": 4, "group_size": self.group_size, "desc_act": self.act_order,
                "sym": self.symmetric, "checkpoint_format": self.checkpoint_format,
                "static_groups": False, "true_sequential": True, "damp_percent": 0.01}

    def pack(self, qz: Quantized) -> dict[str, torch.Tensor]:
        if self.method == "awq":
            return pack_awq(qz, list(self.awq_order) if self.awq_order else None)
        return pack_gptq(qz, v1=self.checkpoint_format == "gptq")


def g_idx_for(k: int, group: int, act_order: bool, generator: torch.Generator) -> torch.Tensor:
    """GPTQ's: feature j is in group invperm[j] // group, perm the order it quantized in (under act-order the
    Hessian's; here random)."""
    position = torch.randperm(k, generator=generator) if act_order else torch.arange(k)
    return position // group


def write_checkpoints(src: Path, root: Path, layout: Layout, seed: int = 0) -> tuple[Path, Path]:
    """src's float checkpoint with each decoder linear quantized and packed in `layout`, and the same model with
    the dequantized weights in float32: (quantized folder, dequantized folder)."""
    generator = torch.Generator().manual_seed(seed)
    packed, dequantized, orders = {}, {}, {}
    for name, tensor in load_file(src / "model.safetensors").items():
        linear = name.split(".")[-2]
        if linear not in LINEARS or not name.endswith(".weight"):
            packed[name] = dequantized[name] = tensor
            continue
        k = tensor.shape[1]
        key = name.replace(linear, SHARED_INPUT.get(linear, linear))
        g_idx = orders.setdefault(key, g_idx_for(k, layout.group_size, layout.act_order, generator))
        qz = quantize(tensor.float(), g_idx, k // layout.group_size, sym=layout.symmetric)
        packed |= {name.removesuffix("weight") + part: t for part, t in layout.pack(qz).items()}
        dequantized[name] = qz.dequantized()
    folders = root / layout.name, root / f"{layout.name}-dequantized"
    for folder, tensors, config in zip(folders, (packed, dequantized), (layout.quantization_config(), None)):
        write_folder(src, folder, tensors, config)
    return folders


def write_folder(src: Path, folder: Path, tensors: dict[str, torch.Tensor], quantization_config: dict | None) -> None:
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
