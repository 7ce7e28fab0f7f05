"""Two processes stream one model together (gloo on the CPU): each keeps half of every layer and the halves
are all-gathered before each layer runs; each process serves its own requests, with a different amount of work,
and gets the tokens a resident model gives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from test_offload_llm import GREEDY, PROMPTS, save_llama, token_ids

from scaleinfer import LLM, SamplingParams

# Rank 0 has three requests, rank 1 one short one: rank 1 runs padding steps while rank 0 finishes.
WORK = {0: (PROMPTS, GREEDY), 1: (PROMPTS[1:2], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))}


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("deep_llama_shards"), num_layers=6)


def _rank_main(rank: int, folder: str, port: int, offload: str, results) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        path = {"offload_path": str(Path(folder).parent)} if offload == "nvme" else {}
        llm = LLM(folder, device="cpu", skip_tokenizer_init=True, progress=False, offload=offload, **path)
        store = llm.engine.runner.streamer.store
        if offload == "cpu":
            kept = [buffer.tensor.numel() for buffer in store.buffers]
        else:
            kept = [file.stat().st_size for file in store.files]
        halves = all(size * 2 == layout.nbytes for size, layout in zip(kept, store.layouts))
        prompts, params = WORK[rank]
        first = token_ids(llm.generate(prompts, params))
        second = token_ids(llm.generate(prompts, params))  # the ring carries over between calls
        results.put((rank, halves, first, second))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("offload", ["cpu", "nvme"])
def test_two_processes_share_the_layers_and_get_resident_tokens(deep_llama, offload, free_tcp_port):
    resident = LLM(str(deep_llama), device="cpu", skip_tokenizer_init=True, progress=False)
    expected = {rank: token_ids(resident.generate(*work)) for rank, work in WORK.items()}
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank_main, args=(str(deep_llama), free_tcp_port, offload, results), nprocs=2, join=True)
    got = {}
    while not results.empty():
        rank, halves, first, second = results.get()
        got[rank] = (halves, first, second)
    assert got == {rank: (True, tokens, tokens) for rank, tokens in expected.items()}
