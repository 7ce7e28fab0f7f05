"""Real architectures' shapes for random-weight benchmarks: an HF config.json written to a folder."""

from __future__ import annotations

from pathlib import Path

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    # Llama 3.1 8B: the same weights' shape with a 128k context (rope scaling); prompts past 8k need it.
    "llama3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                        rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0),
    # About 141 GB in bf16: larger than any one GPU here, streamed from CPU memory (ZeRO-Inference).
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      tie_word_embeddings=True),
    # About 93 GB in bf16 (46.7B parameters, 12.9B active per token): streamed from CPU memory on one GPU.
    "mixtral-8x7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rope_theta=1e6,
                         num_local_experts=8, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2),
    # 30.5B parameters, 3.3B active per token: 128 experts of width 768, top 8 renormalized, q/k norm.
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                          max_position_embeddings=40960, rope_theta=1e6, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645),
    # For checking the MoE script on a CPU: two small layers of the Qwen3-MoE layout.
    "tiny-moe": dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=1024,
                     max_position_embeddings=2048, rope_theta=1e6, num_experts=16, num_experts_per_tok=4,
                     norm_topk_prob=True, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    # For checking the scripts on a CPU: a few small layers of the Llama layout.
    "tiny-llama": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=4096, max_position_embeddings=2048, rope_theta=10000.0),
}


def write_config(shape: str, folder: Path):
    """Save the shape's config (Qwen3MoeConfig where it counts num_experts, MixtralConfig for num_local_experts,
    else LlamaConfig) to folder/config.json and return it."""
    import transformers

    fields = {"rms_norm_eps": 1e-5, "bos_token_id": 128000, "eos_token_id": 128001, **SHAPES[shape]}
    config_class = transformers.MixtralConfig if "num_local_experts" in fields else transformers.LlamaConfig
    config_class = transformers.Qwen3MoeConfig if "num_experts" in fields else config_class
    config = config_class(**fields)
    config.save_pretrained(folder)
    return config
