"""bench/compile_moe_decode.py, without a GPU: the MoE decode GEMVs at their default tiles (GPU_CONFIG) compile for
sm90 with no register spills. Run in a child process: the tests' TRITON_INTERPRET=1 replaces Triton's compiler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_default_tiles_compile_for_sm90_without_spills():
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": str(ROOT), "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "bench/compile_moe_decode.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if "cuobjdump" in done.stderr and "No such file" in done.stderr:
        pytest.skip("this triton wheel has no cuobjdump")
    assert done.returncode == 0, done.stderr[-2000:]
    costs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [cost["kernel"] for cost in costs] == ["gate_up", "down"]
    for cost in costs:
        assert cost["stack_bytes"] == 0 and 0 < cost["registers"] <= 255, cost
