"""Tensor parallelism on CPU processes over gloo: greedy tokens equal HF transformers', logprobs equal one
process's, with chunked prefill, prefix caching and preemption in play; every worker process ends."""

import re
from pathlib import Path

import pytest
import torch
from tp_helpers import assert_logprobs_close, generate, hf_greedy, prompts_with_shared_prefix
from transformers import AutoModelForCausalLM, MixtralConfig

from scaleinfer import LLM, SamplingParams, init_inference
from scaleinfer.errors import InvalidRequestError
from scaleinfer.sampling_params import StructuredOutputsParams

# Chunks of 16 tokens, a cache too small for every sequence at once (preemption by recompute), prefix caching on.
PRESSURE = dict(max_num_batched_tokens=16, num_blocks=10, block_size=8)
NUM_TOKENS = 8
DATE = r"\d{4}-\d{2}-\d{2}"


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=512, initializer_range=0.2, bos_token_id=None, eos_token_id=None,
                           pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path_factory.mktemp("mixtral_tp")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def check_family(folder, hf_model, sizes):
    prompts = prompts_with_shared_prefix(hf_model.config.vocab_size)
    reference, _ = generate(folder, prompts, 1, NUM_TOKENS)
    for size in sizes:
        outputs, num_preempted = generate(folder, prompts, size, NUM_TOKENS, **PRESSURE)
        assert num_preempted > 0, "the cache was meant to be too small for every sequence at once"
        for prompt, output in zip(prompts, outputs, strict=True):
            assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, NUM_TOKENS), (size, prompt)
        assert_logprobs_close(outputs, reference)


def test_llama_at_two_and_four_ranks(tiny_models):
    """Four ranks over two KV heads: each KV head is replicated on two ranks."""
    folder, hf_model = tiny_models["llama3.1"]
    check_family(folder, hf_model, (2, 4))


def test_int8_llama_at_two_ranks_equals_one_process(tiny_models):
    """Each rank quantizes its rows (row-parallel: its columns, with the whole row's scale), so the int8 levels
    are the ones one process holds: the same greedy tokens, logprobs within float32 all-reduce order."""
    folder, hf_model = tiny_models["llama3.1"]
    prompts = prompts_with_shared_prefix(hf_model.config.vocab_size)
    reference, _ = generate(folder, prompts, 1, NUM_TOKENS, quantization="int8")
    outputs, _ = generate(folder, prompts, 2, NUM_TOKENS, quantization="int8")
    assert [o.outputs[0].token_ids for o in outputs] == [r.outputs[0].token_ids for r in reference]
    assert_logprobs_close(outputs, reference)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_qkv_bias_and_layernorm_families_at_two_ranks(tiny_models, family):
    folder, hf_model = tiny_models[family]
    check_family(folder, hf_model, (2,))


def test_mixtral_expert_slicing_at_two_ranks(mixtral):
    folder, hf_model = mixtral
    check_family(folder, hf_model, (2,))


def test_the_embedded_model_at_three_ranks(embedded_gguf):
    """SmolLM2-135M: 9 attention heads and 3 KV heads, one of each three per rank; text in, text out. A
    structured-output request beside them: its grammar's bitmask reaches every rank in the step message."""
    params = SamplingParams(temperature=0, max_tokens=12)
    dated = SamplingParams(temperature=0, max_tokens=12, structured_outputs=StructuredOutputsParams(regex=DATE))
    prompts = ["The capital of France is", "1, 2, 3,"]
    with LLM(str(embedded_gguf), device="cpu", progress=False, kv_cache_memory=16 << 20) as llm:
        expected = [o.outputs[0].text for o in llm.generate(prompts, params)]
    with LLM(str(embedded_gguf), device="cpu", progress=False, kv_cache_memory=16 << 20,
             tensor_parallel_size=3) as llm:
        pids = llm.engine.executor.worker_pids
        assert [o.outputs[0].text for o in llm.generate(prompts, params)] == expected
        outputs = llm.generate([*prompts, "The date today is"], [params, params, dated])
    assert [o.outputs[0].text for o in outputs[:2]] == expected
    assert re.fullmatch(DATE, outputs[2].outputs[0].text) and outputs[2].outputs[0].finish_reason == "stop"
    assert len(pids) == 2 and not any(Path(f"/proc/{pid}").exists() for pid in pids)  # stopped and reaped


def test_sizes_that_cannot_run_are_refused_with_the_value(tiny_models):
    folder, _ = tiny_models["llama3.1"]
    with pytest.raises(InvalidRequestError, match="tensor_parallel_size=3 does not divide .*num_attention_heads=4"):
        LLM(str(folder), device="cpu", progress=False, tensor_parallel_size=3)
    with pytest.raises(InvalidRequestError, match="tensor_parallel_size must be an integer >= 1, got 0"):
        LLM(str(folder), device="cpu", progress=False, tensor_parallel_size=0)


def test_kv_heads_that_ranks_cannot_split_are_refused(tmp_path):
    """6 heads over 3 KV heads at T=2: a rank would hold one and a half KV heads."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=6,
                num_key_value_heads=3).save_pretrained(tmp_path)
    with pytest.raises(InvalidRequestError, match="tensor_parallel_size=2 neither divides .*num_key_value_heads=3"):
        LLM(str(tmp_path), device="cpu", load_format="dummy", skip_tokenizer_init=True, progress=False,
            tensor_parallel_size=2)


@pytest.mark.parametrize("offload", ["cpu", "nvme"])
def test_each_rank_streams_its_own_shard_of_offloaded_layers(tiny_models, tmp_path, offload):
    folder, hf_model = tiny_models["llama3.1"]
    prompts = prompts_with_shared_prefix(hf_model.config.vocab_size)[:3]
    reference, _ = generate(folder, prompts, 1, NUM_TOKENS)
    path = dict(offload_path=str(tmp_path)) if offload == "nvme" else {}
    outputs, _ = generate(folder, prompts, 2, NUM_TOKENS, offload=offload, **path)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in reference]
    assert_logprobs_close(outputs, reference)
    assert list(tmp_path.iterdir()) == []  # every rank removed its layer files


def test_init_inference_at_two_ranks_on_a_left_padded_batch(tiny_models):
    folder, _ = tiny_models["llama3.1"]
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    rows = prompts_with_shared_prefix(hf.config.vocab_size)[:3]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    kwargs = dict(max_new_tokens=NUM_TOKENS, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, **kwargs)
    ours = init_inference(AutoModelForCausalLM.from_pretrained(folder).eval(), tensor_parallel_size=2,
                          kv_cache_memory=4 << 20)
    try:
        assert torch.equal(ours.generate(ids, attention_mask=mask, **kwargs), expected)
        with pytest.raises(InvalidRequestError, match="tensor_parallel_size=2 use generate"):
            ours(ids)
    finally:
        ours.engine.shutdown()
