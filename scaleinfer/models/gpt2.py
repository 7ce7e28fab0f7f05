"""GPT-2: learned absolute positions, Conv1D weights stored [in, out], tied LM head.

Everything else is the shared skeleton in decoder.py.
"""

from __future__ import annotations

import torch

from scaleinfer.models.decoder import DecoderForCausalLM

# GPT-2's Conv1D modules store weight as [in, out]: nn.Linear's transpose.
CONV1D_WEIGHTS = (".qkv_proj.weight", ".o_proj.weight", ".fc_in.weight", ".fc_out.weight")


class GPT2LMHeadModel(DecoderForCausalLM):
    position_offset = 0
    renames = (
        ("transformer.wte.", "model.embed_tokens."),
        ("transformer.wpe.", "model.embed_positions."),
        ("transformer.h.", "model.layers."),
        ("transformer.ln_f.", "model.norm."),
        (".ln_1.", ".input_layernorm."),
        (".ln_2.", ".post_attention_layernorm."),
        (".attn.c_attn.", ".self_attn.qkv_proj."),
        (".attn.c_proj.", ".self_attn.o_proj."),
        (".mlp.c_fc.", ".mlp.fc_in."),
        (".mlp.c_proj.", ".mlp.fc_out."),
    )
    # Old checkpoints also hold the causal-mask buffers.
    skip_suffixes = (".attn.bias", ".attn.masked_bias")

    def to_linear_layout(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
