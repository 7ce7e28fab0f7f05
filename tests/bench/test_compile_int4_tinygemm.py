"""bench/compile_int4_tinygemm.py, without a GPU: the int4 GEMM on tinygemm's layout at its default tiles
(GPU_TILES, both of the layout's reads) compiles for sm90 with no register spills and within Hopper's shared
memory a block. Run in a child process: the tests' TRITON_INTERPRET=1 replaces Triton's compiler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOPPER_SHARED_BYTES = 227 * 1024  # the most a block may ask for on sm90
SCRIPT = """
import dataclasses, json, sys
sys.path.insert(0, "bench")
from compile_int4_tinygemm import compile_tiles
from scaleinfer.kernels.gemm_int4_tinygemm import GPU_TILES
for words in (True, False):
    tiles = dataclasses.replace(GPU_TILES, words=words)
    print(json.dumps(dataclasses.asdict(compile_tiles(tiles, tiles.max_block_m, 90, 128, 8))))
"""


def test_default_tiles_compile_for_sm90_without_spills():
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": str(ROOT), "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    if "cuobjdump" in done.stderr and "No such file" in done.stderr:
        pytest.skip("this triton wheel has no cuobjdump")
    assert done.returncode == 0, done.stderr[-2000:]
    costs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [cost["tiles"].endswith(read) for cost, read in zip(costs, ("words@m64", "values@m64"))] == [True, True]
    for cost in costs:
        assert cost["stack_bytes"] == 0 and 0 < cost["registers"] <= 255, cost
        assert cost["shared_bytes"] <= HOPPER_SHARED_BYTES, cost
