"""SamplingParams.prompt_logprobs through LLM.generate against HF transformers' log_softmax on the same tiny
Llama: prompts prefilled in chunks over several steps, a repeated prompt that would hit the prefix cache,
n > 1, and a one-token prompt."""

import pytest
import torch

from scaleinfer import LLM, SamplingParams
from scaleinfer.errors import InvalidRequestError


@pytest.fixture(scope="module")
def tiny_llama(tiny_models):
    folder, hf_model = tiny_models["llama3.1"]
    # 16-token budget: a 40-token prompt takes three steps; 16-token blocks make the repeat a prefix-cache hit
    llm = LLM(model=str(folder), device="cpu", dtype="float32", max_num_batched_tokens=16, block_size=16,
              progress=False)
    return llm, hf_model


def _expected(hf_model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([token_ids])).logits[0].float(), dim=-1)


def test_prompt_logprobs_equal_hf_in_chunks_and_past_the_prefix_cache(tiny_llama):
    llm, hf_model = tiny_llama
    prompt = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    first, = llm.generate([prompt], params)
    again, plain = llm.generate([prompt, prompt],
                                [params, SamplingParams(temperature=0, max_tokens=2)])
    expected = _expected(hf_model, prompt)
    for output in (first, again):
        entries = output.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None
        for pos, entry in enumerate(entries[1:], 1):
            token = prompt[pos]
            row = expected[pos - 1]
            assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
            assert entry[token].rank == int((row > row[token]).sum()) + 1
            top = row.topk(2).indices.tolist()
            assert set(entry) == {token, *top} and entry[token].decoded_token is not None
            assert [entry[t].rank for t in top] == [1, 2]
    assert again.metrics.num_cached_tokens == 0  # it asked for prompt logprobs: no prefix-cache hit
    assert plain.prompt_logprobs is None and plain.metrics.num_cached_tokens > 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == plain.outputs[0].token_ids


def test_n_two_a_one_token_prompt_and_zero_alternatives(tiny_llama):
    llm, _ = tiny_llama
    two, one = llm.generate([[5, 6, 7], [9]],
                            SamplingParams(n=2, max_tokens=2, prompt_logprobs=0, seed=1))
    assert [sorted(entry) for entry in two.prompt_logprobs[1:]] == [[6], [7]]  # the prompt token alone
    assert two.prompt_logprobs[0] is None and len(two.outputs) == 2
    assert one.prompt_logprobs == [None]


def test_prompt_logprobs_bounds():
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(InvalidRequestError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


@pytest.mark.gpu
def test_prompt_logprobs_on_cuda_beside_graph_decodes(tiny_models):
    """On a GPU with CUDA graphs: a long prompt's chunks run while another request decodes; values equal HF's."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    folder, hf_model = tiny_models["llama3.1"]
    llm = LLM(model=str(folder), device="cuda", dtype="float32", max_num_batched_tokens=16, progress=False,
              kv_cache_memory=1 << 30)
    prompt = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(7)).tolist()
    plain, scored = llm.generate([[1, 2, 3], prompt], [SamplingParams(temperature=0, max_tokens=24),
                                                      SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1)])
    expected = _expected(hf_model, prompt)
    got = torch.tensor([entry[token].logprob for token, entry in zip(prompt[1:], scored.prompt_logprobs[1:])])
    want = expected[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    assert plain.prompt_logprobs is None and len(plain.outputs[0].token_ids) == 24
