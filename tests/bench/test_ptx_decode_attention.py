"""bench/ptx_decode_attention.py, without a GPU: the decode partition kernel over an e4m3 cache, compiled for sm90,
reads its V tile back from shared memory 16 bits wide (ldmatrix.trans, as a bf16 cache does), never a byte a load,
and spills nothing. Run in a child process: the tests' TRITON_INTERPRET=1 replaces Triton's compiler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRANS = "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"
SCRIPT = """
import json, sys
sys.path.insert(0, "bench")
from ptx_decode_attention import instruction_counts
print(json.dumps({cache: instruction_counts(cache, 90, 2) for cache in ("*bf16", "*fp8e4nv")}))
"""


def test_fp8_cache_v_tile_leaves_shared_memory_16_bits_wide():
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": str(ROOT), "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    if "cuobjdump" in done.stderr and "No such file" in done.stderr:
        pytest.skip("this triton wheel has no cuobjdump")
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(done.stdout.splitlines()[-1])
    bf16, fp8 = counts["*bf16"], counts["*fp8e4nv"]
    assert not [op for op in fp8["shared_loads"] if op.endswith((".b8", ".u8", ".s8"))], fp8["shared_loads"]
    assert fp8["ldmatrix"].get(TRANS, 0) == bf16["ldmatrix"][TRANS] > 0, (fp8["ldmatrix"], bf16["ldmatrix"])
    assert "cp.async.ca.shared.global" not in fp8["async_copies"], fp8["async_copies"]  # 16-byte copies only
    for resources in (bf16["resources"], fp8["resources"]):
        assert resources["stack_bytes"] == 0 and 0 < resources["registers"] <= 255, resources
