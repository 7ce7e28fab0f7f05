"""HF architecture name -> our model class."""

from __future__ import annotations

from torch import nn

from scaleinfer.config import ArchConfig
from scaleinfer.errors import UnsupportedArchitectureError
from scaleinfer.models.gpt2 import GPT2LMHeadModel
from scaleinfer.models.gpt_neox import GPTNeoXForCausalLM
from scaleinfer.models.llama import LlamaForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "GPTNeoXForCausalLM": GPTNeoXForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def model_class(arch: ArchConfig) -> type[nn.Module]:
    check_supported(arch.architecture)
    return MODELS[arch.architecture]


def check_supported(architecture: str) -> None:
    if architecture not in MODELS:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(sorted(MODELS))}"
        )
