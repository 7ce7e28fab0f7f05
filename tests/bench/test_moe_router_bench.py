"""bench/compile_moe_router.py without a GPU: the router kernel at the models' expert counts compiles for sm90 with
no register spills and no shared memory (run in a child process: the tests' TRITON_INTERPRET=1 replaces Triton's
compiler). And bench/moe_decode_tiles.py's router rows on a CPU (the kernel in the interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))


def test_router_compiles_for_sm90_without_spills():
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": str(ROOT), "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "bench/compile_moe_router.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if "cuobjdump" in done.stderr and "No such file" in done.stderr:
        pytest.skip("this triton wheel has no cuobjdump")
    assert done.returncode == 0, done.stderr[-2000:]
    costs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(c["num_experts"], c["top_k"]) for c in costs][2] == (128, 8)  # Qwen3-30B-A3B
    for cost in costs:
        assert cost["stack_bytes"] == 0 and cost["shared_bytes"] == 0 and 0 < cost["registers"] <= 128, cost


def test_router_rows_time_both_paths():
    pytest.importorskip("triton")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU run needs Triton's interpreter")
    from moe_decode_tiles import router
    from shapes import SHAPES

    rows = router(SHAPES["tiny-moe"], [1, 3], torch.device("cpu"), torch.float32)
    assert [(r["batch"], r["path"]) for r in rows] == [(1, "triton"), (1, "torch"), (3, "triton"), (3, "torch")]
    assert all(r["us"] > 0 and r["experts"] == 16 and r["top_k"] == 4 and r["renormalize"] for r in rows)
