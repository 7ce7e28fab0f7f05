"""init_inference on HF model objects: generate() and forward() equal HF's, left-padded batches included."""

import pytest
import torch
from family_checks import assert_init_inference_matches, left_padded, random_prompts
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

from scaleinfer import init_inference
from scaleinfer.errors import RequestFailedError, UnsupportedArchitectureError

FAMILIES = ["llama2", "llama3.1", "mistral", "qwen2", "gpt2", "gpt_neox"]
PAD = 0
SUPPORTED_LIST = "BloomForCausalLM.*GPT2LMHeadModel.*LlamaForCausalLM.*OPTForCausalLM.*Phi3ForCausalLM"


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_and_forward_equal_hf(tiny_models, family):
    folder, hf_model = tiny_models[family]
    assert_init_inference_matches(folder, random_prompts(hf_model.config.vocab_size))


def test_min_new_tokens_and_eos(tiny_models):
    folder = tiny_models["llama2"][0]
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([random_prompts(hf.config.vocab_size)[0]])
    with torch.no_grad():
        free = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    eos = free[0, ids.shape[1] + 2].item()  # pretend the third new token is the end
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    with torch.no_grad():
        expected = hf.generate(ids, **kwargs)
        expected_min = hf.generate(ids, min_new_tokens=6, **kwargs)
    ours = init_inference(AutoModelForCausalLM.from_pretrained(folder).eval(), kv_cache_memory=64 << 20)
    assert torch.equal(ours.generate(ids, **kwargs), expected)
    assert torch.equal(ours.generate(ids, min_new_tokens=6, **kwargs), expected_min)


def test_weights_move_without_a_second_copy():
    """Peak bytes held by torch's CPU allocator, HF model included, over its 67 MB of weights: 2.00x while our
    model was allocated whole before loading, 1.13x with each parameter allocated as it is loaded (the excess:
    the 8 MB embedding held twice while it is copied). Allocated bytes, not RSS: the CPU commits a page only
    when it is written, so RSS never showed the second copy that a GPU allocates at once."""
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        hf = LlamaForCausalLM(config)
        weights = sum(p.numel() * p.element_size() for p in hf.parameters())
        init_inference(hf, kv_cache_memory=1 << 20)
    assert weights > 60e6 and all(p.numel() == 0 for p in hf.parameters())
    assert peak_cpu_allocated(prof) < 1.25 * weights, peak_cpu_allocated(prof) / weights


def peak_cpu_allocated(prof: profile) -> int:
    """The most bytes torch's CPU allocator held at once while `prof` ran (it counts what was allocated inside)."""
    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = walk(prof.profiler.kineto_results.experimental_event_tree())
    return max(e.extra_fields.total_allocated for e in events
               if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu")


def test_generate_raises_naming_a_row_that_failed_inside_the_engine(tiny_models, monkeypatch):
    ours = init_inference(AutoModelForCausalLM.from_pretrained(tiny_models["llama2"][0]), kv_cache_memory=64 << 20)
    ids, mask = left_padded(random_prompts(ours.engine.arch.vocab_size, lengths=(5, 9)))
    kwargs = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=PAD)
    expected = ours.generate(ids, **kwargs)
    runner, calls = ours.engine.runner, []
    launch = runner.launch  # the engine queues each step there

    def third_step_fails(scheduler_output):
        calls.append(scheduler_output)
        if len(calls) == 3:  # both rows have 2 of their 8 tokens
            raise RuntimeError("injected fault")
        return launch(scheduler_output)

    monkeypatch.setattr(runner, "launch", third_step_fails)
    with pytest.raises(RequestFailedError, match=r"row 0 \(request 'inject-\d+'\) failed inside the engine: "
                                                 r"RuntimeError: injected fault"):
        ours.generate(ids, **kwargs)
    monkeypatch.undo()
    block_manager = ours.engine.block_manager
    assert not ours.engine.has_unfinished_requests() and block_manager.num_free_blocks == block_manager.num_blocks
    assert torch.equal(ours.generate(ids, **kwargs), expected)


def test_unsupported_architecture_is_named():
    bloom = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match=SUPPORTED_LIST):
        init_inference(bloom)
