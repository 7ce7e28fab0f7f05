"""StructuredOutputsParams: exactly one constraint, each value checked; it crosses msgspec as itself."""

from __future__ import annotations

import msgspec
import pytest

from scaleinfer.errors import InvalidRequestError
from scaleinfer.sampling_params import SamplingParams, StructuredOutputsParams


@pytest.mark.parametrize(("fields", "words"), [
    ({}, "exactly one"),
    ({"regex": "a", "choice": ["a"]}, "['regex', 'choice']"),
    ({"json": "not json"}, "'not json'"),
    ({"json": "[1]"}, "'[1]'"),
    ({"json": 3}, "3"),
    ({"choice": []}, "[]"),
    ({"choice": ["a", ""]}, "['a', '']"),
    ({"regex": ""}, "''"),
    ({"grammar": 5}, "5"),
    ({"json_object": "yes"}, "'yes'"),
    ({"regex": "a", "whitespace_pattern": " "}, "JSON outputs (json, json_object) only, got 'regex'"),
    ({"json_object": True, "whitespace_pattern": 3}, "must be a string (a regex), got 3"),
    ({"json_object": True, "whitespace_pattern": "", "disable_any_whitespace": True}, "disable_any_whitespace"),
])
def test_bad_constraints_are_refused_naming_the_value(fields, words):
    with pytest.raises(InvalidRequestError) as info:
        StructuredOutputsParams(**fields)
    assert words in str(info.value)


def test_min_tokens_is_refused_with_a_constraint():
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs=StructuredOutputsParams(json_object=True))


def test_a_dict_is_taken_and_params_cross_msgspec_unchanged():
    params = SamplingParams(structured_outputs={"json": {"type": "object"}, "disable_any_whitespace": True})
    assert params.structured_outputs == StructuredOutputsParams(json={"type": "object"}, disable_any_whitespace=True)
    assert params.structured_outputs.kind == "json"
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SamplingParams)
    assert decoded == params
