"""A request's structured-output fields -> StructuredOutputsParams, in one place: OpenAI's response_format
(text, json_object, json_schema), vLLM's structured_outputs and its older guided_json / guided_regex /
guided_choice / guided_grammar. A request sets at most one of them; SamplingParams checks the values and the
engine compiles them (a schema, regex or grammar that does not compile is a 400 naming it). vLLM's older
guided_whitespace_pattern applies to whichever of them is a JSON constraint (structured_outputs carries its
own whitespace_pattern)."""

from __future__ import annotations

import dataclasses

from scaleinfer.errors import InvalidRequestError
from scaleinfer.sampling_params import StructuredOutputsParams
from scaleinfer.server.errors import bad_request
from scaleinfer.server.protocol import ResponseFormat, SamplingRequest, StructuredOutputsRequest

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs(req: SamplingRequest) -> StructuredOutputsParams | None:
    """The request's constraint, or None; 400 when it sets more than one field (naming them)."""
    given = {name: value for name, value in _sources(req).items() if value is not None}
    if len(given) > 1:
        raise bad_request(f"set at most one of {', '.join(given)} (each constrains the output)", next(iter(given)))
    return _with_whitespace_pattern(next(iter(given.values()), None), req.guided_whitespace_pattern)


def _with_whitespace_pattern(params: StructuredOutputsParams | None,
                             pattern: str | None) -> StructuredOutputsParams | None:
    if pattern is None:
        return params
    name = "guided_whitespace_pattern"
    if params is None:
        raise bad_request(f"{name} needs a JSON constraint (guided_json, response_format or structured_outputs)", name)
    if params.whitespace_pattern is not None:
        raise bad_request(f"set {name} or structured_outputs.whitespace_pattern, not both", name)
    try:
        return dataclasses.replace(params, whitespace_pattern=pattern)
    except InvalidRequestError as exc:
        raise bad_request(str(exc), name) from exc


def _sources(req: SamplingRequest) -> dict[str, StructuredOutputsParams | None]:
    sources = {"response_format": _from_response_format(req.response_format),
               "structured_outputs": _from_vllm(req.structured_outputs)}
    for field, kind in _GUIDED.items():
        value = getattr(req, field)
        sources[field] = None if value is None else StructuredOutputsParams(**{kind: value}, origin=field)
    return sources


def _from_response_format(fmt: ResponseFormat | None) -> StructuredOutputsParams | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True, origin="response_format")
    if fmt.json_schema is None:
        raise bad_request("response_format of type json_schema needs a json_schema object", "response_format")
    schema = fmt.json_schema.schema_
    if schema is None:
        return StructuredOutputsParams(json_object=True, origin="response_format")
    return StructuredOutputsParams(json=schema, origin="response_format.json_schema.schema")


def _from_vllm(req: StructuredOutputsRequest | None) -> StructuredOutputsParams | None:
    if req is None:
        return None
    return StructuredOutputsParams(json=req.json_, json_object=bool(req.json_object), regex=req.regex,
                                   choice=req.choice, grammar=req.grammar,
                                   disable_any_whitespace=req.disable_any_whitespace,
                                   whitespace_pattern=req.whitespace_pattern)
