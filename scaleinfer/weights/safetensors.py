"""Read an HF safetensors checkpoint folder as (hf_name, tensor) pairs, each a view of the mapped file.

Files are memory-mapped read-only and every tensor is a zero-copy view of its bytes in its stored dtype, so a
tensor-parallel rank that narrows a tensor to its slice and copies that into its parameter (the copy casts to
the run dtype) reads only the slice's pages: host memory per rank is about model / T, not the whole model.
Once the consumer asks for the next tensor, the last one's pages leave this process's resident set (they stay
in the shared page cache; a view kept past that reads them again), and each file's map is closed after its
last tensor. The views must never be written: the map is read-only and a write through one faults.

Pickle checkpoints (pytorch_model.bin) are refused, because unpickling runs arbitrary code. Every file's header
is opened through safetensors.safe_open before the first tensor is yielded, so a corrupt or truncated shard
fails the load before any weight is placed; safetensors rejects a file whose header promises more data than
the file holds ("file not fully covered").
"""

from __future__ import annotations

import contextlib
import json
import mmap
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from scaleinfer.errors import ModelLoadError

INDEX_NAME = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth")
HEADER_LENGTH_BYTES = 8  # the file starts with the JSON header's length, little-endian
DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16, "I16": torch.int16,
    "U32": torch.uint32, "I32": torch.int32, "U64": torch.uint64, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}


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
    """Yield every tensor of the folder's checkpoint in its stored dtype, as a read-only view of the mapped
    file (see the module docstring), with a progress bar on stderr."""
    files = safetensors_files(folder)
    names = {path: _tensor_names(path) for path in files}
    _check_index(folder, names)
    total = sum(len(file_names) for file_names in names.values())
    with tqdm(total=total, desc="Loading safetensors", unit="tensor", file=sys.stderr,
              disable=not progress) as bar:
        for path in files:
            with MappedFile.open(path) as mapped:
                for name in names[path]:
                    yield name, mapped.tensor(name)
                    mapped.evict(name)  # the consumer is done with it: asking for the next says so
                    bar.update()


class MappedFile:
    """One safetensors file mapped read-only; tensor() views its bytes at the header's offsets."""

    def __init__(self, path: Path, file_map: mmap.mmap) -> None:
        self.path, self.map = path, file_map
        # The views hold this memoryview, and it holds an export of the map, so close() cannot unmap pages a
        # live view still points at. (torch.frombuffer over the mmap itself keeps no export.)
        self.buffer: memoryview | None = memoryview(file_map)
        self.entries, self.data_start = _parse_header(self.buffer, path)

    @classmethod
    def open(cls, path: Path) -> MappedFile:
        try:
            with path.open("rb") as file:
                return cls(path, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read safetensors file {path}: {exc}") from exc

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def tensor(self, name: str) -> torch.Tensor:
        dtype, shape, (begin, end) = self._entry(name)
        if begin == end:  # frombuffer refuses an empty range
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # torch warns that the buffer is read-only: it is, by design
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(self.buffer, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                    offset=self.data_start + begin)
        return flat.view(shape)

    def evict(self, name: str) -> None:
        """Drop the tensor's pages from this process's resident set; the page cache keeps them."""
        _, _, (begin, end) = self._entry(name)
        start = (self.data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > begin and hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED, start, self.data_start + end - start)

    def close(self) -> None:
        self.buffer = None  # ours only: views still alive keep the memoryview, and the map, until they go
        with contextlib.suppress(BufferError):  # a caller kept views: the map is unmapped with the last of them
            self.map.close()

    def _entry(self, name: str) -> tuple[torch.dtype, list[int], tuple[int, int]]:
        entry = self.entries[name]
        if entry["dtype"] not in DTYPES:
            raise ModelLoadError(f"{self.path}: tensor {name!r} has dtype {entry['dtype']}, which is not supported")
        begin, end = entry["data_offsets"]
        return DTYPES[entry["dtype"]], entry["shape"], (begin, end)


def _parse_header(buffer: memoryview, path: Path) -> tuple[dict[str, dict], int]:
    """(tensor name -> {dtype, shape, data_offsets}, where the data starts). safe_open has already checked
    the header against the file; this reads the same bytes."""
    length = int.from_bytes(buffer[:HEADER_LENGTH_BYTES], "little")
    try:
        header = json.loads(bytes(buffer[HEADER_LENGTH_BYTES : HEADER_LENGTH_BYTES + length]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"corrupt safetensors header in {path}: {exc}") from exc
    header.pop("__metadata__", None)
    return header, HEADER_LENGTH_BYTES + length


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
