"""Read an HF safetensors checkpoint folder as (hf_name, tensor) pairs.

Files are memory-mapped through safetensors.safe_open; pickle checkpoints (pytorch_model.bin) are
refused, because unpickling runs arbitrary code. Every file's header is opened before the first tensor is
yielded, so a corrupt or truncated shard fails the load before any weight is placed. safetensors itself
rejects a file whose header promises more data than the file holds ("file not fully covered").
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from scaleinfer.errors import ModelLoadError

INDEX_NAME = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth")


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's files: those the index names when there is one, else every *.safetensors."""
    index = folder / INDEX_NAME
    if index.is_file():
        return [folder / name for name in sorted(set(_weight_map(index).values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(_no_safetensors_message(folder))
    return files


def iter_safetensors(folder: Path, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of the folder's checkpoint in its stored dtype, with a progress bar on stderr."""
    files = safetensors_files(folder)
    names = {path: _tensor_names(path) for path in files}
    _check_index(folder, names)
    total = sum(len(file_names) for file_names in names.values())
    with tqdm(total=total, desc="Loading safetensors", unit="tensor", file=sys.stderr,
              disable=not progress) as bar:
        for path in files:
            for name, tensor in _read_file(path, names[path]):
                yield name, tensor
                bar.update()


def _read_file(path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            for name in names:
                yield name, handle.get_tensor(name)
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"cannot read safetensors file {path}: {exc}") from exc


def _tensor_names(path: Path) -> list[str]:
    """Open the header only: this validates it and its extent against the file size."""
    if not path.is_file():
        raise ModelLoadError(f"safetensors file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"corrupt or truncated safetensors file {path}: {exc}") from exc


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot read safetensors index {index}: {exc!r}") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"safetensors index {index} has an empty or malformed weight_map")
    return weight_map


def _check_index(folder: Path, names: dict[Path, list[str]]) -> None:
    """Every tensor the index promises must be in the file it names."""
    index = folder / INDEX_NAME
    if not index.is_file():
        return
    for name, file_name in _weight_map(index).items():
        if name not in names[folder / file_name]:
            raise ModelLoadError(f"{index} maps {name!r} to {file_name}, which does not contain it")


def _no_safetensors_message(folder: Path) -> str:
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))
    if pickles:
        return (f"{folder} has no *.safetensors files, only pickle checkpoints ({', '.join(pickles)}); "
                "pickle checkpoints are refused because loading them can run arbitrary code. Convert them "
                "to safetensors (model.save_pretrained(folder) with transformers).")
    return f"{folder} has no *.safetensors files"
