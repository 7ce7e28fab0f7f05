"""RequestOutputKind in the front's OutputProcessor (a character tokenizer, scripted core outputs): DELTA outputs
concatenate to the CUMULATIVE result, FINAL_ONLY gives it once, a step's delta carries only that step's tokens,
and a slow reader's deltas coalesce into their concatenation."""

from __future__ import annotations

import asyncio
import dataclasses

from scaleinfer.engine.async_engine import RequestStream
from scaleinfer.engine.core_types import EngineCoreOutput, SampledLogprobs
from scaleinfer.engine.output_processor import OutputProcessor
from scaleinfer.outputs import RequestOutput
from scaleinfer.sampling_params import RequestOutputKind, SamplingParams

KINDS = list(RequestOutputKind)


class CharTokenizer:
    """Token id = the character's code point."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, token_ids))


def sampled(char: str) -> SampledLogprobs:
    return SampledLogprobs(-0.25 * (ord(char) % 4), 1 + ord(char) % 3, [ord("z"), ord(char)], [-0.1, -0.2])


def step(request_id: str, index: int, chars: str, finish_reason: str | None = None, **fields) -> EngineCoreOutput:
    return EngineCoreOutput(request_id, index, [ord(c) for c in chars], [sampled(c) for c in chars],
                            finish_reason=finish_reason, **fields)


# Two sequences: 0 ends at the stop string "cd" (its "c" held back a step, then cut), 1 by length; the core
# sends sequence 0 one more token before its abort lands, which must not show.
SCRIPT = [
    [step("r", 0, "ab"), step("r", 1, "x")],
    [step("r", 0, "c"), step("r", 1, "yé")],
    [step("r", 0, "d"), step("r", 1, "w")],
    [step("r", 0, "e"), step("r", 1, "vu", finish_reason="length")],
]
PARAMS = SamplingParams(n=2, stop=["cd"], logprobs=1, max_tokens=5)


def run(kind: RequestOutputKind, script: list[list[EngineCoreOutput]] = SCRIPT,
        params: SamplingParams = PARAMS) -> list[RequestOutput]:
    processor = OutputProcessor(CharTokenizer())
    processor.add_request("r", None, [1, 2], dataclasses.replace(params, output_kind=kind), 0.0)
    outputs = [o for outputs in script for o in processor.process(outputs).request_outputs]
    assert not processor.has_unfinished()
    return outputs


def concatenated(deltas: list[RequestOutput]) -> RequestOutput:
    whole = dataclasses.replace(deltas[0], outputs=[dataclasses.replace(c, token_ids=list(c.token_ids),
                                                                        logprobs=list(c.logprobs or []))
                                                    for c in deltas[0].outputs])
    for delta in deltas[1:]:
        whole.add(delta)
    return whole


def comparable(output: RequestOutput) -> list[tuple]:
    return [(c.index, c.text, c.token_ids, c.logprobs, c.cumulative_logprob, c.finish_reason, c.stop_reason)
            for c in output.outputs]


def test_deltas_concatenate_to_the_cumulative_and_the_final_output():
    cumulative, deltas, final = (run(kind) for kind in KINDS)
    assert len(final) == 1 and final[0].finished and comparable(final[0]) == comparable(cumulative[-1])
    assert comparable(concatenated(deltas)) == comparable(cumulative[-1])
    (stopped, ended) = final[0].outputs
    assert (stopped.text, stopped.stop_reason, ended.text, ended.finish_reason) == ("ab", "cd", "xyéwvu", "length")
    # sequence 0 finished at step 3: later deltas do not repeat it
    assert [[c.index for c in d.outputs] for d in deltas] == [[0, 1], [0, 1], [0, 1], [1]]
    assert [d.outputs[0].text for d in deltas[:3]] == ["ab", "", ""]  # "c" held back, then cut with "d"


def test_each_delta_carries_only_its_step_and_the_history_is_not_rewalked():
    num_steps = 3000
    script = [[step("r", 0, "abcdefghij"[i % 10])] for i in range(num_steps - 1)]
    script.append([step("r", 0, "k", finish_reason="length")])
    processor = OutputProcessor(CharTokenizer())
    params = SamplingParams(stop=["jab!"], logprobs=1, max_tokens=num_steps, output_kind=RequestOutputKind.DELTA)
    processor.add_request("r", None, [1], params, 0.0)
    detokenizer = processor.requests["r"].children[0].detokenizer
    outputs, windows = [], []
    for outputs_of_step in script:
        (output,) = processor.process(outputs_of_step).request_outputs
        outputs.append(output.outputs[0])
        windows.append(detokenizer.num_window_chars)
    assert all(len(o.token_ids) == len(o.logprobs) == 1 for o in outputs)
    assert all(len(o.text) <= len("jab!") for o in outputs)
    assert max(windows) <= 2 * len("jab!"), "the detokenizer's working text stays bounded by the stop strings"
    assert outputs[0].token_ids == [ord("a")], "an output sent is never extended later"
    assert "".join(o.text for o in outputs) == ("abcdefghij" * num_steps)[:num_steps - 1] + "k"
    assert detokenizer.output_text == "".join(o.text for o in outputs)


def test_prompt_logprobs_come_once_in_deltas():
    from scaleinfer.engine.prompt_logprobs import PromptLogprobs

    scored = PromptLogprobs([-1.0], [1], [[2]], [[-1.0]])
    script = [[step("r", 0, "a", prompt_logprobs=scored)],
              [step("r", 0, "b", finish_reason="length")]]
    params = SamplingParams(prompt_logprobs=0, max_tokens=2)
    deltas, (final,) = run(RequestOutputKind.DELTA, script, params), run(RequestOutputKind.FINAL_ONLY, script, params)
    assert deltas[0].prompt_logprobs == final.prompt_logprobs and final.prompt_logprobs[0] is None
    assert deltas[1].prompt_logprobs is None


def test_a_slow_readers_deltas_coalesce_into_their_concatenation():
    deltas = run(RequestOutputKind.DELTA)

    async def read_after_every_put(aggregate: bool) -> list[RequestOutput]:
        stream = RequestStream("r", asyncio.get_running_loop(), lambda request_id: None, aggregate)
        for delta in run(RequestOutputKind.DELTA):
            stream.put(delta)
        return [output async for output in stream]

    (coalesced,) = asyncio.run(read_after_every_put(True))
    assert coalesced.finished and comparable(coalesced) == comparable(concatenated(deltas))
    (latest_only,) = asyncio.run(read_after_every_put(False))
    assert comparable(latest_only) == comparable(deltas[-1]), "without aggregate only the newest is kept"

