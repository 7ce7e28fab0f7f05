"""DecodeGraphs of pipeline stages, both stages built in this process: stage 0's graphs take the token rows and give
[2, n, hidden] (x and the residual), stage 1's read those from their static input buffer and give the final hidden
states; chained, they equal the whole model's eager decode step, with padded rows and without. On the CPU a
"replay" reruns the captured forward over the graphs' buffers (as in test_decode_graphs_cpu); on a GPU the graphs
are captured and replayed for real."""

import pytest
import torch

from scaleinfer.layers.attention import Attention
from scaleinfer.layers.linear import linear_scheme, quantization_scheme
from scaleinfer.models.registry import model_class
from scaleinfer.outputs import ScheduledSequence, SchedulerOutput
from scaleinfer.parallel.state import ParallelState, set_parallel_state
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.weights.source import resolve_model
from scaleinfer.worker.cuda_graph import DecodeGraphs
from scaleinfer.worker.device import default_dtype
from scaleinfer.worker.kv_cache import allocate_kv_cache
from scaleinfer.worker.step_inputs import build_step_inputs

BLOCK_SIZE, BLOCKS_PER_SEQ, NUM_SEQS = 16, 4, 3
SIZES = [1, 2, 4]


class EagerReplay:
    def __init__(self, graphs: DecodeGraphs, key: tuple[int, int]) -> None:
        self.graphs, self.key = graphs, key

    def replay(self) -> None:
        self.graphs.outputs[self.key].copy_(self.graphs._forward(*self.key))


def build(folder, device: torch.device, pp_rank: int = 0, pp_size: int = 1) -> torch.nn.Module:
    """The model as stage pp_rank of pp_size builds it, with its own KV cache (one scratch block past the seqs')."""
    set_parallel_state(ParallelState(pp_rank=pp_rank, pp_size=pp_size))
    try:
        source = resolve_model(str(folder))
        with default_dtype(torch.float32), torch.device(device), linear_scheme(quantization_scheme(None)):
            model = model_class(source.arch)(source.arch)
        model.load_weights(source.iter_weights(torch.float32, progress=False))
    finally:
        set_parallel_state(ParallelState())
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    caches = allocate_kv_cache(len(layers), NUM_SEQS * BLOCKS_PER_SEQ + 1, BLOCK_SIZE, layers[0].num_kv_heads,
                               layers[0].head_dim, torch.float32, device)
    for layer, (k_cache, v_cache) in zip(layers, caches):
        layer.bind_kv_cache(k_cache, v_cache)
    return model.eval()


def graphs_of(model, device: torch.device, hidden_in: torch.Tensor | None = None) -> DecodeGraphs:
    graphs = DecodeGraphs(model, SIZES, BLOCKS_PER_SEQ, NUM_SEQS * BLOCKS_PER_SEQ, BLOCK_SIZE, device, hidden_in)
    if device.type == "cuda":
        graphs.capture()
        return graphs
    with torch.inference_mode():
        for key in graphs.keys:
            graphs.outputs[key] = graphs._forward(*key)
            graphs.graphs[key] = EagerReplay(graphs, key)
    return graphs


def step(prompts: list[list[int]], start: list[int]) -> SchedulerOutput:
    tables = [list(range(i * BLOCKS_PER_SEQ, (i + 1) * BLOCKS_PER_SEQ)) for i in range(NUM_SEQS)]
    return SchedulerOutput([ScheduledSequence(f"r{i}", ids, pos, tables[i], True, SamplingParams())
                            for i, (ids, pos) in enumerate(zip(prompts, start))])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@torch.inference_mode()
def test_two_stage_graphs_chained_equal_the_whole_model(tiny_models, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    device = torch.device(device)
    folder, hf_model = tiny_models["llama3.1"]  # 2 layers: one per stage
    whole, first, last = build(folder, device), build(folder, device, 0, 2), build(folder, device, 1, 2)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, hf_model.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 17, 9)]
    prefill = build_step_inputs(step(prompts, [0] * NUM_SEQS), BLOCK_SIZE, device)
    whole(prefill.input_ids, prefill.positions, prefill.attn)
    last(prefill.input_ids, prefill.positions, prefill.attn, first(prefill.input_ids, prefill.positions, prefill.attn))
    hidden_size = whole.arch.hidden_size
    first_graphs = graphs_of(first, device)
    last_graphs = graphs_of(last, device, torch.zeros(2, SIZES[-1], hidden_size, device=device))
    for n in (3, 2):  # 3 rows replay the graph of 4 (one padding row); 2 the graph of 2
        decode = step([[7 + n], [11 + n], [13 + n]][:n], [len(p) + 3 - n for p in prompts][:n])
        inputs = build_step_inputs(decode, BLOCK_SIZE, device)
        expected = whole(inputs.input_ids, inputs.positions, inputs.attn)  # [n, hidden]
        assert first_graphs.can_run(inputs) and last_graphs.can_run(inputs)
        between = first_graphs.run(inputs)
        assert between.shape == (2, n, hidden_size)
        torch.testing.assert_close(last_graphs.run(inputs, between.clone()), expected, atol=1e-4, rtol=1e-4)
    assert first_graphs.num_replays == last_graphs.num_replays == 2
    with pytest.raises(ValueError, match="take the previous stage's hidden states, and only those: got none"):
        last_graphs.run(inputs)
