"""DecodeGraphs and the prepared next decode step, on the CPU: the graphs' buffers, fills, padding rows,
context buckets and on-device advancing are the real ones; only each "replay" reruns the captured forward
eagerly (no CUDA graph). Greedy, seeded and penalized outputs must equal the runner without graphs, and most
decode steps must take the prepared path."""

import torch

from scaleinfer import LLM, SamplingParams
from scaleinfer.worker.cuda_graph import DecodeGraphs, capture_sizes


class EagerReplay:
    """Stands in for a captured graph: a replay reruns the forward over the graphs' current buffers."""

    def __init__(self, graphs: DecodeGraphs, key: tuple[int, int], replays: list) -> None:
        self.graphs, self.key, self.replays = graphs, key, replays

    def replay(self) -> None:
        self.replays.append(self.key)
        self.graphs.outputs[self.key].copy_(self.graphs._forward(*self.key))


def eager_graphs(llm: LLM, max_num_seqs: int) -> tuple[DecodeGraphs, list]:
    runner, replays = llm.engine.runner, []
    graphs = DecodeGraphs(runner.model, capture_sizes(max_num_seqs), -(-llm.engine.max_model_len // 16),
                          runner.num_blocks, runner.block_size, runner.device)
    with torch.inference_mode():
        for key in graphs.keys:
            graphs.outputs[key] = graphs._forward(*key)
            graphs.graphs[key] = EagerReplay(graphs, key, replays)
    runner.use_graphs(graphs)
    return graphs, replays


def test_prepared_decode_steps_on_cpu_equal_the_runner_without_graphs(tiny_models):
    folder = str(tiny_models["llama3.1"][0])
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 200, (n,), generator=gen).tolist() for n in (15, 16, 31, 7, 40)]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (40, 23, 9, 33)]
    params.append(SamplingParams(temperature=0.8, seed=3, max_tokens=30, presence_penalty=0.5, ignore_eos=True))
    eager = LLM(folder, device="cpu", progress=False, dtype="float32", max_model_len=512)
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    llm = LLM(folder, device="cpu", progress=False, dtype="float32", max_model_len=512, max_num_seqs=8)
    graphs, replays = eager_graphs(llm, 8)
    built = []
    run = graphs.run
    graphs.run = lambda *args: built.append(1) or run(*args)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected
    assert len(replays) > 2 * len(built) > 0, (len(replays), len(built))  # most steps were prepared
    assert {key[0] for key in replays} >= {8, 4, 2, 1}  # padded batch sizes as sequences finished
    # alone, across the 256-token bucket: the prepared rows keep the wider graph's block table right
    long_prompt = torch.randint(2, 200, (250,), generator=gen).tolist()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    assert llm.generate(long_prompt, params)[0].outputs[0].token_ids == \
        eager.generate(long_prompt, params)[0].outputs[0].token_ids
    assert (1, 32) in replays
