"""kv_offload over 2 x 2 CPU ranks (gloo): every rank swaps its share of the same blocks (its KV heads, its stage's
layers), with micro-batches in flight; the greedy tokens equal HF's and one process's, every preemption swapped."""

import torch
from tp_helpers import assert_logprobs_close, hf_greedy, prompts_with_shared_prefix
from transformers import AutoModelForCausalLM, LlamaConfig

from scaleinfer import LLM, SamplingParams

NUM_TOKENS = 8
PARAMS = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=3)
PRESSURE = dict(max_num_batched_tokens=16, num_blocks=10, block_size=8)  # too few blocks for every sequence


def start(folder, **options):
    return LLM(str(folder), device="cpu", dtype="float32", skip_tokenizer_init=True, progress=False, **options)


def test_two_ranks_by_two_stages_swap_their_own_kv(tmp_path):
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(config).eval()
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    prompts = prompts_with_shared_prefix(config.vocab_size)
    with start(tmp_path, kv_cache_memory=4 << 20) as alone:
        expected = alone.generate(prompts, PARAMS)
    with start(tmp_path, tensor_parallel_size=2, pipeline_parallel_size=2, kv_offload="cpu",
               kv_offload_memory=1 << 20, **PRESSURE) as llm:
        outputs = llm.generate(prompts, PARAMS)
        stats, block_manager = llm.engine.stats(), llm.engine.block_manager
        assert stats.num_preempted > 0 and stats.num_swapped == stats.num_preempted, stats
        assert stats.num_used_blocks == 0 and block_manager.host.num_free == block_manager.num_host_blocks
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, NUM_TOKENS), prompt
    assert_logprobs_close(outputs, expected)
