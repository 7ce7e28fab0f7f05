import gguf
import numpy as np
import pytest
import torch

from scaleinfer.errors import ModelLoadError, UnsupportedArchitectureError
from scaleinfer.weights.gguf import BLOCK_NAMES, TOP_LEVEL_NAMES, open_gguf, unpermute_rope
from scaleinfer.weights.source import embedded_model_path, resolve_model

TO_GGUF_BLOCK = {hf: gg for gg, hf in BLOCK_NAMES.items()}
TO_GGUF_TOP = {hf: gg for gg, hf in TOP_LEVEL_NAMES.items()}


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name in TO_GGUF_TOP:
        return TO_GGUF_TOP[hf_name]
    _, _, layer, *module, kind = hf_name.split(".")
    return f"blk.{layer}.{TO_GGUF_BLOCK['.'.join(module)]}.{kind}"


def tiny_model(family: str = "llama", tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config,
                                                                                          Qwen2ForCausalLM)
    config = config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=96, max_position_embeddings=128,
                          rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie, initializer_range=0.2)
    torch.manual_seed(0)
    return model_class(config).eval()


def write_gguf(path, model, arch: str = "llama", permute: bool = True, f16_names: tuple[str, ...] = ()):
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(3)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.numpy()
        if permute and ".q_proj." in name:
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif permute and ".k_proj." in name:
            array = llama_cpp_permute(array, config.num_key_value_heads)
        writer.add_tensor(gguf_name(name), array.astype(np.float16 if name in f16_names else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory, llama):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", llama)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    permuted = llama_cpp_permute(w, 3)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(unpermute_rope(permuted, 3), w)
    assert np.array_equal(unpermute_rope(llama_cpp_permute(w[:, 0], 3), 3), w[:, 0])  # biases


def test_tiny_llama_arch(llama_gguf):
    arch = open_gguf(llama_gguf).arch
    assert (arch.architecture, arch.vocab_size, arch.hidden_size, arch.intermediate_size) == (
        "LlamaForCausalLM", 96, 32, 64)
    assert (arch.num_hidden_layers, arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim) == (
        2, 4, 2, 8)
    assert (arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling) == (128, 50000.0, None)
    assert arch.rms_norm_eps == pytest.approx(1e-5)
    assert not arch.tie_word_embeddings and not arch.attention_bias
    assert arch.bos_token_id == 1 and arch.eos_token_ids == (2, 3)


def test_tiny_llama_weights_equal_hf(llama_gguf, llama):
    state_dict = llama.state_dict()
    loaded = dict(open_gguf(llama_gguf).iter_weights(torch.float32, progress=False))
    assert loaded.keys() == state_dict.keys()
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state_dict[name]), name


def test_dtype_and_f16_tensors(tmp_path, llama):
    f16 = "model.layers.0.self_attn.q_proj.weight"
    path = write_gguf(tmp_path / "f16.gguf", llama, f16_names=(f16,))
    loaded = dict(open_gguf(path).iter_weights(torch.bfloat16, progress=False))
    assert all(t.dtype == torch.bfloat16 for t in loaded.values())
    expected = llama.state_dict()[f16].half().to(torch.bfloat16)
    assert torch.equal(loaded[f16], expected)


def test_tiny_qwen2_is_unpermuted_with_bias(tmp_path):
    model = tiny_model("qwen2", tie=True)
    source = resolve_model(str(write_gguf(tmp_path / "qwen.gguf", model, arch="qwen2", permute=False)))
    assert source.format == "gguf" and source.arch.architecture == "Qwen2ForCausalLM"
    assert source.arch.attention_bias and source.arch.tie_word_embeddings
    loaded = dict(source.iter_weights(torch.float32, progress=False))
    state_dict = model.state_dict()
    assert loaded.keys() == state_dict.keys() - {"lm_head.weight"}
    assert all(torch.equal(t, state_dict[n]) for n, t in loaded.items())


def test_truncated_gguf_names_file(llama_gguf, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(llama_gguf.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        open_gguf(path)


@pytest.mark.parametrize("offset", [0, 24, 40])  # magic, first key length, inside the first key
def test_corrupt_gguf_names_file(llama_gguf, tmp_path, offset):
    data = bytearray(llama_gguf.read_bytes())
    data[offset:offset + 8] = b"\xff" * 8
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        open_gguf(path)


def test_unsupported_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*gpt2.gguf|gpt2.gguf.*'gpt2'"):
        open_gguf(tmp_path / "gpt2.gguf")


# ---- the embedded SmolLM2-135M-Instruct (Q4_1 / Q8_0), against transformers' own GGUF loader ----------


@pytest.fixture(scope="module")
def embedded():
    return resolve_model("smollm2-135m")


def test_embedded_arch(embedded):
    arch = embedded.arch
    assert embedded.format == "gguf" and embedded.path == embedded_model_path()
    assert (arch.architecture, arch.num_hidden_layers, arch.hidden_size, arch.intermediate_size) == (
        "LlamaForCausalLM", 30, 576, 1536)
    assert (arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim, arch.vocab_size) == (9, 3, 64, 49152)
    assert arch.tie_word_embeddings and arch.rope_theta == 100000.0 and arch.max_position_embeddings == 8192
    assert (arch.bos_token_id, arch.eos_token_ids) == (1, (2,))
    assert embedded.gguf_file.chat_template.startswith("{% for message in messages %}")


class _FlatNames(torch.nn.Module):
    """A model's state-dict names with no child modules. transformers' GGUF name mapper recurses into every
    child and rebuilds gguf's name table for each (~400 times for SmolLM2, 10+ s on 2 cores); the names
    from the top level alone map the same."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.config = model.config
        self._names = model.state_dict()

    def state_dict(self, *args, **kwargs):
        return self._names

    def named_children(self):
        return []


def _transformers_gguf_state_dict(path, arch) -> dict[str, torch.Tensor]:
    """transformers' own GGUF weights: load_gguf_checkpoint is what from_pretrained(gguf_file=...) calls to
    build the state dict. Called directly, it skips a second metadata parse and the model build; renaming,
    dequantization and q/k un-permutation (with head counts from its own parse) are all transformers'."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = LlamaConfig(hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
                         num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
                         num_key_value_heads=arch.num_key_value_heads, vocab_size=arch.vocab_size)
    with torch.device("meta"):
        skeleton = _FlatNames(LlamaForCausalLM(config))
    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]


@pytest.mark.slow
def test_embedded_weights_equal_transformers_gguf_load(embedded):
    expected = _transformers_gguf_state_dict(embedded.path, embedded.arch)
    names = set()
    for name, tensor in embedded.iter_weights(torch.float32, progress=False):
        # both dequantize with gguf.quants, so equality is exact, not merely within 1e-6
        assert tensor.shape == expected[name].shape and torch.equal(tensor, expected[name]), name
        names.add(name)
    assert names == expected.keys()  # tied: neither has lm_head.weight
