"""Engine options: random weights from a config alone (benchmark shapes), token-ids-only engines."""

import json

import pytest

from scaleinfer import LLM, SamplingParams
from scaleinfer.errors import InvalidRequestError


@pytest.fixture(scope="module")
def config_only(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("config_only")
    config = json.loads((tiny_models["llama3.1"][0] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_dummy_weights_and_token_ids_only(config_only):
    llm = LLM(model=str(config_only), device="cpu", load_format="dummy", skip_tokenizer_init=True, progress=False)
    out = llm.generate([[5, 6, 7], [8, 9]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in out] == [5, 5]
    assert out[0].outputs[0].text == ""
    with pytest.raises(InvalidRequestError, match="text prompts need a tokenizer"):
        llm.generate("hello")
    with pytest.raises(InvalidRequestError, match="stop strings"):
        llm.generate([[5]], SamplingParams(stop=["x"]))


def test_config_only_folder_needs_dummy(config_only):
    with pytest.raises(Exception, match="safetensors"):
        LLM(model=str(config_only), device="cpu", progress=False)


def test_unknown_engine_option_is_named():
    with pytest.raises(InvalidRequestError, match="bogus"):
        LLM(bogus=1)
