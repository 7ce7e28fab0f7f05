"""Load a model's tokenizer with transformers, from an HF folder or from a GGUF file's metadata.

For GGUF, transformers converts tokenizer.ggml.* (vocab, merges, special ids) into a fast tokenizer and
carries tokenizer.chat_template over; `chat_template` covers files or versions where it does not.
transformers is imported inside the loaders: it takes seconds, and importing this module should not.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaleinfer.config import ModelConfig, cache_dir
from scaleinfer.errors import InvalidRequestError, ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Any one of these makes a folder loadable by AutoTokenizer without the hub.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path: Path, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """Tokenizer of an HF model folder or a .gguf file; `chat_template` is set when it has none."""
    tokenizer = _from_gguf(path) if path.suffix == ".gguf" else _from_folder(path)
    if tokenizer.chat_template is None and chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def tokenizer_for(source: Any, config: ModelConfig) -> PreTrainedTokenizerBase | None:
    """The model's tokenizer (source.load_tokenizer()), or config.tokenizer's; config.chat_template replaces its
    template. None for a source without one (init_inference's HF model object)."""
    if config.tokenizer is not None:
        path = Path(config.tokenizer).expanduser()
        if not path.exists():
            raise ModelLoadError(f"tokenizer path {path} does not exist")
        tokenizer = load_tokenizer(path)
    else:
        tokenizer = source.load_tokenizer()
    if tokenizer is not None and config.chat_template is not None:
        tokenizer.chat_template = read_chat_template(config.chat_template)
    return tokenizer


def read_chat_template(value: str) -> str:
    """A chat template given as a file path (its contents) or as the Jinja template itself (as vLLM takes it)."""
    path = Path(value).expanduser()
    with contextlib.suppress(OSError):  # a long template string is no file name
        if path.is_file():
            return path.read_text()
    if "{" in value:
        return value
    raise InvalidRequestError(f"chat_template {value!r} is neither a file nor a Jinja template")


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]],
                        add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Prompt token ids of a chat, rendered with the tokenizer's own template; tools: OpenAI's tool dicts,
    which the template renders (HF's `tools=`)."""
    if not tokenizer.chat_template:
        raise InvalidRequestError(f"tokenizer of {tokenizer.name_or_path!r} has no chat template")
    # return_dict=False: transformers 5 returns a BatchEncoding by default when tokenizing
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                        tokenize=True, return_dict=False, tools=tools)
    return list(ids)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]],
                add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text the chat template makes of a chat (what apply_chat_template tokenizes)."""
    if not tokenizer.chat_template:
        raise InvalidRequestError(f"tokenizer of {tokenizer.name_or_path!r} has no chat template")
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                         tokenize=False, tools=tools)


def _from_folder(folder: Path) -> PreTrainedTokenizerBase:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{folder} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer in {folder}: {exc}") from exc


def _from_gguf(path: Path) -> PreTrainedTokenizerBase:
    """Converting a GGUF vocabulary takes seconds, so the result is kept as tokenizer.json in the cache,
    under a key of the file's path, size and modification time, and loaded from there next time."""
    from transformers import AutoTokenizer

    cached = _cache_folder(path)
    if cached is not None and (cached / "tokenizer.json").is_file():
        with contextlib.suppress(OSError, ValueError, KeyError):
            return AutoTokenizer.from_pretrained(str(cached))
    where = f"; kept in {cached} for the next start" if cached is not None else ""
    print(f"scaleinfer: converting the vocabulary of {path.name} to a tokenizer (seconds{where})", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of GGUF file {path}: {exc}") from exc
    if cached is not None:
        with contextlib.suppress(OSError):  # a read-only cache only costs the next start its seconds
            tokenizer.save_pretrained(str(cached))
    return tokenizer


def _cache_folder(path: Path) -> Path | None:
    root = cache_dir()
    if root is None:
        return None
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    return root / "tokenizers" / key
