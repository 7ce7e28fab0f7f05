"""SchedulerOutput -> step tensors: token order, slots through the block table, sampled rows; graph sizes."""

import torch

from scaleinfer.outputs import ScheduledSequence, SchedulerOutput
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.worker.cuda_graph import capture_sizes
from scaleinfer.worker.step_inputs import build_step_inputs

PARAMS = SamplingParams()


def test_decodes_first_then_chunks_with_slots_and_sample_rows():
    chunk = ScheduledSequence("a", [10, 11, 12, 13, 14], start_pos=3, block_table=[7, 2], sample=False,
                              sampling_params=PARAMS)
    decode = ScheduledSequence("b", [20], start_pos=5, block_table=[4, 9], sample=True, sampling_params=PARAMS)
    prompt = ScheduledSequence("c", [30, 31], start_pos=0, block_table=[1], sample=True, sampling_params=PARAMS)
    inputs = build_step_inputs(SchedulerOutput([chunk, decode, prompt]), block_size=4, device=torch.device("cpu"))
    assert inputs.input_ids.tolist() == [20, 10, 11, 12, 13, 14, 30, 31]
    assert inputs.positions.tolist() == [5, 3, 4, 5, 6, 7, 0, 1]
    # block_size 4: position p of a sequence lives at block_table[p // 4] * 4 + p % 4
    assert inputs.attn.slot_mapping.tolist() == [37, 31, 8, 9, 10, 11, 4, 5]
    assert inputs.sample_rows.tolist() == [0, 7]
    assert [s.request_id for s in inputs.sampled] == ["b", "c"]
    assert inputs.attn.num_decodes == 1 and inputs.attn.decode_context_lens.tolist() == [6]
    prefill = inputs.attn.prefill
    assert prefill.query_start_loc.tolist() == [0, 5, 7] and prefill.start_pos.tolist() == [3, 0]
    assert prefill.block_tables.tolist() == [[7, 2], [1, 0]] and prefill.max_query_len == 5


def test_capture_sizes_ladder():
    sizes = capture_sizes(256)
    assert sizes[:6] == [1, 2, 4, 8, 16, 24] and sizes[-1] == 256 and len(sizes) == 35
    assert capture_sizes(10) == [1, 2, 4, 8, 10]
    assert capture_sizes(3) == [1, 2, 3]
