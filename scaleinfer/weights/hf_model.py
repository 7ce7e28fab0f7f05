"""Weights taken from a loaded transformers model: init_inference moves them into ours, one at a time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scaleinfer.weights.source import ModelSource


@dataclass(slots=True)
class HFModelSource(ModelSource):
    hf_model: Any = field(default=None, repr=False)

    def iter_weights(self, dtype: torch.dtype, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Each parameter once (tied ones too), then released: the HF model gives its memory up as ours
        fills, so the two never hold a full copy each."""
        for name, param in list(self.hf_model.named_parameters()):
            yield name, param.data.to(dtype)
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)

    def load_tokenizer(self) -> None:
        return None  # a model object carries no tokenizer: token ids in and out


def hf_model_source(hf_model: Any, arch: Any) -> HFModelSource:
    name = getattr(hf_model, "name_or_path", "") or f"<in-memory {type(hf_model).__name__}>"
    return HFModelSource(path=Path(name), format="hf_model", arch=arch, hf_model=hf_model)
