import json

import pytest

from scaleinfer.config import ModelConfig
from scaleinfer.errors import InvalidRequestError, ModelLoadError
from scaleinfer.tokenizer import apply_chat_template, load_tokenizer, tokenizer_for
from scaleinfer.weights.source import ModelSource, embedded_model_path

TEXTS = ["Hello world!", "héllo wörld 🇫🇷 👨‍👩‍👧 你好", "  leading spaces\n\ttabs and <|im_end|> in text"]
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gguf_tokenizer():
    return load_tokenizer(embedded_model_path())


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory, gguf_tokenizer):
    folder = tmp_path_factory.mktemp("tok")
    gguf_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_round_trip(gguf_tokenizer, text):
    ids = gguf_tokenizer.encode(text, add_special_tokens=False)
    assert gguf_tokenizer.decode(ids) == text


def test_gguf_special_tokens(gguf_tokenizer):
    assert gguf_tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert gguf_tokenizer.eos_token_id == 2
    assert gguf_tokenizer.encode("<|im_end|>", add_special_tokens=False) == [2]


def test_gguf_chat_template(gguf_tokenizer):
    ids = apply_chat_template(gguf_tokenizer, CHAT)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    text = gguf_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nhi<|im_end|>\n"
                                                                     "<|im_start|>assistant\n")
    assert ids[0] == 1


def test_folder_tokenizer_matches(gguf_tokenizer, saved_folder):
    tokenizer = load_tokenizer(saved_folder)
    for text in TEXTS:
        assert tokenizer.encode(text) == gguf_tokenizer.encode(text)
    assert apply_chat_template(tokenizer, CHAT) == apply_chat_template(gguf_tokenizer, CHAT)


def test_model_source_loads_folder_tokenizer(saved_folder):
    source = ModelSource(saved_folder, "safetensors", arch=None)  # arch is not needed for the tokenizer
    assert source.load_tokenizer().encode("hi") == load_tokenizer(saved_folder).encode("hi")


def _without_template(src, dst):
    dst.mkdir()
    for path in src.iterdir():
        if path.name != "chat_template.jinja":
            (dst / path.name).write_bytes(path.read_bytes())
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


def test_chat_template_fallback(saved_folder, gguf_tokenizer, tmp_path):
    folder = _without_template(saved_folder, tmp_path / "t")
    assert load_tokenizer(folder).chat_template is None
    tokenizer = load_tokenizer(folder, chat_template=gguf_tokenizer.chat_template)
    assert apply_chat_template(tokenizer, CHAT) == apply_chat_template(gguf_tokenizer, CHAT)


def test_no_chat_template_is_a_request_error(saved_folder, tmp_path):
    tokenizer = load_tokenizer(_without_template(saved_folder, tmp_path / "t"))
    with pytest.raises(InvalidRequestError, match="chat template"):
        apply_chat_template(tokenizer, CHAT)


def test_folder_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


def test_gguf_tokenizer_is_cached_and_equal(monkeypatch, tmp_path, gguf_tokenizer):
    monkeypatch.setenv("SCALEINFER_CACHE_DIR", str(tmp_path))
    first = load_tokenizer(embedded_model_path())  # converts, then saves
    assert list(tmp_path.glob("tokenizers/*/tokenizer.json"))
    second = load_tokenizer(embedded_model_path())  # from the cache
    text = "Hello, world! 😀 naïve café\n\tcode()"
    assert first.encode(text) == second.encode(text) == gguf_tokenizer.encode(text)
    assert second.chat_template == gguf_tokenizer.chat_template
    assert (second.bos_token_id, second.eos_token_id) == (gguf_tokenizer.bos_token_id, gguf_tokenizer.eos_token_id)


def test_cache_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv("SCALEINFER_CACHE_DIR", "")
    from scaleinfer.config import cache_dir

    assert cache_dir() is None


class _NoTokenizerSource:
    """A model source whose own tokenizer must not be loaded (--tokenizer replaces it)."""

    def load_tokenizer(self):
        raise AssertionError("the model's tokenizer was loaded")


def test_tokenizer_option_loads_another_folder_and_chat_template_replaces_its_template(saved_folder, tmp_path):
    tokenizer = tokenizer_for(_NoTokenizerSource(), ModelConfig(tokenizer=str(saved_folder)))
    assert tokenizer.encode("hi") == load_tokenizer(saved_folder).encode("hi")
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    as_string = tokenizer_for(_NoTokenizerSource(), ModelConfig(tokenizer=str(saved_folder), chat_template=template))
    (tmp_path / "t.jinja").write_text(template)
    as_file = tokenizer_for(_NoTokenizerSource(), ModelConfig(tokenizer=str(saved_folder),
                                                              chat_template=str(tmp_path / "t.jinja")))
    expected = tokenizer.encode("<user>hi", add_special_tokens=False)
    assert apply_chat_template(as_string, CHAT) == apply_chat_template(as_file, CHAT) == expected


def test_tokenizer_and_chat_template_options_refuse_what_they_cannot_read(saved_folder, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        tokenizer_for(_NoTokenizerSource(), ModelConfig(tokenizer=str(tmp_path / "nope")))
    with pytest.raises(InvalidRequestError, match="neither a file nor a Jinja template"):
        tokenizer_for(_NoTokenizerSource(), ModelConfig(tokenizer=str(saved_folder), chat_template="no/such.jinja"))
