"""BERT-style encoders (BERT, RoBERTa, MiniLM): embeddings, post-LN encoder layers, no KV cache.

Inputs are packed: the batch's tokens are one [num_tokens] row with no padding; `cu_seqlens` says where each
sequence starts, and attention (one kernels/encoder_attention.py launch per layer) is non-causal within a
sequence only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.errors import ModelLoadError
from scaleinfer.kernels.encoder_attention import encoder_attention
from scaleinfer.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from scaleinfer.models.weights import load_into

# RoBERTa counts positions from pad_token_id + 1; BERT from 0.
OFFSET_POSITION_TYPES = ("roberta", "xlm-roberta", "camembert")
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
# Checkpoints of *ForMaskedLM nest the encoder under a prefix and carry heads we do not use.
PREFIXES = ("bert.", "roberta.")
SKIPPED = ("embeddings.position_ids", "pooler.", "cls.", "lm_head.")
STACKED_PARAMS = {"attention.self.query.": ("attention.self.qkv.", "q"),
                  "attention.self.key.": ("attention.self.qkv.", "k"),
                  "attention.self.value.": ("attention.self.qkv.", "v")}


@dataclass(slots=True)
class BertConfig:
    """The fields of an HF BERT/RoBERTa config.json an encoder needs."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ModelLoadError(f"hidden_act {self.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ModelLoadError(f"hidden_size={self.hidden_size} is not a multiple of "
                                 f"num_attention_heads={self.num_attention_heads}")

    @classmethod
    def from_dict(cls, config: dict[str, Any], path: Path | str = "config.json") -> BertConfig:
        names = [name for name in cls.__dataclass_fields__ if name in config and config[name] is not None]
        try:
            return cls(**{name: config[name] for name in names})
        except TypeError as exc:
            raise ModelLoadError(f"{path} is not a BERT-style config: {exc}") from exc

    @classmethod
    def from_folder(cls, folder: Path) -> BertConfig:
        path = folder / "config.json"
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), path)
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot read {path}: {exc}") from exc

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_offset(self) -> int:
        return self.pad_token_id + 1 if self.model_type in OFFSET_POSITION_TYPES else 0

    @property
    def max_seq_len(self) -> int:
        return self.max_position_embeddings - self.position_offset


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.position_offset = config.position_offset

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # token type 0 everywhere: one segment per sentence
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions + self.position_offset)
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])  # [num_tokens, hidden]


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        heads = config.num_attention_heads
        self.qkv = QKVParallelLinear(config.hidden_size, config.head_dim, heads, heads, bias=True)
        self.head_dim = config.head_dim
        self.q_size = self.qkv.num_heads * config.head_dim
        self.scale = config.head_dim**-0.5

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seq_len: int) -> torch.Tensor:
        # views into the fused projection: [num_tokens, num_heads, head_dim], rows strided by 3 * q_size
        q, k, v = (t.view(x.shape[0], -1, self.head_dim) for t in self.qkv(x).split(self.q_size, dim=-1))
        out = encoder_attention(q, k, v, cu_seqlens, max_seq_len, self.scale)  # one launch for the batch
        return out.view(x.shape[0], -1)  # [num_tokens, num_heads * head_dim]


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertOutput(config.hidden_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seq_len: int) -> torch.Tensor:
        return self.output(self.self(x, cu_seqlens, max_seq_len), x)


class BertOutput(nn.Module):
    """Projection, residual, then LayerNorm (post-LN)."""

    def __init__(self, input_size: int, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.dense = RowParallelLinear(input_size, hidden_size, bias=True)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=True)
        self.act_fn = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_fn(self.dense(x))  # [num_tokens, intermediate_size]


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config.intermediate_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seq_len: int) -> torch.Tensor:
        x = self.attention(x, cu_seqlens, max_seq_len)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seq_len: int) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, cu_seqlens, max_seq_len)
        return x


class BertModel(nn.Module):
    """Module names follow HF's BertModel, so checkpoint names map one to one (q/k/v into one qkv)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seq_len: int) -> torch.Tensor:
        """input_ids, positions: [num_tokens], sequences packed back to back; positions count from 0 in each
        sequence; cu_seqlens: [num_seqs + 1], sequence i being tokens cu_seqlens[i]:cu_seqlens[i + 1];
        max_seq_len: the longest, a host int. Returns the last hidden states, [num_tokens, hidden]."""
        return self.encoder(self.embeddings(input_ids, positions), cu_seqlens, max_seq_len)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_into(self, _encoder_weights(weights), STACKED_PARAMS)


def _encoder_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
    """Checkpoint names without the *ForMaskedLM prefix, less the tensors an embedding does not use."""
    for name, tensor in weights:
        name = next((name.removeprefix(p) for p in PREFIXES if name.startswith(p)), name)
        if not name.startswith(SKIPPED):
            yield name, tensor
