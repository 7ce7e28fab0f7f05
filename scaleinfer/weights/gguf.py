"""Read a GGUF file (llama.cpp's format): ArchConfig from its metadata, weights as HF-named tensors.

Built on the `gguf` package. Three things differ from an HF checkpoint:
- names: `blk.{i}.attn_q.weight` is `model.layers.{i}.self_attn.q_proj.weight`, and so on (NAMES below);
- shapes: GGUF lists dims fastest-first ([in, out]); the numpy arrays the reader returns, and so
  dequantize's output, are already in torch order ([out, in]), which is checked per tensor;
- rope layout: llama.cpp's converter permutes the rows of attn_q / attn_k of Llama models from HF's
  half-split rope layout to its interleaved one; iter_weights undoes that (Qwen2 is stored unpermuted).
Quantized tensors are dequantized (through float32) to the requested dtype, except under quantization="gguf"
(GGUFQuant), where the linears whose tensors are all Q4_0 / Q4_1 / Q4_K stay int4 and those whose tensors are
Q8_0 group-wise int8 (GGUFFile.kept, chosen per linear: weights/gguf_quant.py). A tied model has no
output.weight, and then no lm_head.weight is yielded.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderTensor
from gguf.quants import dequantize
from tqdm import tqdm

from scaleinfer.config import ArchConfig
from scaleinfer.errors import InvalidRequestError, ModelLoadError, UnsupportedArchitectureError
from scaleinfer.weights.gguf_quant import (
    KEPT_SCHEMES,
    LinearPlan,
    Q4Blocks,
    Q8Blocks,
    is_linear_weight,
    keeps_any,
    plan_linears,
    q4_to_torch,
    q8_to_torch,
    read_q4,
    read_q8_0,
)
from scaleinfer.weights.gguf_reader import FastGGUFReader

if TYPE_CHECKING:
    from scaleinfer.layers.quant_int4 import Int4Rows
    from scaleinfer.layers.quant_int8_groups import Int8GroupRows


@dataclass(frozen=True, slots=True)
class GGUFFamily:
    hf_architecture: str
    rope_permuted: bool  # llama.cpp's converter reordered attn_q / attn_k rows for its rope kernel


FAMILIES = {
    "llama": GGUFFamily("LlamaForCausalLM", rope_permuted=True),  # also Mistral and SmolLM2
    "qwen2": GGUFFamily("Qwen2ForCausalLM", rope_permuted=False),
}
TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# quantization="gguf": the embedding (and a tied LM head) as per-row int8 of its dequantized values; on a 135M
# model the head is a third of a decode step's bytes (tests turn it off to compare with the dequantized path)
HEAD_INT8 = True
logger = logging.getLogger(__name__)
EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


@dataclass(slots=True)
class GGUFFile:
    """An opened GGUF file; parsing the metadata is the slow part (seconds for a 49k-token vocab), so it
    is done once and kept here."""

    path: Path
    arch: ArchConfig
    reader: GGUFReader = field(repr=False)
    rope_permuted: bool = False
    kept: frozenset[str] = frozenset()  # GGUF names of the linear weights that come as int4 / int8 rows (LinearPlan)

    @property
    def chat_template(self) -> str | None:
        return _value(self.reader, "tokenizer.chat_template")

    def iter_weights(self, dtype: torch.dtype, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, tensor) for every tensor, dequantized to `dtype`, in file order."""
        with tqdm(self.reader.tensors, desc=f"Loading {self.path.name}", unit="tensor", file=sys.stderr,
                  disable=not progress) as tensors:
            for tensor in tensors:
                yield hf_name(tensor.name, self.path), self._to_torch(tensor, dtype)

    def _to_torch(self, tensor: ReaderTensor, dtype: torch.dtype) -> torch.Tensor | Int4Rows | Int8GroupRows:
        if tensor.name in self.kept:
            return self._kept(tensor)
        array = self._unpermuted(tensor.name, _dequantize(tensor, self.path))  # [out, in] or [n]
        # np.array copies: the reader's arrays are read-only views of the memory-mapped file
        return torch.from_numpy(np.array(array, dtype=np.float32)).to(dtype)

    def _kept(self, tensor: ReaderTensor) -> Int4Rows | Int8GroupRows:
        """A Q4_0 / Q4_1 / Q4_K weight as int4 rows, a Q8_0 one as int8 group rows; q/k rows un-permuted with
        their scales (and zeros) together."""
        q8 = tensor.tensor_type == GGMLQuantizationType.Q8_0
        blocks = read_q8_0(tensor) if q8 else read_q4(tensor)
        expected = tuple(reversed(tensor.shape.tolist()))
        if blocks.levels.shape != expected:
            raise ModelLoadError(f"{self.path}: tensor {tensor.name} has {blocks.levels.shape} levels, "
                                 f"expected {expected}")
        parts = [self._unpermuted(tensor.name, getattr(blocks, f.name)) for f in fields(blocks)]
        return q8_to_torch(Q8Blocks(*parts)) if q8 else q4_to_torch(Q4Blocks(*parts))

    def _unpermuted(self, name: str, array: np.ndarray) -> np.ndarray:
        """array: [rows, ...] of the tensor `name`, rows in HF's rope order."""
        if self.rope_permuted and name.endswith(("attn_q.weight", "attn_q.bias")):
            return unpermute_rope(array, self.arch.num_attention_heads)
        if self.rope_permuted and name.endswith(("attn_k.weight", "attn_k.bias")):
            return unpermute_rope(array, self.arch.num_key_value_heads)
        return array


@dataclass(slots=True, frozen=True)
class GGUFQuant:
    """A GGUF source's say in the linears' scheme (ModelSource.quant): quantization="gguf" keeps the linears
    whose weights are Q4_0 / Q4_1 / Q4_K as int4 in groups of 32, those of Q8_0 as int8 in groups of 32, and
    dequantizes the others, per linear (layers/quant_gguf.py); any other choice dequantizes first. A file
    without any kept linear weight is dequantized whole, which is said once."""

    file: GGUFFile

    def scheme(self, requested: str | None):
        from scaleinfer.layers.linear import UNQUANTIZED, quantization_scheme

        if requested != "gguf":
            return quantization_scheme(requested)
        if not keeps_any(self.file.reader.tensors):
            types = sorted({t.tensor_type.name for t in self.file.reader.tensors if is_linear_weight(t.name)})
            logger.warning("%s: quantization='gguf' keeps Q4_0/Q4_1/Q4_K/Q8_0 linear weights; this file's are %s, so "
                           "every linear weight is dequantized", self.file.path, ", ".join(types))
            return UNQUANTIZED
        from scaleinfer.layers.quant_gguf import GGUFScheme

        return GGUFScheme(self, lm_head_int8=HEAD_INT8)

    def plan(self, stacked_params: dict[str, tuple[str, str | int]], keep_q8_0: bool) -> LinearPlan:
        """Which linears keep their weights, for a model whose fused parameters are `stacked_params` (Q8_0 ones
        only if keep_q8_0); the file then yields those weights as int4 / int8 rows. Said once, with the counts of
        each type."""
        from scaleinfer.models.weights import map_name

        module_of = lambda name: map_name(hf_name(name, self.file.path), stacked_params)[0].removesuffix(".weight")
        kept_schemes = {t: s for t, s in KEPT_SCHEMES.items() if keep_q8_0 or t != GGMLQuantizationType.Q8_0}
        plan = plan_linears(self.file.reader.tensors, module_of, kept_schemes)
        self.file.kept = plan.kept
        level = logging.WARNING if plan.dequantized_types else logging.INFO
        note = "" if keep_q8_0 or "Q8_0" not in plan.dequantized_types else " (Q8_0 is kept on a GPU only)"
        logger.log(level, "%s: %s%s", self.file.path, plan.describe(), note)
        return plan


def open_gguf(path: Path) -> GGUFFile:
    """Parse the file's metadata and tensor index; errors name the file."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    try:
        reader = FastGGUFReader(path)
    except Exception as exc:  # malformed bytes surface as ValueError, IndexError, KeyError, UnicodeError...
        raise ModelLoadError(f"corrupt or truncated GGUF file {path}: {exc!r}") from exc
    _check_extent(reader, path)
    name = _required(reader, "general.architecture", path)
    family = FAMILIES.get(name)
    if family is None:
        raise UnsupportedArchitectureError(
            f"{path}: GGUF architecture {name!r} is not supported (supported: {', '.join(FAMILIES)})")
    return GGUFFile(path, _arch(reader, name, family, path), reader, family.rope_permuted)


def hf_name(gguf_name: str, path: Path) -> str:
    """The HF state-dict name of a GGUF tensor name."""
    if gguf_name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[gguf_name]
    match = BLOCK_TENSOR.fullmatch(gguf_name)
    if match is None or match[2] not in BLOCK_NAMES:
        raise ModelLoadError(f"{path}: GGUF tensor {gguf_name!r} has no HF counterpart here")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{BLOCK_NAMES[part]}.{kind}"


def unpermute_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k permutation. Its converter did
    w.reshape(num_heads, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(w.shape),
    so rows are now ordered (head, head_dim // 2, 2); swapping back restores (head, 2, head_dim // 2)."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _arch(reader: GGUFReader, name: str, family: GGUFFamily, path: Path) -> ArchConfig:
    key = lambda suffix: _required(reader, f"{name}.{suffix}", path)
    num_heads = key("attention.head_count")
    hidden_size = key("embedding_length")
    head_dim = (_value(reader, f"{name}.attention.key_length")
                or _value(reader, f"{name}.rope.dimension_count") or hidden_size // num_heads)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    _reject_rope_freqs(tensors, path)
    try:
        return ArchConfig(
            architecture=family.hf_architecture,
            vocab_size=_vocab_size(reader, tensors, path),
            hidden_size=hidden_size,
            intermediate_size=key("feed_forward_length"),
            num_hidden_layers=key("block_count"),
            num_attention_heads=num_heads,
            num_key_value_heads=_value(reader, f"{name}.attention.head_count_kv") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=key("context_length"),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(_value(reader, f"{name}.rope.freq_base") or 10000.0),
            rope_scaling=_rope_scaling(reader, name),
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            bos_token_id=_value(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(v for k in EOS_KEYS if (v := _value(reader, k)) is not None)),
        )
    except InvalidRequestError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc


def _vocab_size(reader: GGUFReader, tensors: dict[str, ReaderTensor], path: Path) -> int:
    """The embedding's row count: the weights must agree with it, whatever the metadata says (some files
    pad the embedding past len(tokenizer.ggml.tokens))."""
    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise ModelLoadError(f"{path} has no token_embd.weight tensor")
    return int(embedding.shape[-1])  # GGUF dims are [hidden, vocab]


def _rope_scaling(reader: GGUFReader, name: str) -> dict[str, Any] | None:
    rope_type = _value(reader, f"{name}.rope.scaling.type")
    factor = _value(reader, f"{name}.rope.scaling.factor")
    if rope_type is None and _value(reader, f"{name}.rope.scale_linear") is not None:
        rope_type, factor = "linear", _value(reader, f"{name}.rope.scale_linear")
    if rope_type in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": rope_type, "factor": float(factor or 1.0)}
    original = _value(reader, f"{name}.rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _reject_rope_freqs(tensors: dict[str, ReaderTensor], path: Path) -> None:
    # Llama 3.1-style rope scaling is stored as a per-frequency factor tensor, not as the HF parameters;
    # running without it would silently give wrong positions.
    if "rope_freqs.weight" in tensors:
        raise ModelLoadError(f"{path}: GGUF rope_freqs.weight (llama3 rope scaling) is not supported; "
                             "load the HF safetensors checkpoint instead")


def _check_extent(reader: GGUFReader, path: Path) -> None:
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = tensor.data_offset + tensor.n_bytes
        if end > size:
            raise ModelLoadError(f"truncated GGUF file {path}: tensor {tensor.name} ends at byte {end}, "
                                 f"the file has {size}")


def _dequantize(tensor: ReaderTensor, path: Path) -> np.ndarray:
    shape = tuple(reversed(tensor.shape.tolist()))  # GGUF dims are fastest-first
    try:
        array = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise ModelLoadError(f"{path}: tensor {tensor.name} has unsupported type {tensor.tensor_type.name}") from exc
    if array.shape != shape:
        raise ModelLoadError(f"{path}: tensor {tensor.name} dequantized to {array.shape}, expected {shape}")
    return array


def _required(reader: GGUFReader, key: str, path: Path) -> Any:
    value = _value(reader, key)
    if value is None:
        raise ModelLoadError(f"{path} lacks the GGUF metadata key {key!r}")
    return value


def _value(reader: GGUFReader, key: str) -> Any:
    """A scalar or string metadata value; None when absent."""
    entry = reader.fields.get(key)
    if entry is None:
        return None
    if entry.types[0] == GGUFValueType.ARRAY:
        raise ModelLoadError(f"GGUF metadata {key!r} is an array where a single value was expected")
    part = entry.parts[entry.data[0]]
    if entry.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part[0].item()
