"""SchedulerOutput -> step tensors: token order, slots through the block table, sampled rows; the packed
one-copy layout through the double-buffered staging buffer; graph sizes and context buckets."""

import pytest
import torch

from scaleinfer.outputs import ScheduledSequence, SchedulerOutput
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.worker.cuda_graph import bucket_widths, capture_plan, capture_sizes, graph_key
from scaleinfer.worker.staging import StagingBuffer
from scaleinfer.worker.step_inputs import StepInputs, build_step_inputs

PARAMS = SamplingParams()
CPU = torch.device("cpu")


def _mixed_step() -> SchedulerOutput:
    chunk = ScheduledSequence("a", [10, 11, 12, 13, 14], start_pos=3, block_table=[7, 2], sample=False,
                              sampling_params=PARAMS)
    decode = ScheduledSequence("b", [20], start_pos=5, block_table=[4, 9], sample=True, sampling_params=PARAMS)
    prompt = ScheduledSequence("c", [30, 31], start_pos=0, block_table=[1], sample=True, sampling_params=PARAMS)
    return SchedulerOutput([chunk, decode, prompt])


def _decode_step(context_lens: list[int], block_size: int = 4, first_token: int = 100) -> SchedulerOutput:
    """One decode per context length; sequence i owns blocks i*100, i*100+1, ..."""
    seqs = []
    for i, n in enumerate(context_lens):
        table = [i * 100 + b for b in range(-(-n // block_size))]
        seqs.append(ScheduledSequence(f"d{i}", [first_token + i], start_pos=n - 1, block_table=table, sample=True,
                                      sampling_params=PARAMS))
    return SchedulerOutput(seqs)


def _as_lists(inputs: StepInputs) -> dict:
    attn, prefill = inputs.attn, inputs.attn.prefill
    out = {"input_ids": inputs.input_ids.tolist(), "positions": inputs.positions.tolist(),
           "slot_mapping": attn.slot_mapping.tolist(), "sample_rows": inputs.sample_rows.tolist(),
           "sampled": [s.request_id for s in inputs.sampled], "num_decodes": attn.num_decodes,
           "max_decode_context_len": inputs.max_decode_context_len,
           "decode_rows": None if inputs.decode_rows is None else inputs.decode_rows.tolist()}
    if attn.num_decodes:
        out.update(decode_tables=attn.decode_block_tables.tolist(), context_lens=attn.decode_context_lens.tolist())
    if prefill is not None:
        out.update(prefill_tables=prefill.block_tables.tolist(), query_start_loc=prefill.query_start_loc.tolist(),
                   start_pos=prefill.start_pos.tolist(), max_query_len=prefill.max_query_len)
    return out


def test_decodes_first_then_chunks_with_slots_and_sample_rows():
    inputs = build_step_inputs(_mixed_step(), block_size=4, device=CPU)
    assert inputs.input_ids.tolist() == [20, 10, 11, 12, 13, 14, 30, 31]
    assert inputs.positions.tolist() == [5, 3, 4, 5, 6, 7, 0, 1]
    # block_size 4: position p of a sequence lives at block_table[p // 4] * 4 + p % 4
    assert inputs.attn.slot_mapping.tolist() == [37, 31, 8, 9, 10, 11, 4, 5]
    assert inputs.sample_rows.tolist() == [0, 7]
    assert [s.request_id for s in inputs.sampled] == ["b", "c"]
    assert inputs.attn.num_decodes == 1 and inputs.attn.decode_context_lens.tolist() == [6]
    assert inputs.attn.decode_block_tables.tolist() == [[4, 9]]
    prefill = inputs.attn.prefill
    assert prefill.query_start_loc.tolist() == [0, 5, 7] and prefill.start_pos.tolist() == [3, 0]
    assert prefill.block_tables.tolist() == [[7, 2], [1, 0]] and prefill.max_query_len == 5
    # a mixed step has no decode rows for a graph
    assert inputs.max_decode_context_len == 6 and inputs.decode_rows is None


def test_pure_decode_step_packs_graph_rows_and_padded_tables():
    inputs = build_step_inputs(_decode_step([3, 9, 5]), block_size=4, device=CPU)
    assert inputs.attn.prefill is None and inputs.max_decode_context_len == 9
    assert inputs.decode_rows.tolist() == [
        [100, 101, 102],  # input_ids
        [2, 8, 4],  # positions
        [0 * 4 + 2, 102 * 4 + 0, 201 * 4 + 0],  # slot_mapping
        [3, 9, 5],  # context_lens
    ]
    assert inputs.attn.decode_block_tables.tolist() == [[0, 0, 0], [100, 101, 102], [200, 201, 0]]
    # the rows are views of the same values the model reads
    assert inputs.decode_rows[0].data_ptr() == inputs.input_ids.data_ptr()
    assert inputs.decode_rows[3].data_ptr() == inputs.attn.decode_context_lens.data_ptr()


def test_prefill_only_step_has_no_decode_tensors():
    prompt = ScheduledSequence("p", [1, 2, 3], start_pos=0, block_table=[5], sample=True, sampling_params=PARAMS)
    inputs = build_step_inputs(SchedulerOutput([prompt]), block_size=4, device=CPU)
    assert inputs.attn.num_decodes == 0 and inputs.attn.decode_block_tables is None
    assert inputs.attn.decode_context_lens is None and inputs.decode_rows is None
    assert inputs.max_decode_context_len == 0 and inputs.attn.slot_mapping.tolist() == [20, 21, 22]


def _tensors(inputs: StepInputs) -> dict[str, torch.Tensor]:
    attn, prefill = inputs.attn, inputs.attn.prefill
    out = {"input_ids": inputs.input_ids, "positions": inputs.positions, "slot_mapping": attn.slot_mapping,
           "sample_rows": inputs.sample_rows}
    if attn.num_decodes:
        out.update(decode_tables=attn.decode_block_tables, context_lens=attn.decode_context_lens)
    if prefill is not None:
        out.update(prefill_tables=prefill.block_tables, query_start_loc=prefill.query_start_loc,
                   start_pos=prefill.start_pos, seq_lens=prefill.seq_lens)
    return out


STEP_MIXES = [(d, c) for d in (0, 1, 2, 3) for c in ((), (5,), (2, 3), (3, 7, 4)) if d or c]


@pytest.mark.parametrize(("num_decodes", "chunk_lens"), STEP_MIXES)
def test_every_packed_tensor_starts_16_byte_aligned(num_decodes, chunk_lens):
    """A Triton kernel compiles a variant per pointer alignment class: with views at offsets that follow
    the step's counts, the prefill kernel compiled new variants mid-run (seen on an H200: 1, 5, 6, 7)."""
    seqs = _decode_step([3 + i for i in range(num_decodes)]).scheduled
    seqs += [ScheduledSequence(f"c{i}", list(range(n)), start_pos=i, block_table=list(range(i + 2)), sample=True,
                               sampling_params=PARAMS) for i, n in enumerate(chunk_lens)]
    staging = StagingBuffer(CPU, capacity=64)
    for _ in range(2):  # both host buffers
        inputs = build_step_inputs(SchedulerOutput(seqs), block_size=4, device=CPU, staging=staging)
        assert {name: t.data_ptr() % 16 for name, t in _tensors(inputs).items()} == dict.fromkeys(_tensors(inputs), 0)
        assert _as_lists(inputs) == _as_lists(build_step_inputs(SchedulerOutput(seqs), block_size=4, device=CPU))


def test_staged_inputs_equal_fresh_ones_across_steps_and_growth():
    staging = StagingBuffer(CPU, capacity=8)  # every step below needs more: the buffers grow
    steps = [_mixed_step(), _decode_step([3, 9, 5]), _decode_step(list(range(1, 40))), _mixed_step(),
             _decode_step([17])]
    for step in steps:
        staged = build_step_inputs(step, block_size=4, device=CPU, staging=staging)
        assert _as_lists(staged) == _as_lists(build_step_inputs(step, block_size=4, device=CPU))
    assert staging.capacity >= 39 * 5 + 39 * 10


def test_staging_alternates_host_buffers_so_the_last_copy_source_survives():
    staging = StagingBuffer(CPU, capacity=16)
    first = staging.upload([1, 2, 3])
    assert first.tolist() == [1, 2, 3]
    second = staging.upload([7, 8])
    assert second.tolist() == [7, 8]
    # the next upload writes the other host buffer: the one the previous copy read is untouched
    assert staging.host[0][:3].tolist() == [1, 2, 3] and staging.host[1][:2].tolist() == [7, 8]
    assert staging.upload([4]).tolist() == [4] and staging.host[1][:2].tolist() == [7, 8]
    assert staging.upload([]).tolist() == []


def test_staging_rejects_empty_capacity():
    with pytest.raises(ValueError, match="capacity must be positive, got 0"):
        StagingBuffer(CPU, capacity=0)


def test_capture_sizes_ladder():
    sizes = capture_sizes(256)
    assert sizes[:6] == [1, 2, 4, 8, 16, 24] and sizes[-1] == 256 and len(sizes) == 35
    assert capture_sizes(10) == [1, 2, 4, 8, 10]
    assert capture_sizes(3) == [1, 2, 3]


def test_bucket_widths_grow_by_eight_and_end_at_the_full_table():
    assert bucket_widths(512, 16) == [16, 128, 512]  # 256, 2048, 8192 tokens
    assert bucket_widths(8192, 16) == [16, 128, 1024, 8192]  # up to 131072 tokens
    assert bucket_widths(32, 16) == [16, 32]
    assert bucket_widths(16, 16) == [16] and bucket_widths(10, 16) == [10]
    assert bucket_widths(300, 1) == [256, 300]


def test_capture_plan_buckets_small_batches_only():
    plan = capture_plan([1, 8, 32, 40, 256], 512, 16)
    assert plan[1] == plan[8] == plan[32] == [16, 128, 512]
    assert plan[40] == plan[256] == [512]


def test_graph_key_picks_smallest_size_and_narrowest_covering_bucket():
    plan = capture_plan(capture_sizes(64), 512, 16)
    assert graph_key(plan, 1, 129, 16) == (1, 16)
    assert graph_key(plan, 1, 256, 16) == (1, 16)  # exactly one bucket's worth of tokens
    assert graph_key(plan, 1, 257, 16) == (1, 128)  # one token over: the next bucket
    assert graph_key(plan, 3, 2048, 16) == (4, 128)
    assert graph_key(plan, 3, 8192, 16) == (4, 512)
    assert graph_key(plan, 33, 10, 16) == (40, 512)  # larger batches have only the full width
    assert graph_key(plan, 3, 8193, 16) is None  # longer than the table: run eagerly
    assert graph_key(plan, 65, 10, 16) is None  # more sequences than the largest graph


def test_sampled_hidden_gathers_only_when_some_token_is_not_sampled():
    hidden = torch.arange(8 * 3).view(8, 3)
    mixed = build_step_inputs(_mixed_step(), block_size=4, device=CPU)
    assert mixed.sampled_hidden(hidden).tolist() == hidden[[0, 7]].tolist()
    decode = build_step_inputs(_decode_step([3, 9, 5]), block_size=4, device=CPU)
    rows = hidden[:3]
    assert decode.sampled_hidden(rows) is rows  # every row sampled: the hidden states themselves, no gather
