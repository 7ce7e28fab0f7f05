"""ZeRO-Inference on the CPU: layers streamed from NVMe files or host memory give the tokens of a resident
model, within a memory budget, and fail cleanly on bad paths, budgets and reads."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from scaleinfer import LLM, SamplingParams
from scaleinfer.errors import InvalidRequestError, ModelLoadError
from scaleinfer.offload.layout import LayerLayout

PROMPTS = [[1, 17, 42, 99, 5, 8, 13, 21, 34, 55, 89, 144, 233], [7, 7, 300, 12], [250, 3, 9, 27, 81, 243, 31, 2]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def save_llama(folder: Path, num_layers: int, hidden: int = 64, intermediate: int = 128) -> Path:
    """A random-weight Llama (initializer_range 0.2: varied greedy output) saved as safetensors, no tokenizer."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=384, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    return save_llama(tmp_path_factory.mktemp("deep_llama"), num_layers=6)


@pytest.fixture(scope="module")
def resident_tokens(deep_llama) -> list[list[int]]:
    llm = LLM(str(deep_llama), device="cpu", skip_tokenizer_init=True, progress=False)
    return token_ids(llm.generate(PROMPTS, GREEDY))


def token_ids(outputs) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in outputs]


def layer_bytes(folder: Path) -> int:
    """One streamed layer's bytes (float32 on the CPU), from a model built on the meta device: no weights."""
    from scaleinfer.models.registry import model_class
    from scaleinfer.offload.loader import parameters_on_meta
    from scaleinfer.weights.source import resolve_model

    arch = resolve_model(str(folder)).arch
    with parameters_on_meta():
        model = model_class(arch)(arch)
    return max(LayerLayout.of(layer).nbytes for layer in model.model.layers)


def offloaded(folder: Path, offload: str, tmp_path: Path, num_slots: int | None = None, **options) -> LLM:
    """num_slots: a device budget of exactly that many layers (None: the default, two)."""
    path = {"offload_path": str(tmp_path)} if offload == "nvme" else {}
    budget = {} if num_slots is None else {"offload_gpu_budget": num_slots * layer_bytes(folder)}
    llm = LLM(str(folder), device="cpu", skip_tokenizer_init=True, progress=False, offload=offload, **path, **budget,
              **options)
    assert llm.engine.runner.streamer.num_slots == min(num_slots or 2, llm.engine.runner.streamer.num_layers)
    return llm


def assert_no_blocks_held(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0


@pytest.mark.parametrize("offload", ["nvme", "cpu"])
@pytest.mark.parametrize("num_slots", [1, 2, 4, 8])
def test_streamed_greedy_tokens_equal_resident(deep_llama, resident_tokens, tmp_path, offload, num_slots):
    # 4 slots for 6 layers: the ring wraps across steps at a different layer each time; 8: all resident.
    llm = offloaded(deep_llama, offload, tmp_path, num_slots)
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == resident_tokens
    assert_no_blocks_held(llm)


def test_nvme_files_are_the_layers_and_go_away(deep_llama, tmp_path):
    llm = offloaded(deep_llama, "nvme", tmp_path)
    store = llm.engine.runner.streamer.store
    assert len(store.files) == 6 and all(f.stat().st_size == store.layouts[0].nbytes for f in store.files)
    folder = store.folder
    llm.engine.runner.streamer.close()
    assert not folder.exists()


def test_embedded_model_streamed_from_nvme_equals_resident(tmp_path):
    prompts = ["The capital of France is", "def add(a, b):"]
    params = SamplingParams(temperature=0, max_tokens=8)
    resident = token_ids(LLM(progress=False, device="cpu").generate(prompts, params))
    streamed = LLM(progress=False, device="cpu", offload="nvme", offload_path=str(tmp_path))
    assert streamed.engine.runner.streamer.streams
    assert token_ids(streamed.generate(prompts, params)) == resident


def test_budget_below_one_layer_is_named(deep_llama, tmp_path):
    with pytest.raises(InvalidRequestError, match=r"offload_gpu_budget=1000 bytes holds no layer"):
        LLM(str(deep_llama), device="cpu", skip_tokenizer_init=True, progress=False, offload="cpu",
            offload_gpu_budget=1000)


@pytest.mark.parametrize("path, message", [
    ("missing", "does not exist"), ("a_file", "not a folder"), ("/proc", "not writable"),
])
def test_bad_offload_path_is_named(deep_llama, tmp_path, path, message):
    (tmp_path / "a_file").write_text("x")
    target = path if path.startswith("/") else str(tmp_path / path)
    with pytest.raises(ModelLoadError, match=message) as info:
        LLM(str(deep_llama), device="cpu", skip_tokenizer_init=True, progress=False, offload="nvme",
            offload_path=target)
    assert Path(target).name in str(info.value)


def test_offload_path_without_room_is_named(deep_llama, tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    with pytest.raises(ModelLoadError, match=r"has 0.00 GiB free; the streamed layers need"):
        LLM(str(deep_llama), device="cpu", skip_tokenizer_init=True, progress=False, offload="nvme",
            offload_path=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_option_errors_are_named():
    with pytest.raises(InvalidRequestError, match="needs offload_path"):
        LLM(offload="nvme")
    with pytest.raises(InvalidRequestError, match="offload must be one of"):
        LLM(offload="disk")


def test_read_error_fails_the_step_and_the_engine_goes_on(deep_llama, resident_tokens, tmp_path):
    llm = offloaded(deep_llama, "nvme", tmp_path, num_slots=2)
    store = llm.engine.runner.streamer.store
    victim = store.files[3]
    saved = victim.read_bytes()
    victim.write_bytes(saved[:4096])  # shrinks under the open descriptor: reads come back short
    outputs = llm.generate(PROMPTS, GREEDY)
    assert all(o.finished and o.error and "layer 3" in o.error and victim.name in o.error for o in outputs)
    assert_no_blocks_held(llm)
    victim.write_bytes(saved)
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == resident_tokens  # prefix cache held no half-written KV
    assert_no_blocks_held(llm)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_resident_memory_stays_within_budget_while_streaming(tmp_path):
    folder = save_llama(tmp_path / "big", num_layers=12, hidden=512, intermediate=2048)  # ~17 MB a layer
    llm = offloaded(folder, "nvme", tmp_path, num_slots=2, num_blocks=64)
    streamer = llm.engine.runner.streamer
    model_bytes, budget = streamer.store.nbytes, streamer.num_slots * streamer.slot_bytes
    slack = 48 << 20  # activations, allocator and interpreter noise
    assert model_bytes > 2 * (budget + slack)
    baseline, peak, done = rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    finally:
        done.set()
        sampler.join()
    assert peak[0] - baseline < budget + slack, (peak[0] - baseline, budget, model_bytes)


def test_layout_packs_aligned_views():
    layer = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(5))
    layout = LayerLayout.of(layer)
    assert [p.offset % 256 for p in layout.params] == [0, 0, 0, 0] and layout.nbytes % 4096 == 0
    flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
    views = layout.views(flat)
    views[0].copy_(layer[0].weight)
    assert torch.equal(flat[: 60].view(torch.float32).view(5, 3), layer[0].weight)


def test_offload_fills_each_step_unless_told_otherwise():
    from scaleinfer.config import EngineConfig

    streamed = EngineConfig.from_kwargs(offload="cpu")
    assert (streamed.scheduler.max_num_batched_tokens, streamed.scheduler.max_num_seqs) == (32768, 1024)
    assert EngineConfig.from_kwargs(offload="cpu", max_num_seqs=8).scheduler.max_num_seqs == 8
    assert EngineConfig.from_kwargs().scheduler.max_num_batched_tokens == 2048


def test_init_inference_streams_an_hf_model_from_host_memory():
    import transformers

    from scaleinfer import init_inference

    config = transformers.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      initializer_range=0.2)
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                     pad_token_id=0)
    model = init_inference(hf_model, offload="cpu", kv_cache_memory=16 << 20)
    assert model.engine.runner.streamer.streams
    assert model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8).tolist() == expected.tolist()
