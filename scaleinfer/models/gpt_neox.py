"""GPT-NeoX (Pythia): partial rotary, parallel residual, QKV fused per head, untied embed_out.

Partial rotary and the parallel residual come from ArchConfig; everything else is the shared skeleton in
decoder.py.
"""

from __future__ import annotations

import torch

from scaleinfer.models.decoder import DecoderForCausalLM


class GPTNeoXForCausalLM(DecoderForCausalLM):
    renames = (
        ("gpt_neox.embed_in.", "model.embed_tokens."),
        ("gpt_neox.layers.", "model.layers."),
        ("gpt_neox.final_layer_norm.", "model.norm."),
        ("embed_out.", "lm_head."),
        (".attention.query_key_value.", ".self_attn.qkv_proj."),
        (".attention.dense.", ".self_attn.o_proj."),
        (".mlp.dense_h_to_4h.", ".mlp.fc_in."),
        (".mlp.dense_4h_to_h.", ".mlp.fc_out."),
    )
    skip_suffixes = ("rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias")

    def split_qkv(self, fused: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """fused: [num_heads * (q, k, v) * head_dim, ...] (per-head interleaved) -> (q, k, v), each
        [num_heads * head_dim, ...]."""
        heads, head_dim = self.arch.num_attention_heads, self.arch.head_dim
        per_head = fused.view(heads, 3, head_dim, *fused.shape[1:])
        return tuple(per_head[:, i].reshape(heads * head_dim, *fused.shape[1:]) for i in range(3))
