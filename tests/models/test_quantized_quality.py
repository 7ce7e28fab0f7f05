"""Quality of the quantized schemes on the embedded model (SmolLM2-135M, CPU): perplexity over a fixed text
(tests/models/quality_text.txt, plain English written for these tests) against the unquantized float32 path,
the GGUF-kept path against the dequantized one, and int8's greedy tokens against float32's.

Measured (torch 2.13 CPU, the first MAX_TOKENS tokens): float32 perplexity 23.4; int8 about 1.0x; the file's Q4_1
kept (gguf, with the int8 head) 1.00x; int4 on load 1.45x: the embedded weights are already Q4_1, and int4 puts
their dequantized values on a second, coarser grid (groups of 64), the worst case for it. Each bound is the
measured ratio plus a margin; int4 with the zeros of its groups dropped (checked here) is far past its bound.
"""

from pathlib import Path

import pytest
import torch

from scaleinfer import LLM, SamplingParams
from scaleinfer.config import CacheConfig, ModelConfig
from scaleinfer.layers import quant_int4
from scaleinfer.outputs import ScheduledSequence, SchedulerOutput
from scaleinfer.sampling_params import SamplingParams as Params
from scaleinfer.weights import gguf
from scaleinfer.weights.source import resolve_model
from scaleinfer.worker.model_runner import ModelRunner
from scaleinfer.worker.step_inputs import build_step_inputs

TEXT = (Path(__file__).parent / "quality_text.txt").read_text(encoding="utf-8")
MAX_TOKENS = 128  # of the text: enough for a stable perplexity, few enough for CI
CHUNK = 16  # prefill chunks of decode-like size: the CPU int4 / int8 kernels run, as in decode
INT8_BOUND = 1.05  # perplexity at most this multiple of float32's
INT4_BOUND = 1.6
GGUF_BOUND = 1.05


def _runner(embedded_gguf, quantization):
    config = ModelConfig(str(embedded_gguf), device="cpu", dtype="float32", quantization=quantization)
    return ModelRunner(config, CacheConfig(num_blocks=64), resolve_model(str(embedded_gguf)), progress=False)


def _logits(runner, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), vocab] logits, the prompt prefilled CHUNK tokens at a time through the paged cache."""
    block_table = list(range(-(-len(token_ids) // runner.block_size)))
    out = []
    for start in range(0, len(token_ids), CHUNK):
        seq = ScheduledSequence("q", token_ids[start:start + CHUNK], start, block_table, True, Params())
        inputs = build_step_inputs(SchedulerOutput([seq]), runner.block_size, runner.device)
        with torch.inference_mode():
            out.append(runner.model.compute_logits(runner.model(inputs.input_ids, inputs.positions, inputs.attn)))
    return torch.cat(out).float()


def _perplexity(logits: torch.Tensor, token_ids: list[int]) -> float:
    targets = torch.tensor(token_ids[1:])
    return torch.nn.functional.cross_entropy(logits[:-1], targets).exp().item()


@pytest.fixture(scope="module")
def text_ids(embedded_gguf) -> list[int]:
    return resolve_model(str(embedded_gguf)).load_tokenizer()(TEXT).input_ids[:MAX_TOKENS]


@pytest.fixture(scope="module")
def fp32(embedded_gguf, text_ids):
    logits = _logits(_runner(embedded_gguf, None), text_ids)
    return logits, _perplexity(logits, text_ids)


@pytest.mark.parametrize("quantization,bound", [("int8", INT8_BOUND), ("int4", INT4_BOUND), ("gguf", GGUF_BOUND)])
def test_perplexity_stays_within_its_bound_of_float32(quantization, bound, embedded_gguf, text_ids, fp32):
    runner = _runner(embedded_gguf, quantization)
    ppl = _perplexity(_logits(runner, text_ids), text_ids)
    print(f"{quantization}: perplexity {ppl:.3f} vs float32 {fp32[1]:.3f} ({ppl / fp32[1]:.3f}x)")
    assert ppl <= bound * fp32[1], (quantization, ppl, fp32[1])
    if quantization == "int4":  # the bound is not slack: zeros dropped from every group fail it
        for module in runner.model.modules():
            if hasattr(module, "weight_zero"):
                module.weight_zero.zero_()
                module.cpu_int4 = None
        broken = _perplexity(_logits(runner, text_ids), text_ids)
        assert broken > bound * fp32[1], broken


def test_gguf_kept_logits_equal_the_dequantized_paths(monkeypatch, embedded_gguf, text_ids, fp32):
    """The kept Q4_1 levels, scales and zeros are the file's values: through the float32 dequantized matmul
    (the CPU kernel's bf16 activations off) and with the head unquantized, the logits are float32's."""
    monkeypatch.setattr(quant_int4, "CPU_KERNEL_ROWS", 0)
    monkeypatch.setattr(gguf, "HEAD_INT8", False)
    kept = _runner(embedded_gguf, "gguf")
    assert any(m.weight.dtype == torch.uint8 for m in kept.model.modules() if hasattr(m, "weight_zero"))
    torch.testing.assert_close(_logits(kept, text_ids[:48]), fp32[0][:48], atol=2e-4, rtol=1e-4)


def test_int8_greedy_tokens_equal_float32s_on_the_readme_prompt(embedded_gguf):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    tokens = []
    for quantization in (None, "int8"):
        with LLM(str(embedded_gguf), device="cpu", progress=False, kv_cache_memory=16 << 20,
                 quantization=quantization) as llm:
            tokens.append(llm.generate("The capital of France is", params)[0].outputs[0].token_ids)
    assert tokens[0] == tokens[1]


def test_gguf_on_a_safetensors_model_is_refused(tiny_models):
    folder, _ = tiny_models["llama3.1"]
    with pytest.raises(Exception, match="quantization='gguf' keeps a GGUF file's quantized weights"):
        _runner(folder, "gguf")
