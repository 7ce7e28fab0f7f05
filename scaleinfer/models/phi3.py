"""Phi-3 (and Phi-3.5, Phi-4-mini): the Llama layers, with q/k/v and gate/up fused in the checkpoint.

Partial rotary comes from ArchConfig. LongRoPE (rope_type "longrope", old configs "su") has two sets of
rates: HF turns every token of a forward pass at the long ones once that pass reaches a position past
original_max_position_embeddings, else at the short ones. Here the choice is made per sequence per step:
a prompt longer than that length, and every decode step past it, use the long rates, as in HF. Two cases
differ: HF recomputes the whole cache at the long rates when a sequence first grows past that length
while decoding (we keep the keys already cached at the short rates), and a long prompt split into
prefill chunks turns its chunks that end before that length at the short rates.

The fused checkpoint tensors are split into the q, k, v and gate, up parts the Llama family loads, so each
tensor-parallel rank still takes only its own slice of each.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from scaleinfer.config import ArchConfig
from scaleinfer.errors import ModelLoadError
from scaleinfer.layers.attention import AttentionMetadata
from scaleinfer.models.causal_lm import CausalLM
from scaleinfer.models.llama import LlamaForCausalLM, LlamaModel


class Phi3Model(LlamaModel):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__(arch)
        scaling = arch.rope_scaling or {}
        self.long_rope = scaling.get("rope_type") == "longrope"
        self.original_max_position = scaling.get("original_max_position_embeddings", 0)
        self.max_position = arch.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        # The layers read positions only as rows of the rotary table.
        rows = self.rope_rows(positions, meta) if self.long_rope else positions
        return super().forward(input_ids, rows, meta, hidden)

    def rope_rows(self, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """positions: [num_tokens] -> rows of the [short; long] table: + max_position for each token whose
        sequence reaches past original_max_position_embeddings: a decode by its own position, a prefill chunk
        by the last token of its sequence (a long prompt's first chunks turn at the long rates, as HF's one
        pass over the whole prompt does)."""
        reach = positions  # the furthest position of each token's sequence; a decode's own
        if meta.prefill is not None:
            lens = meta.prefill.query_start_loc.diff()  # [num_prefills]
            last = meta.prefill.start_pos + lens - 1
            if meta.prefill.seq_lens is not None:
                last = torch.maximum(last, meta.prefill.seq_lens - 1)
            num_prefill_tokens = positions.shape[0] - meta.num_decodes
            prefill_reach = torch.repeat_interleave(last, lens, output_size=num_prefill_tokens)
            reach = torch.cat([positions[: meta.num_decodes], prefill_reach])
        return positions + (reach >= self.original_max_position).long() * self.max_position


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, arch: ArchConfig) -> None:
        if arch.hidden_act != "silu":
            raise ModelLoadError(f"Phi-3 with hidden_act {arch.hidden_act!r} is not supported (silu is)")
        CausalLM.__init__(self, arch, Phi3Model(arch))

    def hf_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """qkv_proj: [q_size + 2 * kv_size, hidden] -> q_proj, k_proj, v_proj; gate_up_proj:
        [2 * intermediate, hidden] -> gate_proj, up_proj."""
        arch = self.arch
        for name, tensor in weights:
            if ".qkv_proj." in name:
                parts = tensor.split([arch.q_size, arch.kv_size, arch.kv_size])
                yield from zip((name.replace(".qkv_proj.", f".{p}_proj.") for p in "qkv"), parts, strict=True)
            elif ".gate_up_proj." in name:
                names = (name.replace(".gate_up_proj.", f".{p}.") for p in ("gate_proj", "up_proj"))
                yield from zip(names, tensor.chunk(2), strict=True)
            else:
                yield name, tensor
