"""serve prints the start-up line generate, chat and LLM() print (model, architecture, device, dtype, KV-cache
tokens, max_model_len): from the engine core's process under --task generate, before the front's URL line; from
the embedder under --task embed."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaleinfer.config import CacheConfig, EngineConfig
from scaleinfer.engine.async_embedder import AsyncEmbedder

pytestmark = pytest.mark.slow


def test_run_server_prints_the_core_startup_line_before_its_url(_admission_process, admission_server):
    """The admission server (conftest): run_server in a process of its own, 64 KV blocks, max_model_len 256."""
    log = Path(_admission_process.log_path).read_text()
    kv_tokens = 64 * CacheConfig().block_size
    expected = f"smollm2-135m (LlamaForCausalLM) on cpu, float32, KV cache {kv_tokens:,} tokens, max_model_len 256"
    lines = log.splitlines()
    startup = [i for i, line in enumerate(lines) if line.startswith("scaleinfer 0") and expected in line]
    serving = [i for i, line in enumerate(lines) if line.startswith("scaleinfer: serving")]
    assert len(startup) == 1 and len(serving) == 1 and startup[0] < serving[0], log


def test_embed_server_engine_prints_its_startup_line(capsys):
    embedder = AsyncEmbedder.from_config(EngineConfig.from_kwargs(model="all-minilm-l6-v2", device="cpu"))
    try:
        err = capsys.readouterr().err
        expected = f"all-minilm-l6-v2 (BertModel) on cpu, float32, no KV cache, max_model_len {embedder.max_model_len}"
        assert embedder.max_model_len == 256 and expected in err, err  # its sentence-transformers max_seq_length
    finally:
        embedder.shutdown()
