"""ZeRO-Inference on a GPU: streamed layers (pinned host memory or NVMe files, side-stream copies) give the
resident model's tokens, and the copy of the next layer runs while the current layer computes."""

from __future__ import annotations

import pytest
import torch
from test_offload_llm import PROMPTS, save_llama, token_ids

from scaleinfer import LLM, SamplingParams

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("deep_llama_gpu"), num_layers=6)


def build(folder, **options) -> LLM:
    return LLM(str(folder), device="cuda", dtype="float32", skip_tokenizer_init=True, progress=False,
               enforce_eager=True, num_blocks=64, **options)


@pytest.mark.parametrize("offload", ["cpu", "nvme"])
def test_streamed_tokens_equal_resident_on_gpu(deep_llama, tmp_path, offload):
    expected = token_ids(build(deep_llama).generate(PROMPTS, GREEDY))
    path = {"offload_path": str(tmp_path)} if offload == "nvme" else {}
    llm = build(deep_llama, offload=offload, **path)
    runner = llm.engine.runner
    assert runner.streamer.streams and runner.streamer.num_slots == 2
    assert all(not p.is_cuda for buffer in getattr(runner.streamer.store, "buffers", []) for p in [buffer.tensor])
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == expected
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == expected  # the ring carries over between calls


def test_next_layer_copy_overlaps_current_layer_compute(tmp_path):
    import json

    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=1024, hidden_size=2048,
                  intermediate_size=8192, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                  max_position_embeddings=8192, rms_norm_eps=1e-5, torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = LLM(str(tmp_path), device="cuda", dtype="bfloat16", load_format="dummy", skip_tokenizer_init=True,
              progress=False, offload="cpu", num_blocks=1024, max_num_batched_tokens=8192)
    streamer = llm.engine.runner.streamer
    prompt = [1 + i % 1000 for i in range(8000)]
    llm.generate([prompt], SamplingParams(max_tokens=1))  # warm-up
    streamer.trace()
    llm.generate([prompt[::-1]], SamplingParams(max_tokens=1))
    torch.cuda.synchronize()
    base = streamer.compute_events[0][1]
    compute = {i: (base.elapsed_time(s), base.elapsed_time(e)) for i, s, e in streamer.compute_events}
    copies = [(layer, base.elapsed_time(s), base.elapsed_time(e)) for layer, s, e in streamer.fetcher.copy_events]
    overlapping = [layer for layer, start, end in copies
                   if (layer - 1) in compute and start < compute[layer - 1][1] and end > compute[layer - 1][0]]
    assert len(overlapping) >= 3, (compute, copies)
