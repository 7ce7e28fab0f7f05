import pytest

from scaleinfer.engine.detokenizer import IncrementalDetokenizer
from scaleinfer.sampling_params import SamplingParams

EOS = 256  # the byte tokenizer's one special token


class ByteTokenizer:
    """Token i < 256 is byte i; EOS is special. Decodes like a byte-level BPE tokenizer: bytes that do
    not complete a UTF-8 character come out as U+FFFD. With strip_first_space it drops the text's leading
    space, as SentencePiece decoders do."""

    def __init__(self, strip_first_space: bool = False):
        self.strip_first_space = strip_first_space

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        pieces, data = [], b""
        for token_id in token_ids:
            if token_id == EOS:
                pieces.append(data.decode("utf-8", errors="replace"))
                pieces.append("" if skip_special_tokens else "<eos>")
                data = b""
            else:
                data += bytes([token_id])
        text = "".join(pieces) + data.decode("utf-8", errors="replace")
        return text[1:] if self.strip_first_space and text.startswith(" ") else text


def stream(tokenizer, ids, prompt_ids=(), finish=True, **params):
    """Feed ids one at a time; returns (detokenizer, deltas)."""
    detok = IncrementalDetokenizer(tokenizer, list(prompt_ids), SamplingParams(**params))
    deltas = []
    for token_id in ids:
        detok.update([token_id])
        deltas.append(detok.delta())
    if finish:
        detok.finish()
        deltas.append(detok.delta())
    return detok, deltas


def test_multibyte_character_waits_for_its_last_byte():
    tok = ByteTokenizer()
    detok, deltas = stream(tok, tok.encode("a😀b"))
    assert deltas == ["a", "", "", "", "😀", "b", ""]
    assert detok.output_text == "a😀b" and detok.stop_str is None


def test_incomplete_character_is_flushed_at_finish():
    tok = ByteTokenizer()
    detok, deltas = stream(tok, tok.encode("ok😀")[:-1])
    assert "".join(deltas) == detok.output_text == "ok\ufffd"
    assert all("\ufffd" not in d for d in deltas[:-1])


def test_stop_string_across_tokens():
    tok = ByteTokenizer()
    detok, deltas = stream(tok, tok.encode("hello world"), stop=["lo w"])
    assert detok.output_text == "hel" and detok.stop_str == "lo w" and detok.finished
    assert "".join(deltas) == "hel"


def test_include_stop_str_in_output():
    tok = ByteTokenizer()
    detok, deltas = stream(tok, tok.encode("hello world"), stop=["lo w"], include_stop_str_in_output=True)
    assert detok.output_text == "hello w" and "".join(deltas) == "hello w"


def test_update_reports_the_stop_once():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["cd"]))
    assert detok.update(tok.encode("abc")) is None
    assert detok.update(tok.encode("de")) == "cd"
    assert detok.update(tok.encode("more")) is None
    assert detok.output_text == "ab"


def test_stop_inside_one_update_cuts_the_rest():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["STOP"]))
    assert detok.update(tok.encode("text STOP trailing")) == "STOP"
    assert detok.output_text == "text " and detok.delta() == "text "


def test_first_stop_to_complete_wins():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["abcd", "bc"]))
    assert detok.update(tok.encode("xabcd")) == "bc" and detok.output_text == "xa"
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["c", "abc"]))
    assert detok.update(tok.encode("xabc")) == "abc" and detok.output_text == "x"


def test_stop_prefix_is_held_then_released():
    tok = ByteTokenizer()
    detok, deltas = stream(tok, tok.encode("abxyq"), stop=["xyz"])
    assert deltas == ["a", "b", "", "", "xyq", ""]
    assert detok.stop_str is None


def test_held_text_is_not_lost_at_finish():
    tok = ByteTokenizer()
    detok, deltas = stream(tok, tok.encode("abxy"), stop=["xyz"])
    assert deltas == ["a", "b", "", "", "xy"] and detok.output_text == "abxy"


def test_no_holdback_when_stop_is_included():
    tok = ByteTokenizer()
    _, deltas = stream(tok, tok.encode("abxy"), stop=["xyz"], include_stop_str_in_output=True, finish=False)
    assert deltas == ["a", "b", "x", "y"]


def test_multibyte_stop_string():
    tok = ByteTokenizer()
    detok, deltas = stream(tok, tok.encode("ça va 😀 bien"), stop=["😀"])
    assert detok.output_text == "ça va " and "".join(deltas) == "ça va "


@pytest.mark.parametrize("skip, expected", [(True, "ab"), (False, "a<eos>b")])
def test_skip_special_tokens(skip, expected):
    tok = ByteTokenizer()
    detok, deltas = stream(tok, [ord("a"), EOS, ord("b")], skip_special_tokens=skip)
    assert detok.output_text == expected == "".join(deltas)


@pytest.mark.parametrize("include, expected", [(False, "hi"), (True, "hi<eos>")])
def test_stop_terminated_token_text(include, expected):
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], SamplingParams(skip_special_tokens=False,
                                                           include_stop_str_in_output=include))
    detok.update(tok.encode("hi"))
    detok.update([EOS], stop_terminated=True)
    detok.finish()
    assert detok.output_text == expected


def test_prompt_context_keeps_first_token_spacing():
    tok = ByteTokenizer(strip_first_space=True)
    detok, deltas = stream(tok, tok.encode(" world"), prompt_ids=tok.encode(" hello"))
    assert detok.output_text == " world" == "".join(deltas)
    detok, _ = stream(tok, tok.encode(" world"), prompt_ids=[])
    assert detok.output_text == "world"


# ---- the real SmolLM2 tokenizer: byte-level BPE, emoji split over several tokens -----------------------


@pytest.fixture(scope="module")
def smollm2():
    from scaleinfer.tokenizer import load_tokenizer
    from scaleinfer.weights.source import embedded_model_path

    return load_tokenizer(embedded_model_path())


TEXT = "Sure! Here's 😀 and 👨‍👩‍👧, 你好世界, naïve café — done. Then STOP here."


def test_deltas_concatenate_to_decode(smollm2):
    ids = smollm2.encode(TEXT, add_special_tokens=False)
    detok, deltas = stream(smollm2, ids, prompt_ids=smollm2.encode("<|im_start|>assistant\n"))
    assert "".join(deltas) == detok.output_text == smollm2.decode(ids) == TEXT
    assert all("\ufffd" not in d for d in deltas)
    assert any(d == "" for d in deltas)  # some emoji bytes had to wait


def test_real_stop_string_across_tokens(smollm2):
    ids = smollm2.encode(TEXT, add_special_tokens=False)
    detok, deltas = stream(smollm2, ids, stop=["界, na"])
    assert detok.stop_str == "界, na" and detok.output_text == "".join(deltas) == TEXT[:TEXT.index("界, na")]


def test_real_eos_is_not_output(smollm2):
    ids = smollm2.encode("Bye 👋", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm2, [1], SamplingParams(skip_special_tokens=False))
    for token_id in ids:
        detok.update([token_id])
    detok.update([smollm2.eos_token_id], stop_terminated=True)
    detok.finish()
    assert detok.output_text == "Bye 👋"
