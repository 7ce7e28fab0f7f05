"""What the tensor-parallel executor adds to every step: encoding the SchedulerOutput, broadcasting it over the
gloo control group and decoding it on a worker, at batch 1 and 256 decode steps (and one 2048-token prefill
chunk), with T CPU processes on this machine. Pure host work: no model runs.

    python bench/step_broadcast.py [--ranks 2] [--steps 2000]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from scaleinfer.executor.channel import StepChannel  # noqa: E402
from scaleinfer.executor.step_codec import StepDecoder, StepEncoder  # noqa: E402
from scaleinfer.outputs import ScheduledSequence, SchedulerOutput  # noqa: E402
from scaleinfer.sampling_params import SamplingParams  # noqa: E402

CONTEXT, BLOCK = 1024, 16
CASES = {"decode_batch_1": (1, 1), "decode_batch_256": (256, 1), "prefill_chunk_2048": (1, 2048)}


def steps(batch: int, chunk: int, num_steps: int) -> Iterator[SchedulerOutput]:
    """num_steps steps of the same `batch` sequences at context ~1024, each `chunk` tokens further, their
    block tables growing as the scheduler grows them (the same live lists)."""
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1)
    tables = [list(range(i * 80, i * 80 + CONTEXT // BLOCK)) for i in range(batch)]
    prompts = [list(range(CONTEXT)) for _ in range(batch)]
    for step in range(num_steps):
        pos = CONTEXT + step * chunk
        for table in tables:
            while len(table) * BLOCK < pos + chunk:
                table.append(len(table))
        yield SchedulerOutput([ScheduledSequence(f"req-{i}", [7] * chunk, pos, table, True, params, step, (2,),
                                                 prompt) for i, (table, prompt) in enumerate(zip(tables, prompts))])


def rank_main(rank: int, world: int, init: str, num_steps: int, results) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    channel = StepChannel(dist.new_group(list(range(world)), backend="gloo"))
    for name, (batch, chunk) in CASES.items():
        # Built before the clock starts and frozen out of the garbage collector (as a worker freezes what it
        # built): the time is what the executor adds to a step, encode + broadcast + decode.
        outputs = iter(list(steps(batch, chunk, num_steps))) if rank == 0 else None
        gc.freeze()
        encoder, decoder = StepEncoder(), StepDecoder()
        dist.barrier()
        start, nbytes = time.perf_counter(), 0
        for _ in range(num_steps):
            if rank == 0:
                payload = encoder.encode(next(outputs))
                nbytes += len(payload)
                channel.send(payload)
            else:
                decoder.decode(channel.recv())
        dist.barrier()  # the last worker has decoded the last step
        if rank == 0:
            results[name] = {"batch": batch, "chunk_tokens": chunk, "us_per_step": (time.perf_counter() - start)
                             / num_steps * 1e6, "bytes_per_step": nbytes / num_steps}
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    with mp.Manager() as manager, __import__("tempfile").TemporaryDirectory() as tmp:
        results = manager.dict()
        mp.spawn(rank_main, args=(args.ranks, f"file://{tmp}/rdzv", args.steps, results), nprocs=args.ranks)
        cases = dict(results)
    first = cases["decode_batch_1"]["us_per_step"]
    payload = {"ranks": args.ranks, "steps": args.steps, "context_tokens": CONTEXT, "cases": cases,
               "note": "steps built before timing and frozen out of the garbage collector; rank 0 encodes and "
                       "broadcasts each, every other rank receives and decodes; wall time per step from the first "
                       "send to the last decode (barriers at both ends)",
               "ratios": {"batch_256_over_batch_1": cases["decode_batch_256"]["us_per_step"] / first}}
    path = write_result("step-broadcast", torch.device("cpu"), payload)
    print(payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
