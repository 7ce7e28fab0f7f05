"""LLM(task="embed"): packed encoder embeddings against transformers' AutoModel with mean pooling."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scaleinfer import LLM
from scaleinfer.errors import InvalidRequestError, UnsupportedArchitectureError
from scaleinfer.worker.embedding_runner import batches

TEXTS = [
    "Hello world",
    "A much longer sentence about embeddings, packing and attention, with enough words to span many tokens.",
    "x",
    "The quick brown fox jumps over the lazy dog.",
    "embeddings of sentences",
]
WORDS = sorted({word for text in TEXTS for word in re.findall(r"\w+|[^\w\s]", text.lower())})
TINY_BERT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, initializer_range=0.2)


def hf_embeddings(folder: Path, texts: list[str], pooling: str = "mean") -> torch.Tensor:
    """The oracle: transformers on a padded batch, then mean (or CLS) pooling and L2 normalization."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state  # [batch, max_len, hidden]
    mask = encoded["attention_mask"][..., None].float()
    pooled = hidden[:, 0] if pooling == "cls" else (hidden * mask).sum(1) / mask.sum(1)
    return F.normalize(pooled, dim=-1)


def assert_close_cosine(ours: list[list[float]], reference: torch.Tensor) -> None:
    cosine = (torch.tensor(ours) * reference).sum(-1)
    assert cosine.min().item() > 0.9999, cosine


def save_tiny_bert(folder: Path, architecture: str = "BertModel") -> None:
    """A random BERT (or RoBERTa) with a word-piece tokenizer of WORDS, saved as an HF folder."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    config_class = transformers.RobertaConfig if architecture.startswith("Roberta") else transformers.BertConfig
    config = config_class(vocab_size=len(tokenizer), pad_token_id=0, **TINY_BERT)
    torch.manual_seed(0)
    getattr(transformers, architecture)(config).eval().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def minilm() -> LLM:
    return LLM("all-minilm-l6-v2", task="embed", device="cpu", progress=False)


def test_minilm_matches_transformers(minilm):
    from scaleinfer.weights.source import encoder_model_path

    assert_close_cosine(minilm.embed_vectors(TEXTS), hf_embeddings(encoder_model_path(), TEXTS))


def test_minilm_through_the_attention_kernel_matches_transformers(minilm):
    """The packed batch through kernels/encoder_attention.py's Triton kernel (the interpreter off the GPU)."""
    from scaleinfer.kernels.dispatch import HAS_TRITON, force_triton
    from scaleinfer.weights.source import encoder_model_path

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    with force_triton():
        vectors = minilm.embed_vectors(TEXTS)
    assert_close_cosine(vectors, hf_embeddings(encoder_model_path(), TEXTS))


def test_batch_equals_one_at_a_time(minilm):
    batch = torch.tensor(minilm.embed_vectors(TEXTS))
    alone = torch.tensor([minilm.embed_vectors([text])[0] for text in TEXTS])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.norm(dim=-1), torch.ones(len(TEXTS)))


def test_small_token_budget_splits_batches(minilm):
    runner = minilm.embedder
    whole = torch.tensor(minilm.embed_vectors(TEXTS))
    budgets = runner.max_num_tokens, runner.max_num_seqs
    runner.max_num_tokens, runner.max_num_seqs = runner.max_seq_len, 2  # three batches, same vectors
    try:
        split = torch.tensor(minilm.embed_vectors(TEXTS))
    finally:
        runner.max_num_tokens, runner.max_num_seqs = budgets
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=0)


def test_batches_fill_the_token_budget_in_order():
    assert list(batches([[1] * 3, [1] * 3, [1] * 5, [1] * 9], max_num_tokens=6, max_num_seqs=8)) == [[0, 1], [2], [3]]
    assert list(batches([[1]] * 5, max_num_tokens=100, max_num_seqs=2)) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("architecture", ["BertModel", "RobertaForMaskedLM"])
def test_tiny_random_encoder_matches_transformers(tmp_path, architecture):
    save_tiny_bert(tmp_path, architecture)
    llm = LLM(str(tmp_path), task="embed", device="cpu", progress=False)
    reference = hf_embeddings(tmp_path, TEXTS)
    if architecture == "RobertaForMaskedLM":  # RoBERTa positions start at pad_token_id + 1
        assert llm.embedder.config.position_offset == 1
    assert_close_cosine(llm.embed_vectors(TEXTS), reference)


def test_cls_pooling_from_modules_json(tmp_path):
    save_tiny_bert(tmp_path)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    modules = [{"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    llm = LLM(str(tmp_path), task="embed", device="cpu", progress=False)
    assert llm.embedder.pooling == "cls"
    assert_close_cosine(llm.embed_vectors(TEXTS), hf_embeddings(tmp_path, TEXTS, pooling="cls"))


def test_task_errors_name_the_task(tmp_path, minilm, tiny_models):
    with pytest.raises(InvalidRequestError, match="task='generate'.*task='embed'"):
        minilm.generate("hello")
    with pytest.raises(InvalidRequestError, match="task"):
        LLM("all-minilm-l6-v2", task="classify")
    with pytest.raises(InvalidRequestError, match="non-empty list"):
        minilm.embed_vectors("one string, not a list")
    save_tiny_bert(tmp_path / "bert")
    with pytest.raises(UnsupportedArchitectureError, match="BertModel.*task='embed'"):
        LLM(str(tmp_path / "bert"), device="cpu", progress=False)
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM.*BertModel"):
        LLM(str(tiny_models["llama2"][0]), task="embed", device="cpu", progress=False)


def test_embed_on_a_generate_llm_names_the_task(tiny_models):
    llm = LLM(str(tiny_models["llama2"][0]), device="cpu", num_blocks=8, progress=False)
    with pytest.raises(InvalidRequestError, match="task='embed'.*task='generate'"):
        llm.embed_vectors(TEXTS)
