"""Tensor-parallel loading from safetensors: each rank reads only its slice of every tensor.

The memory test loads a 176 MiB float32 Llama checkpoint (two files and an index) in fresh processes and
reads their resident set before and after: at tp_size=2 each rank grows by about half the weights, at
tp_size=1 by about all of them. The weights are random; only their sizes matter there. The other tests check
what the ranks hold: their shards put together are the tp_size=1 parameters, cast after narrowing.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from scaleinfer.models.registry import model_class
from scaleinfer.parallel.state import ParallelState, get_parallel_state, set_parallel_state
from scaleinfer.weights.safetensors import INDEX_NAME, iter_safetensors
from scaleinfer.weights.source import resolve_model
from scaleinfer.worker.device import default_dtype

# 4 layers of 36 MiB, a 16 MiB embedding and LM head: no tensor is a large part of the whole, because a rank
# maps one tensor's pages at a time, and a row-parallel slice maps about all of its tensor's (its rows are
# narrower than the kernel's 64 KiB fault-around window).
WIDE_LLAMA = dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=4096, max_position_embeddings=256, tie_word_embeddings=False)
SMALL_LLAMA = dict(WIDE_LLAMA, hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=251)
# Of the checkpoint's bytes, for each of two ranks. Measured: 0.53 peak, 0.505 after; safe_open's get_tensor
# (a copy of each whole tensor, every page of the file mapped while it is open) peaked at 0.87 and 0.78 here.
HALF_GROWTH_MAX = 0.7
FULL_GROWTH_MIN = 0.9  # at tp_size=1 the same load grows by about the whole checkpoint

# Run in a fresh process: the growth of VmRSS (current) and VmHWM (peak, reset just before the load) over
# model.load_weights, with the model built as ModelRunner._load_model builds it.
MEASURE = """
import json, sys, torch
from scaleinfer.models.registry import model_class
from scaleinfer.parallel.state import ParallelState, set_parallel_state
from scaleinfer.weights.source import resolve_model
from scaleinfer.worker.device import default_dtype

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

folder, tp_rank, tp_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
set_parallel_state(ParallelState(tp_rank=tp_rank, tp_size=tp_size))
source = resolve_model(folder)
with default_dtype(torch.float32):
    model = model_class(source.arch)(source.arch)
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")  # VmHWM := VmRSS
model.load_weights(source.iter_weights(torch.float32, progress=False))
print(json.dumps({"peak": status("VmHWM:") - before, "after": status("VmRSS:") - before,
                  "params": sum(p.nbytes for p in model.parameters())}))
"""


def _write_checkpoint(folder, arch: dict, dtype: torch.dtype = torch.float32, num_files: int = 2) -> int:
    """A random-weight Llama checkpoint as HF writes one (config.json, safetensors files, an index); returns
    the weights' bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**arch)
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in shapes.items()}
    names = list(tensors)
    files = {f"model-{i + 1:05d}-of-{num_files:05d}.safetensors": names[i::num_files] for i in range(num_files)}
    for file_name, file_names in files.items():
        save_file({name: tensors[name] for name in file_names}, folder / file_name, metadata={"format": "pt"})
    weight_map = {name: file_name for file_name, file_names in files.items() for name in file_names}
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(t.nbytes for t in tensors.values())


def _measure(folder, runs: list[tuple[int, int]]) -> list[dict[str, int]]:
    """One fresh process per (tp_rank, tp_size), all at once."""
    procs = [subprocess.Popen([sys.executable, "-c", MEASURE, str(folder), str(rank), str(size)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank, size in runs]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    return [json.loads(out.splitlines()[-1]) for out, _ in outputs]


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wide_llama")
    return folder, _write_checkpoint(folder, WIDE_LLAMA)


def test_each_rank_holds_about_half_the_weights(wide_checkpoint):
    folder, weight_bytes = wide_checkpoint
    full, *ranks = _measure(folder, [(0, 1), (0, 2), (1, 2)])
    report = {"weights": weight_bytes, "tp1": full, "tp2": ranks}
    print(json.dumps(report))
    assert full["peak"] >= FULL_GROWTH_MIN * weight_bytes, report
    for rank in ranks:
        assert rank["peak"] < HALF_GROWTH_MAX * weight_bytes, report
        assert rank["after"] < HALF_GROWTH_MAX * weight_bytes, report
        assert rank["params"] < 0.51 * weight_bytes  # the shard itself: half, norms repeated


def _load(folder, tp_rank: int, tp_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    saved = get_parallel_state()
    set_parallel_state(ParallelState(tp_rank=tp_rank, tp_size=tp_size))
    try:
        source = resolve_model(str(folder))
        with default_dtype(dtype):
            model = model_class(source.arch)(source.arch)
        model.load_weights(source.iter_weights(dtype, progress=False))
    finally:
        set_parallel_state(saved)
    return dict(model.named_parameters())


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small_llama")
    _write_checkpoint(folder, SMALL_LLAMA)
    return folder


def _fused_sizes() -> dict[str, list[int]]:
    """Rows of each piece of the fused parameters at tp_size=1: gate, up and q, k, v."""
    arch = SMALL_LLAMA
    head_dim = arch["hidden_size"] // arch["num_attention_heads"]
    q, kv = arch["num_attention_heads"] * head_dim, arch["num_key_value_heads"] * head_dim
    return {"mlp.gate_up_proj.weight": [arch["intermediate_size"]] * 2, "self_attn.qkv_proj.weight": [q, kv, kv]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shards_put_together_are_the_full_parameters(small_checkpoint, dtype):
    full = _load(small_checkpoint, 0, 1, dtype)
    ranks = [_load(small_checkpoint, rank, 2, dtype) for rank in range(2)]
    layer = "model.layers.1."
    for suffix, sizes in _fused_sizes().items():  # column parallel: each rank has half of every piece
        shards = [r[layer + suffix].split([size // 2 for size in sizes]) for r in ranks]
        for i, piece in enumerate(full[layer + suffix].split(sizes)):
            assert torch.equal(torch.cat([shard[i] for shard in shards]), piece), (suffix, i)
    for suffix in ["self_attn.o_proj.weight", "mlp.down_proj.weight"]:  # row parallel
        assert torch.equal(torch.cat([r[layer + suffix] for r in ranks], dim=1), full[layer + suffix]), suffix
    vocab = SMALL_LLAMA["vocab_size"]
    for name in ["model.embed_tokens.weight", "lm_head.weight"]:  # vocab parallel, the last shard padded
        joined = torch.cat([r[name] for r in ranks])
        assert torch.equal(joined[:vocab], full[name]) and not joined[vocab:].any(), name
    assert all(p.dtype == dtype for p in full.values())


def test_cast_after_narrowing_equals_cast_first(small_checkpoint):
    """bf16 parameters from a float32 checkpoint hold the checkpoint's tensor rounded once."""
    stored = dict(iter_safetensors(small_checkpoint, progress=False))
    loaded = _load(small_checkpoint, 1, 2, torch.bfloat16)
    name, half = "model.layers.0.mlp.down_proj.weight", SMALL_LLAMA["intermediate_size"] // 2
    assert stored[name].dtype == torch.float32
    assert torch.equal(loaded[name], stored[name].to(torch.bfloat16).narrow(1, half, half))


def test_views_of_every_dtype_at_any_offset(tmp_path):
    """Odd-length tensors put the next one at an unaligned offset; empty and 0-dim tensors read too; the views
    stay valid after the iterator is done (the map is unmapped only with the last of them)."""
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
        "b.f32": torch.randn(7, generator=generator),
        "c.f16": torch.randn(2, 3, generator=generator).half(),
        "d.i64": torch.arange(5),
        "e.u8": torch.arange(3, dtype=torch.uint8),
        "f.bool": torch.tensor([True, False, True]),
        "g.empty": torch.empty(0, 4),
        "h.scalar": torch.tensor(2.5),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    loaded = dict(iter_safetensors(tmp_path, progress=False))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
