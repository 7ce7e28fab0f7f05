"""scaleinfer: inference for transformer models at every scale.

The public names load on first use, so importing a submodule (the torch-free control plane, say)
does not pull in the model stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scaleinfer.version import __version__

if TYPE_CHECKING:
    from scaleinfer.inject import init_inference
    from scaleinfer.llm import LLM
    from scaleinfer.outputs import CompletionOutput, EmbeddingRequestOutput, RequestOutput
    from scaleinfer.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EmbeddingRequestOutput", "init_inference",
           "__version__"]

_HOMES = {
    "LLM": "scaleinfer.llm",
    "SamplingParams": "scaleinfer.sampling_params",
    "RequestOutput": "scaleinfer.outputs",
    "CompletionOutput": "scaleinfer.outputs",
    "EmbeddingRequestOutput": "scaleinfer.outputs",
    "init_inference": "scaleinfer.inject",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'scaleinfer' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)
