"""Sentence embeddings from an encoder: tokenize -> pack -> forward -> pool -> L2-normalize, in batches.

A batch is packed with no padding: its sequences' tokens are concatenated into one [num_tokens] row, and
`cu_seqlens` gives where each one starts. Batches are filled in order up to a token and a sequence budget.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from scaleinfer.config import ModelConfig, SchedulerConfig
from scaleinfer.errors import InvalidRequestError
from scaleinfer.models.bert import BertConfig
from scaleinfer.models.registry import encoder_class
from scaleinfer.weights.dummy import init_dummy_weights
from scaleinfer.weights.source import ModelSource
from scaleinfer.worker.device import default_dtype, resolve_device, resolve_dtype

Pooling = Literal["mean", "cls"]
POOLING_MODULE = "sentence_transformers.models.Pooling"


@dataclass(slots=True)
class PackedBatch:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens], from 0 in each sequence
    cu_seqlens: torch.Tensor  # [num_seqs + 1], offsets of each sequence's first token
    seq_lens: list[int]

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens)


def pack(token_ids: list[list[int]], device: torch.device) -> PackedBatch:
    seq_lens = [len(ids) for ids in token_ids]
    lens = torch.tensor(seq_lens, device=device)
    cu_seqlens = F.pad(lens.cumsum(0), (1, 0))
    starts = torch.repeat_interleave(cu_seqlens[:-1], lens)
    input_ids = torch.tensor([t for ids in token_ids for t in ids], device=device)
    positions = torch.arange(len(input_ids), device=device) - starts
    return PackedBatch(input_ids, positions, cu_seqlens, seq_lens)


def pool(hidden: torch.Tensor, batch: PackedBatch, pooling: Pooling) -> torch.Tensor:
    """hidden: [num_tokens, hidden] -> L2-normalized [num_seqs, hidden] in float32."""
    hidden = hidden.float()
    if pooling == "cls":
        return F.normalize(hidden[batch.cu_seqlens[:-1]], dim=-1)
    lens = torch.tensor(batch.seq_lens, device=hidden.device)
    seq_ids = torch.repeat_interleave(torch.arange(len(lens), device=hidden.device), lens)
    sums = hidden.new_zeros(len(lens), hidden.shape[1]).index_add_(0, seq_ids, hidden)
    return F.normalize(sums / lens[:, None], dim=-1)


def read_pooling(folder: Path) -> Pooling:
    """The pooling a sentence-transformers folder names in modules.json; mean where it names none."""
    modules = _read_json(folder / "modules.json") or []
    for module in modules:
        if module.get("type") == POOLING_MODULE:
            config = _read_json(folder / module.get("path", "") / "config.json") or {}
            return "cls" if config.get("pooling_mode_cls_token") else "mean"
    return "mean"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def batches(token_ids: list[list[int]], max_num_tokens: int, max_num_seqs: int) -> Iterator[list[int]]:
    """Indices of consecutive sequences whose tokens fit the budgets (a longer one goes alone)."""
    batch: list[int] = []
    num_tokens = 0
    for i, ids in enumerate(token_ids):
        if batch and (num_tokens + len(ids) > max_num_tokens or len(batch) == max_num_seqs):
            yield batch
            batch, num_tokens = [], 0
        batch.append(i)
        num_tokens += len(ids)
    if batch:
        yield batch


class EmbeddingRunner:
    def __init__(self, model_config: ModelConfig, scheduler_config: SchedulerConfig, source: ModelSource,
                 progress: bool = True) -> None:
        self.device = resolve_device(model_config)
        self.dtype = resolve_dtype(model_config, self.device)
        self.architecture = source.arch.architecture
        model_class = encoder_class(self.architecture)  # before reading a config we may not understand
        self.config = BertConfig.from_folder(source.path)
        self.model = self._load_model(model_class, source, model_config, progress)
        self.tokenizer = source.load_tokenizer()
        self.pooling = read_pooling(source.path)
        self.max_seq_len = _max_seq_len(source.path, self.config, model_config.max_model_len)
        self.max_num_tokens = max(scheduler_config.max_num_batched_tokens, self.max_seq_len)
        self.max_num_seqs = scheduler_config.max_num_seqs

    def _load_model(self, model_class: type[torch.nn.Module], source: ModelSource, config: ModelConfig,
                    progress: bool) -> torch.nn.Module:
        with default_dtype(self.dtype), torch.device(self.device):
            model = model_class(self.config)
        if config.load_format == "dummy":
            init_dummy_weights(model, config.seed)
        else:
            model.load_weights(source.iter_weights(self.dtype, progress=progress))
        return model.eval()

    def embed(self, texts: list[str]) -> list[list[float]]:
        """One L2-normalized vector per text, in order."""
        if isinstance(texts, str) or not texts:
            raise InvalidRequestError(f"embed() takes a non-empty list of strings, got {texts!r}")
        return self.embed_batched(self.tokenize(texts))

    def embed_batched(self, token_ids: list[list[int]]) -> list[list[float]]:
        """One vector per token-id list, in order, packed into batches within the budgets."""
        vectors: list[list[float]] = [[] for _ in token_ids]
        for indices in batches(token_ids, self.max_num_tokens, self.max_num_seqs):
            for i, vector in zip(indices, self.embed_token_ids([token_ids[i] for i in indices])):
                vectors[i] = vector
        return vectors

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with the special tokens, truncated to the model's sequence limit."""
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_seq_len)
        return [list(ids) for ids in encoded["input_ids"]]

    @torch.inference_mode()
    def embed_token_ids(self, token_ids: list[list[int]]) -> list[list[float]]:
        """One packed batch through the model."""
        batch = pack(token_ids, self.device)
        hidden = self.model(batch.input_ids, batch.positions, batch.cu_seqlens,
                            batch.max_seq_len)  # [num_tokens, hidden]
        return pool(hidden, batch, self.pooling).tolist()


def _max_seq_len(folder: Path, config: BertConfig, max_model_len: int | None) -> int:
    """The least of the model's positions, sentence-transformers' max_seq_length and max_model_len."""
    limits = [config.max_seq_len, max_model_len]
    sentence_config = _read_json(folder / "sentence_bert_config.json") or {}
    limits.append(sentence_config.get("max_seq_length"))
    return min(limit for limit in limits if limit)

