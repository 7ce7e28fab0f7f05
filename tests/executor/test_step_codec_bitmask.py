"""The step message carries the grammar bitmask to every rank as its bytes."""

from scaleinfer.executor.step_codec import StepDecoder, StepEncoder
from scaleinfer.outputs import GrammarBitmask, ScheduledSequence, SchedulerOutput
from scaleinfer.sampling_params import SamplingParams, StructuredOutputsParams


def test_the_bitmask_and_the_constraint_cross_to_the_workers():
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object"}))
    step = SchedulerOutput([ScheduledSequence("a", [5], 3, [1], True, params, 1, (2,), [9, 8, 7])],
                           grammar_bitmask=GrammarBitmask(["a"], 2, bytes(range(8))))
    decoded = StepDecoder().decode(StepEncoder().encode(step))
    assert decoded.grammar_bitmask == step.grammar_bitmask
    assert decoded.scheduled[0].sampling_params == params
    assert StepDecoder().decode(StepEncoder().encode(SchedulerOutput([]))).grammar_bitmask is None
