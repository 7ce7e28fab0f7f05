import json

import pytest
import torch

from scaleinfer.errors import ModelLoadError
from scaleinfer.weights.safetensors import INDEX_NAME, iter_safetensors, safetensors_files


def _tiny_llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                         tie_word_embeddings=tie, initializer_range=0.2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_model():
    return _tiny_llama()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved_sharded(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("sharded")
    tiny_model.save_pretrained(folder, max_shard_size="20KB")
    return folder


def _assert_equals_state_dict(pairs, model):
    state_dict = model.state_dict()
    loaded = dict(pairs)
    assert len(loaded) == len(pairs)
    assert loaded.keys() == state_dict.keys()
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state_dict[name]), name


def test_iter_equals_state_dict(saved, tiny_model):
    _assert_equals_state_dict(list(iter_safetensors(saved, progress=False)), tiny_model)


def test_sharded_follows_index(saved_sharded, tiny_model):
    files = safetensors_files(saved_sharded)
    assert (saved_sharded / INDEX_NAME).is_file() and len(files) > 1
    _assert_equals_state_dict(list(iter_safetensors(saved_sharded, progress=False)), tiny_model)


def test_tied_model_has_no_lm_head(tmp_path):
    _tiny_llama(tie=True).save_pretrained(tmp_path)
    names = [name for name, _ in iter_safetensors(tmp_path, progress=False)]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


def test_progress_bar_goes_to_stderr(saved, capsys):
    list(iter_safetensors(saved, progress=True))
    captured = capsys.readouterr()
    assert "Loading safetensors" in captured.err and captured.out == ""


def _copy(src, dst):
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def test_truncated_file_names_it(saved, tmp_path):
    folder = _copy(saved, tmp_path / "m")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        list(iter_safetensors(folder, progress=False))


def test_corrupt_header_names_it(saved, tmp_path):
    folder = _copy(saved, tmp_path / "m")
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00" * 32  # inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        list(iter_safetensors(folder, progress=False))


def test_missing_shard_names_it(saved_sharded, tmp_path):
    folder = _copy(saved_sharded, tmp_path / "m")
    shard = safetensors_files(folder)[0]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=shard.name):
        list(iter_safetensors(folder, progress=False))


def test_index_naming_absent_tensor(saved_sharded, tmp_path):
    folder = _copy(saved_sharded, tmp_path / "m")
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"]["model.ghost.weight"] = safetensors_files(folder)[0].name
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="model.ghost.weight"):
        list(iter_safetensors(folder, progress=False))


def test_no_safetensors(tmp_path):
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        safetensors_files(tmp_path)


def test_pickle_checkpoint_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin.*pickle"):
        safetensors_files(tmp_path)
