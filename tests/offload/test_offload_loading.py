"""Loading a checkpoint into a sharded store holds only the layers still loading: as soon as a layer has all
its tensors, each process keeps its share and frees the whole-layer buffer. A checkpoint in layer order needs
one buffer at a time; any other order needs more, never gives another result.

Most tests run in this process as one rank of two (until layers stream, a shard is only a layout), load a
checkpoint in an order they choose, and compare the kept share with an unsharded load byte for byte. The
last runs two gloo processes end to end against the resident model's greedy tokens."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from family_checks import save_tiny
from safetensors import safe_open
from safetensors.torch import save_file
from test_offload_llm import GREEDY, PROMPTS, save_llama, token_ids
from transformers import GPT2Config, Phi3Config

from scaleinfer import LLM
from scaleinfer.config import ArchConfig, ModelConfig, OffloadConfig
from scaleinfer.offload import loader
from scaleinfer.offload.buffers import aligned_empty
from scaleinfer.offload.shard import Shard
from scaleinfer.offload.store import LayerStore
from scaleinfer.weights.source import resolve_model

NUM_LAYERS = 4
LAYER_INDEX = re.compile(r"\.(?:layers|h)\.(\d+)\.")  # Llama / Phi-3 and GPT-2 checkpoint names
TINY = dict(
    vocab_size=384,
    initializer_range=0.2,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    tie_word_embeddings=False,
)
FAMILIES = {
    "phi3": Phi3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **TINY,
    ),  # fused qkv and gate_up
    "gpt2": GPT2Config(n_embd=64, n_inner=128, n_layer=NUM_LAYERS, n_head=4, n_positions=256, **TINY),  # Conv1D
}


@dataclass(slots=True)
class ListSource:
    """A checkpoint as (name, tensor) pairs in the order a test chooses (stands in for a ModelSource)."""

    arch: ArchConfig
    weights: list[tuple[str, torch.Tensor]]
    quant: None = None  # an unquantized checkpoint (ModelSource.quant)

    def iter_weights(self, dtype: torch.dtype, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.weights:
            yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def checkpoint(folder: Path) -> ListSource:
    source = resolve_model(str(folder))
    return ListSource(source.arch, list(source.iter_weights(torch.float32, progress=False)))


def layer_of(name: str) -> int:
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else -1


def interleaved(source: ListSource) -> ListSource:
    """Every layer's first tensor, then every layer's second, ...: all layers are loading at once."""

    def key(pair: tuple[str, torch.Tensor]) -> tuple[str, int]:
        return LAYER_INDEX.sub(".N.", pair[0]), layer_of(pair[0])

    return ListSource(source.arch, sorted(source.weights, key=key))


def with_late_tensor(source: ListSource) -> ListSource:
    """Layer 0's first tensor zeroed where it stands, the real one after everything else: layer 0 looks
    complete with the zeros, and the real tensor must reopen it."""
    position = next(i for i, (name, _) in enumerate(source.weights) if layer_of(name) == 0)
    name, tensor = source.weights[position]
    weights = list(source.weights)
    weights[position] = (name, torch.zeros_like(tensor))
    return ListSource(source.arch, weights + [(name, tensor)])


@contextmanager
def loaded(
    monkeypatch,
    source,
    shard: Shard | None,
    offload: str = "cpu",
    path: Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[LayerStore]:
    """The store after build_offloaded_model as `shard` (None: unsharded) on the CPU."""
    monkeypatch.setattr(loader, "current_shard", lambda: shard)
    options = OffloadConfig(offload=offload, offload_path=str(path) if offload == "nvme" else None)
    _, streamer = loader.build_offloaded_model(source, ModelConfig(), options, torch.device("cpu"), dtype, False)
    try:
        yield streamer.store
    finally:
        streamer.close()


def assert_shares_equal(store: LayerStore, reference: LayerStore) -> None:
    """The parameter bytes in store's share of each layer are those of the unsharded reference."""
    for index, layout in enumerate(store.layouts):
        offset, size = store.share(index)
        got, want = aligned_empty(layout.nbytes), aligned_empty(layout.nbytes)
        store.read_into(index, got)
        reference.read_into(index, want)
        for param in layout.params:  # the padding between parameters is never written
            lo, hi = max(offset, param.offset), min(offset + size, param.offset + param.nbytes)
            if lo < hi:
                assert torch.equal(got[lo:hi], want[lo:hi]), f"layer {index} {param.name} bytes {lo}:{hi}"


def assert_load(
    monkeypatch,
    source,
    rank: int,
    max_live_buffers: int,
    offload: str = "cpu",
    path=None,
    dtype: torch.dtype = torch.float32,
) -> None:
    unsharded = loaded(monkeypatch, source, None, dtype=dtype)
    with unsharded as reference, loaded(monkeypatch, source, Shard(rank, 2), offload, path, dtype) as store:
        assert store.max_live_buffers == max_live_buffers
        assert_shares_equal(store, reference)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, ListSource]:
    """family -> its random-weight checkpoint, in file order (layer by layer)."""
    out = {"llama": checkpoint(save_llama(tmp_path_factory.mktemp("llama"), num_layers=NUM_LAYERS))}
    for family, config in FAMILIES.items():
        folder = tmp_path_factory.mktemp(family)
        save_tiny(config, folder)
        out[family] = checkpoint(folder)
    return out


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_layer_order_holds_one_whole_layer_at_a_time(monkeypatch, checkpoints, family, rank):
    assert_load(monkeypatch, checkpoints[family], rank, max_live_buffers=1)


def test_layer_order_into_nvme_holds_one_whole_layer_at_a_time(monkeypatch, checkpoints, tmp_path):
    assert_load(monkeypatch, checkpoints["llama"], 1, max_live_buffers=1, offload="nvme", path=tmp_path)


@pytest.mark.parametrize("offload", ["cpu", "nvme"])
def test_interleaved_layers_are_all_alive_and_still_loaded_right(monkeypatch, checkpoints, offload, tmp_path):
    assert_load(monkeypatch, interleaved(checkpoints["llama"]), 0, NUM_LAYERS, offload, tmp_path)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_a_tensor_after_its_layer_completed_reopens_the_layer(monkeypatch, checkpoints, family):
    late = with_late_tensor(checkpoints[family])
    with loaded(monkeypatch, checkpoints[family], None) as reference, loaded(monkeypatch, late, Shard(0, 2)) as store:
        assert store.max_live_buffers == 1  # layer 0 is reopened after every other layer was kept
        assert_shares_equal(store, reference)


@pytest.mark.slow  # about 10 s: parsing and dequantizing the 135M GGUF file
def test_gguf_in_layer_order_holds_one_whole_layer_at_a_time(monkeypatch):
    source = resolve_model("smollm2-135m")  # 30 layers, Q4_1, HF names from GGUF ones
    weights = ListSource(source.arch, list(source.iter_weights(torch.bfloat16, progress=False)))  # read once
    assert_load(monkeypatch, weights, 1, max_live_buffers=1, dtype=torch.bfloat16)


def test_loading_leaves_the_weight_loaders_as_they_were(monkeypatch, checkpoints):
    monkeypatch.setattr(loader, "current_shard", lambda: Shard(0, 2))
    options = OffloadConfig(offload="cpu")
    model, streamer = loader.build_offloaded_model(
        checkpoints["phi3"], ModelConfig(), options, torch.device("cpu"), torch.float32, False
    )
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.weight_loader == layer.self_attn.qkv_proj.weight_loader
    assert not hasattr(layer.input_layernorm.weight, "weight_loader")
    streamer.close()


# Two processes, end to end.


def save_files(folder: Path, source: Path, files: list[list[str]]) -> Path:
    """source's checkpoint rewritten as the given files (tensor names each), with an index."""
    folder.mkdir()
    (folder / "config.json").write_text((source / "config.json").read_text())
    with safe_open(str(source / "model.safetensors"), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in list(handle.keys())}
    weight_map = {}
    for number, names in enumerate(files, 1):
        file_name = f"model-{number:05d}-of-{len(files):05d}.safetensors"
        save_file({name: tensors[name] for name in names}, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file_name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def two_orders(tmp_path_factory) -> dict[str, Path]:
    """The same model as two files split inside layer 1 (layer order), and as attention / MLP files
    (every layer spans both, so all load at once)."""
    root = tmp_path_factory.mktemp("orders")
    original = save_llama(root / "original", num_layers=NUM_LAYERS)
    with safe_open(str(original / "model.safetensors"), framework="pt") as handle:
        names = sorted(handle.keys())
    split = names.index("model.layers.1.mlp.down_proj.weight")
    attention = [name for name in names if "self_attn" in name or "input_layernorm" in name]
    rest = [name for name in names if name not in attention]
    return {
        "original": original,
        "split": save_files(root / "split", original, [names[:split], names[split:]]),
        "interleaved": save_files(root / "interleaved", original, [attention, rest]),
    }


def _rank_main(rank: int, folders: dict[str, str], port: int, results) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for order, offload in (("split", "nvme"), ("interleaved", "cpu")):
            path = {"offload_path": str(Path(folders[order]).parent)} if offload == "nvme" else {}
            llm = LLM(folders[order], device="cpu", skip_tokenizer_init=True, progress=False, offload=offload, **path)
            live = llm.engine.runner.streamer.store.max_live_buffers
            results.put((rank, order, live, token_ids(llm.generate(PROMPTS, GREEDY))))
    finally:
        dist.destroy_process_group()


def test_two_processes_load_split_and_interleaved_checkpoints(two_orders, free_tcp_port):
    resident = LLM(str(two_orders["original"]), device="cpu", skip_tokenizer_init=True, progress=False)
    expected = token_ids(resident.generate(PROMPTS, GREEDY))
    results = mp.get_context("spawn").SimpleQueue()
    folders = {order: str(folder) for order, folder in two_orders.items()}
    mp.spawn(_rank_main, args=(folders, free_tcp_port, results), nprocs=2, join=True)
    got = {}
    while not results.empty():
        rank, order, live, tokens = results.get()
        got[rank, order] = (live, tokens)
    live = {"split": 1, "interleaved": NUM_LAYERS}
    assert got == {(rank, order): (live[order], expected) for rank in (0, 1) for order in live}
