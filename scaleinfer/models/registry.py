"""HF architecture name -> our model class: decoders (generation) and encoders (embeddings)."""

from __future__ import annotations

from torch import nn

from scaleinfer.config import ArchConfig
from scaleinfer.errors import UnsupportedArchitectureError
from scaleinfer.models.bert import BertModel
from scaleinfer.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from scaleinfer.models.gpt2 import GPT2LMHeadModel
from scaleinfer.models.gpt_neox import GPTNeoXForCausalLM
from scaleinfer.models.llama import LlamaForCausalLM
from scaleinfer.models.mixtral import MixtralForCausalLM
from scaleinfer.models.opt import OPTForCausalLM
from scaleinfer.models.phi3 import Phi3ForCausalLM
from scaleinfer.models.qwen2_moe import Qwen2MoeForCausalLM
from scaleinfer.models.qwen3_moe import Qwen3MoeForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "GPTNeoXForCausalLM": GPTNeoXForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}
ENCODERS: dict[str, type[nn.Module]] = {
    "BertModel": BertModel,
    "BertForMaskedLM": BertModel,
    "RobertaModel": BertModel,
    "RobertaForMaskedLM": BertModel,
}


def model_class(arch: ArchConfig) -> type[nn.Module]:
    check_supported(arch.architecture)
    return MODELS[arch.architecture]


def encoder_class(architecture: str) -> type[nn.Module]:
    if architecture not in ENCODERS:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not a supported encoder for task='embed'; "
            f"supported: {', '.join(sorted(ENCODERS))}"
        )
    return ENCODERS[architecture]


def check_supported(architecture: str) -> None:
    if architecture in ENCODERS:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is an encoder: use task='embed'; generation supports: "
            f"{', '.join(sorted(MODELS))}"
        )
    if architecture not in MODELS:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(sorted(MODELS))}"
        )
