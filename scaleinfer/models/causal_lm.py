"""What every decoder family shares around its own layer stack: the LM head, logits, weight loading; and, for
a pipeline stage, the placeholders of the layers other stages hold."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from scaleinfer.config import ArchConfig
from scaleinfer.layers.attention import AttentionMetadata
from scaleinfer.layers.embedding import ParallelLMHead
from scaleinfer.models.weights import load_into
from scaleinfer.parallel.pipeline import PipelineStage, current_stage


class MissingLayer(nn.Module):
    """A decoder layer another pipeline stage holds: keeps the layer indices (and checkpoint names) of the
    stage's own; no parameters, never run."""

    def forward(self, *args: object) -> None:
        raise RuntimeError("a layer of another pipeline stage was run")


def stage_layer_list(stage: PipelineStage, num_layers: int, make: Callable[[int], nn.Module]) -> nn.ModuleList:
    """layers[i] = make(i) for the stage's layers, MissingLayer for the others'."""
    return nn.ModuleList(make(i) if i in stage.layers else MissingLayer() for i in range(num_layers))


class CausalLM(nn.Module):
    # checkpoint name fragment -> (our fused parameter fragment, shard id)
    stacked_params: dict[str, tuple[str, str | int]] = {}
    skip_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)

    # Whether the family's stack takes a pipeline stage (a layer range, hidden states in and out).
    supports_pipeline = False

    def __init__(self, arch: ArchConfig, model: nn.Module) -> None:
        """model: the family's stack, with `embed_tokens` (None on a pipeline stage past the first); called as
        model(input_ids, positions, meta[, hidden])."""
        super().__init__()
        self.arch = arch
        self.model = model
        self.stage = current_stage(arch.num_hidden_layers)
        # The head maps back to the embedding width (narrower than hidden where a family projects it).
        width = arch.word_embed_proj_dim or arch.hidden_size
        self.lm_head = ParallelLMHead(arch.vocab_size, width) if self.stage.is_last else None
        self.ties_here = arch.tie_word_embeddings and self.lm_head is not None and model.embed_tokens is not None
        if self.ties_here:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden_size]; on a pipeline stage,
        hidden (None on the first) and the result (on all but the last) are what goes between stages."""
        if hidden is None:
            return self.model(input_ids, positions, meta)
        return self.model(input_ids, positions, meta, hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [num_seqs, hidden_size] -> float32 logits [num_seqs, vocab_size]."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = self.skip_suffixes + (("lm_head.weight",) if self.ties_here else ())
        named = self.hf_weights(weights)
        if self.stage.pp_size > 1:  # tensors of the other stages' layers, embedding or head are never read
            named = self._stage_weights(named)
        load_into(self, named, self.stacked_params, skip)

    def _stage_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """This stage's tensors (our names): those a parameter here takes; a tied head on a last stage without
        the embedding loads the embedding's tensor."""
        names = {name for name, _ in self.named_parameters()} | {name for name, _ in self.named_buffers()}
        tied_head = self.arch.tie_word_embeddings and self.lm_head is not None and not self.ties_here
        for name, tensor in weights:
            if tied_head and name == "model.embed_tokens.weight":
                name = "lm_head.weight"
            if _stage_holds(name, names, self.stacked_params):
                yield name, tensor

    def hf_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint tensors under our names; a family whose checkpoint names differ overrides this."""
        yield from weights


def _stage_holds(name: str, params: set[str], stacked: dict[str, tuple[str, str | int]]) -> bool:
    for fragment, (fused, _) in stacked.items():
        if fragment in name:
            return name.replace(fragment, fused) in params
    return name in params
