"""Under torchrun every process is a rank: rank 0 runs the engine (here the `generate` command), the others the
worker loop, and all exit 0 when rank 0 is done. One machine, CPU processes over gloo."""

import os
import subprocess
import sys
from pathlib import Path

ARGS = ["generate", "The capital of France", "--device", "cpu", "--dtype", "float32", "--max-tokens", "10"]


def run(command: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def test_generate_under_torchrun_prints_what_one_process_prints(tiny_models):
    folder, _ = tiny_models["llama3.1"]
    alone = run([sys.executable, "-m", "scaleinfer.cli", *ARGS, "--model", str(folder)])
    assert alone.returncode == 0, alone.stderr
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    together = run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "scaleinfer.cli", *ARGS,
                    "--model", str(folder), "--tensor-parallel-size", "2"])
    assert together.returncode == 0, together.stderr
    assert together.stdout == alone.stdout  # rank 1 printed nothing; rank 0 the same text


def test_a_world_size_other_than_the_tensor_parallel_size_is_refused(tiny_models):
    folder, _ = tiny_models["llama3.1"]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    result = run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "scaleinfer.cli", *ARGS,
                  "--model", str(folder), "--tensor-parallel-size", "4"])
    assert result.returncode != 0
    assert "world size (2) must equal tensor_parallel_size x pipeline_parallel_size (4)" in result.stderr
