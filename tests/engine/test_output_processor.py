"""The front's OutputProcessor on scripted EngineCoreOutputs (a character tokenizer, no model), and the channel's
structs round-tripping through msgspec."""

from __future__ import annotations

import dataclasses

from scaleinfer.engine.core_types import (
    AbortRequests,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
    SampledLogprobs,
    command_decoder,
    command_encoder,
    message_decoder,
    message_encoder,
)
from scaleinfer.engine.output_processor import OutputProcessor
from scaleinfer.sampling_params import SamplingParams


class CharTokenizer:
    """Token id = the character's code point."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, token_ids))


def out(request_id: str, text: str, index: int = 0, **fields) -> EngineCoreOutput:
    return EngineCoreOutput(request_id, index, [ord(c) for c in text], **fields)


def test_a_stop_string_ends_its_sequence_and_asks_the_core_to_stop_it():
    processor = OutputProcessor(CharTokenizer())
    processor.add_request("a", None, [1, 2], SamplingParams(n=2, stop=["cd"]), 0.0)
    assert processor.num_unstarted == 2
    first = processor.process([out("a", "b", 0), out("a", "b", 1)])
    assert processor.num_unstarted == 0 and first.to_stop == []
    second = processor.process([out("a", "c", 0), out("a", "x", 1)])
    assert second.request_outputs[0].outputs[0].text == "b"  # "c" is held back: it may begin "cd"
    third = processor.process([out("a", "d", 0), out("a", "y", 1)])
    assert third.to_stop == [("a", 0)]
    completion = third.request_outputs[0].outputs[0]
    assert (completion.text, completion.finish_reason, completion.stop_reason) == ("b", "stop", "cd")
    assert completion.token_ids == [ord("b"), ord("c"), ord("d")]
    late = processor.process([out("a", "e", 0), out("a", "z", 1, finish_reason="length")])  # sampled before the abort
    final = late.request_outputs[0]
    assert final.finished and final.outputs[0].token_ids == completion.token_ids and final.outputs[1].text == "bxyz"
    assert not processor.has_unfinished()


def test_a_request_whose_processing_raises_fails_alone():
    processor = OutputProcessor(CharTokenizer())
    for request_id in ("ok", "broken"):
        processor.add_request(request_id, None, [1], SamplingParams(max_tokens=2), 0.0)

    class Corrupted:
        def update(self, *args, **kwargs):
            raise RuntimeError("detokenizer state corrupted")

    processor.requests["broken"].children[0].detokenizer = Corrupted()
    processed = processor.process([out("ok", "a"), out("broken", "a")])
    by_id = {o.request_id: o for o in processed.request_outputs}
    assert by_id["broken"].finished and by_id["broken"].error == "RuntimeError: detokenizer state corrupted"
    assert processed.to_abort == ["broken"] and not by_id["ok"].finished and by_id["ok"].error is None
    assert processor.num_unstarted == 0 and list(processor.requests) == ["ok"]


def test_logprobs_are_formatted_with_their_decoded_tokens():
    processor = OutputProcessor(CharTokenizer())
    processor.add_request("a", None, [1], SamplingParams(logprobs=1, max_tokens=1), 0.0)
    sampled = SampledLogprobs(-0.5, 2, [ord("q"), ord("a")], [-0.1, -0.5])
    (output,) = processor.process([out("a", "a", new_logprobs=[sampled], finish_reason="length")]).request_outputs
    (entry,) = output.outputs[0].logprobs
    assert {t: (lp.logprob, lp.rank, lp.decoded_token) for t, lp in entry.items()} == {
        ord("a"): (-0.5, 2, "a"), ord("q"): (-0.1, 1, "q")}
    assert output.outputs[0].cumulative_logprob == -0.5


def test_the_channel_carries_sampling_params_whole():
    """Every SamplingParams field crosses as it is, whatever fields it gains (no hand-listed copy)."""
    params = SamplingParams(n=2, max_tokens=7, temperature=0.5, seed=2**64 - 1, stop=["x"], stop_token_ids=[3],
                            logit_bias={5: -1.5}, logprobs=3, include_stop_str_in_output=True)
    request = EngineCoreRequest("r", [1, 2, 3], params, 12.5)
    decoded = command_decoder.decode(command_encoder.encode(request))
    assert decoded == request and dataclasses.asdict(decoded.sampling_params) == dataclasses.asdict(params)
    abort = AbortRequests(["r"], [("s", 1)])
    assert command_decoder.decode(command_encoder.encode(abort)) == AbortRequests(["r"], [("s", 1)])
    message = EngineCoreOutputs([out("r", "ab", finish_reason="stop", stop_reason=7)], EngineStats(num_running=1), 0.01)
    assert message_decoder.decode(message_encoder.encode(message)) == message
