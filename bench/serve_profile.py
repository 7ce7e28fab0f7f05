"""serve_load --profile DIR: py-spy samples the server's front and its engine core while the load runs.

py-spy (pip install py-spy) records each process's stacks while they are on the CPU (idle threads are left
out, so a thread's share is its CPU time), per thread, without pausing the process (--nonblocking). The raw
stacks go to DIR/<process>.txt (flamegraph's collapsed format: `thread;frame;...;frame count`); the result
gets each thread's share of the samples and the functions with the most samples of their own (self time),
which is where a busy front or core spends its CPU.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

RATE_HZ = 250
TOP = 20


class Profiler:
    def __init__(self, folder: str | None, pids: dict[str, int | None]) -> None:
        """folder None: profile nothing."""
        self.folder = None if folder is None else Path(folder)
        self.pids = {name: pid for name, pid in pids.items() if pid is not None}
        self.procs: dict[str, subprocess.Popen] = {}
        self.error: str | None = None

    def start(self) -> None:
        if self.folder is None:
            return
        py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if py_spy is None:
            self.error = "py-spy not found (pip install py-spy)"
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            self.procs[name] = subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", str(RATE_HZ), "--threads",
                 "--nonblocking", "--output", str(self.folder / f"{name}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> dict[str, object]:
        """Each process's summary (an empty dict when not profiling)."""
        if self.folder is None:
            return {}
        if self.error is not None:
            return {"error": self.error}
        summary: dict[str, object] = {}
        for name, proc in self.procs.items():
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            _, stderr = proc.communicate(timeout=60)
            path = self.folder / f"{name}.txt"
            summary[name] = summarize_stacks(path.read_text()) if path.exists() else {"error": stderr.decode()[-500:]}
        return summary


def summarize_stacks(text: str) -> dict[str, object]:
    """Collapsed stacks -> the sampled seconds, each thread's share, and the top functions by self samples."""
    threads: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        threads[frames[0]] += int(count)
        leaves[_function(frames[-1])] += int(count)
    total = sum(threads.values()) or 1
    return {"cpu_seconds_sampled": total / RATE_HZ,
            "threads": {thread: round(n / total, 3) for thread, n in threads.most_common()},
            "top_self": [[function, round(n / total, 4)] for function, n in leaves.most_common(TOP)]}


def _function(frame: str) -> str:
    """'name (path/to/file.py:12)' -> 'name (file.py)': samples of one function at any line together."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rsplit('/', 1)[-1]})" if where else name
