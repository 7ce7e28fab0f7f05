"""The vLLM-style Python API on the embedded model and the packaged encoder: prompt dicts, content parts in chat,
the rendered prompt of a chat, the progress bar, embed()'s output objects, the thread count and the start-up line."""

from __future__ import annotations

import pytest
import torch

from scaleinfer import LLM, EmbeddingRequestOutput, SamplingParams
from scaleinfer.errors import InvalidRequestError
from scaleinfer.startup import engine_summary

GREEDY = SamplingParams(temperature=0, max_tokens=6)
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", dtype="float32", progress=False, num_threads=1, max_model_len=256, num_blocks=64)


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_prompt_dicts_token_ids_and_strings_mix_and_agree(llm):
    text = "The capital of France is"
    ids = llm.get_tokenizer().encode(text)
    outputs = llm.generate([text, {"prompt": text}, {"prompt_token_ids": ids}, ids], GREEDY, use_tqdm=False)
    assert len({tuple(t) for t in tokens(outputs)}) == 1
    assert [o.prompt for o in outputs] == [text, text, None, None]
    assert all(o.prompt_token_ids == ids for o in outputs)


def test_a_bad_prompt_dict_is_named_and_nothing_runs(llm):
    with pytest.raises(InvalidRequestError, match="prompt 1 has unknown keys"):
        llm.generate(["fine", {"text": "x"}], GREEDY, use_tqdm=False)
    assert llm.engine.stats().num_waiting == 0 and llm.engine.stats().num_running == 0


def test_chat_takes_text_content_parts_and_reports_the_rendered_prompt(llm):
    parts = [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]
    with_parts = llm.chat([{"role": "user", "content": parts}], GREEDY, use_tqdm=False)[0]
    plain = llm.chat([{"role": "user", "content": QUESTION}], GREEDY, use_tqdm=False)[0]
    assert with_parts.prompt_token_ids == plain.prompt_token_ids and tokens([with_parts]) == tokens([plain])
    assert with_parts.prompt.endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    tokenizer = llm.get_tokenizer()
    assert tokenizer.encode(with_parts.prompt, add_special_tokens=False) == with_parts.prompt_token_ids
    with pytest.raises(InvalidRequestError, match="only text content parts are supported, got type 'image_url'"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], GREEDY)


def test_chat_over_several_conversations_sets_each_prompt(llm):
    conversations = [[{"role": "user", "content": QUESTION}], [{"role": "user", "content": "Say hi."}]]
    outputs = llm.chat(conversations, GREEDY, use_tqdm=False)
    assert "France" in outputs[0].prompt and "Say hi." in outputs[1].prompt


class RecordingBar:
    made: list[RecordingBar] = []

    def __init__(self, **kwargs):
        self.kwargs, self.updates, self.postfix, self.closed = kwargs, 0, None, False
        self.format_dict = {"elapsed": 1.0}
        RecordingBar.made.append(self)

    def update(self, n):
        self.updates += n

    def close(self):
        self.closed = True


def test_progress_bar_counts_finished_prompts_with_token_rates(llm, capsys):
    RecordingBar.made.clear()
    outputs = llm.generate(["a", "b", "c"], GREEDY, use_tqdm=RecordingBar)
    (bar,) = RecordingBar.made
    assert (bar.kwargs["total"], bar.kwargs["desc"], bar.updates, bar.closed) == (3, "Processed prompts", 3, True)
    num_out = sum(len(t) for t in tokens(outputs))
    assert bar.postfix.endswith(f"output: {num_out:.2f} toks/s")
    llm.generate("a", GREEDY)  # the default: a real bar on stderr, as vLLM shows it
    assert "Processed prompts: 100%" in capsys.readouterr().err
    llm.generate("a", GREEDY, use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err


def test_threads_given_are_set_and_named_in_the_startup_line(llm):
    assert torch.get_num_threads() == 1
    line = engine_summary(llm.engine).line()
    assert "smollm2-135m (LlamaForCausalLM) on cpu, float32, KV cache 1,024 tokens, max_model_len 256" in line
    assert line.endswith("1 CPU thread")


@pytest.fixture(scope="module")
def minilm():
    return LLM("all-minilm-l6-v2", task="embed", device="cpu", progress=False)


def test_embed_returns_vllm_style_outputs_and_the_lists_stay_available(minilm):
    texts = ["a sentence", "another one"]
    outputs = minilm.embed(texts)
    assert all(isinstance(o, EmbeddingRequestOutput) and o.finished for o in outputs)
    assert [o.outputs.embedding for o in outputs] == minilm.embed_vectors(texts)
    assert [o.prompt for o in outputs] == texts and len(outputs[0].outputs.embedding) == 384
    ids = outputs[1].prompt_token_ids
    mixed = minilm.embed(["a sentence", {"prompt_token_ids": ids}, {"prompt": "another one"}])
    vectors = torch.tensor([o.outputs.embedding for o in mixed])
    assert torch.allclose(vectors[1], vectors[2], atol=1e-5) and mixed[1].prompt is None
    assert len(minilm.embed("one string")) == 1  # as vLLM: a single prompt


def test_embed_refuses_token_ids_past_the_limit_or_vocabulary(minilm):
    with pytest.raises(InvalidRequestError, match="prompt 0 has 513 token ids; the model takes at most"):
        minilm.embed({"prompt_token_ids": [101] * 513})
    with pytest.raises(InvalidRequestError, match=r"prompt 1: token ids must be in \[0, 30522\), got \[99999\]"):
        minilm.embed([[101], [99999]])
    with pytest.raises(InvalidRequestError, match="prompt 1 is empty"):
        minilm.embed(["fine", ""])
    assert len(minilm.embed([[101, 102]])[0].outputs.embedding) == 384  # token ids only: nothing to tokenize


def test_chat_renders_tools_through_the_template():
    """The prompt equals HF's rendering of the same template with tools= (the oracle), token for token."""
    from pathlib import Path

    template = Path(__file__).parent / "server" / "templates" / "hermes_tools.jinja"
    llm = LLM(device="cpu", dtype="float32", progress=False, num_threads=1, max_model_len=512, num_blocks=64,
              chat_template=str(template))
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": QUESTION}]
    with_tools, without = (llm.chat(messages, GREEDY, use_tqdm=False, tools=t)[0] for t in (tools, None))
    tokenizer = llm.get_tokenizer()
    expected = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert with_tools.prompt == expected and '"get_weather"' in with_tools.prompt
    assert '"get_weather"' not in without.prompt
    assert with_tools.prompt_token_ids == tokenizer.encode(expected, add_special_tokens=False)
