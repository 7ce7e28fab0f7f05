"""bench/moe.py's kernel rows on a CPU (the reference path): one row per batch with its token-expert pairs and
the path fused_moe takes."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from moe import KERNEL_BATCHES, kernel_bandwidth  # noqa: E402
from shapes import SHAPES  # noqa: E402


def test_kernel_rows_name_pairs_and_path():
    config = SHAPES["tiny-moe"]
    rows = kernel_bandwidth(config, torch.device("cpu"), torch.float32)
    assert [r["batch"] for r in rows] == list(KERNEL_BATCHES)
    for row in rows:
        assert row["pairs"] == row["batch"] * config["num_experts_per_tok"]
        assert row["path"] == "reference" and row["us"] > 0 and row["gb_s"] > 0
        assert row["experts_touched"] <= min(config["num_experts"], row["pairs"])
