"""OPT: learned positions read two rows in, ReLU, separate biased q/k/v, tied head.

Post-LN blocks (do_layer_norm_before=False) and embeddings narrower than hidden (word_embed_proj_dim,
projected in and out) come from ArchConfig; everything else is the shared skeleton in decoder.py. OPT
scales q before the scores where we scale the scores: the same product.
"""

from __future__ import annotations

from scaleinfer.models.decoder import DecoderForCausalLM


class OPTForCausalLM(DecoderForCausalLM):
    # fairseq reserved the first two rows of the position table for padding.
    position_offset = 2
    renames = (
        ("model.decoder.", "decoder."),  # checkpoints saved from OPTModel have no "model." prefix
        ("decoder.final_layer_norm.", "model.norm."),
        ("decoder.", "model."),
        (".self_attn_layer_norm.", ".input_layernorm."),
        (".final_layer_norm.", ".post_attention_layernorm."),
        (".self_attn.out_proj.", ".self_attn.o_proj."),
        (".fc1.", ".mlp.fc_in."),
        (".fc2.", ".mlp.fc_out."),
    )
