"""The step message the workers decode is the step the engine scheduled, in a few bytes per sequence."""

import msgspec

from scaleinfer.executor.step_codec import StepDecoder, StepEncoder, StepMessage
from scaleinfer.outputs import ScheduledSequence, SchedulerOutput
from scaleinfer.sampling_params import SamplingParams

PARAMS = SamplingParams(temperature=0.7, top_k=5, seed=3, logit_bias={4: 1.5}, stop=["x"], repetition_penalty=1.2)


def chunk(rid, tokens, start, table, sample=True, num_output=0):
    return ScheduledSequence(rid, tokens, start, table, sample, PARAMS, num_output, (2,), [9, 8, 7])


def roundtrip(encoder, decoder, output):
    payload = encoder.encode(output)
    return payload, decoder.decode(payload)


def test_a_step_decodes_to_the_scheduled_sequences():
    encoder, decoder = StepEncoder(), StepDecoder()
    step = SchedulerOutput([chunk("a", [9, 8, 7], 0, [3, 4]), chunk("b", [1], 5, [6], sample=False)], ["old"], 1)
    _, decoded = roundtrip(encoder, decoder, step)
    for seq in decoded.scheduled:
        assert list(seq.prompt_token_ids) == [9, 8, 7]  # an int64 array on the worker
        seq.prompt_token_ids = [9, 8, 7]
    assert decoded == step


def test_params_travel_once_and_block_tables_as_their_tail():
    encoder, decoder = StepEncoder(), StepDecoder()
    table = [3]
    _, first = roundtrip(encoder, decoder, SchedulerOutput([chunk("a", [9, 8, 7], 0, table)]))
    table.append(4)
    payload, second = roundtrip(encoder, decoder, SchedulerOutput([chunk("a", [5], 3, table, num_output=1)]))
    message = msgspec.msgpack.decode(payload, type=StepMessage)
    assert message.new == [] and message.chunks[0].table_from == 1 and message.chunks[0].table_tail == [4]
    assert second.scheduled[0].block_table == [3, 4]
    assert second.scheduled[0].block_table is first.scheduled[0].block_table  # NextDecode keys on identity
    assert second.scheduled[0].sampling_params == PARAMS and second.scheduled[0].num_output_tokens == 1
    assert len(payload) < 40


def test_a_rebound_table_is_sent_whole_and_a_finished_sequence_forgotten():
    encoder, decoder = StepEncoder(), StepDecoder()
    _, first = roundtrip(encoder, decoder, SchedulerOutput([chunk("a", [9, 8, 7], 0, [3, 4])]))
    _, again = roundtrip(encoder, decoder, SchedulerOutput([chunk("a", [9, 8, 7, 5], 0, [7, 8])]))  # preempted
    assert again.scheduled[0].block_table == [7, 8]
    assert again.scheduled[0].block_table is not first.scheduled[0].block_table
    roundtrip(encoder, decoder, SchedulerOutput([], ["a"]))
    assert "a" not in decoder._known
    payload, reused = roundtrip(encoder, decoder, SchedulerOutput([chunk("a", [1, 2], 0, [5])]))  # the id used anew
    assert msgspec.msgpack.decode(payload, type=StepMessage).new  # its parameters travel again
    assert list(reused.scheduled[0].prompt_token_ids) == [9, 8, 7] and reused.scheduled[0].block_table == [5]
