"""vLLM's whitespace_pattern on xgrammar's JSON grammar: the grammar accepts a JSON text exactly when it is valid
for the schema and every gap between its tokens matches the pattern (Python's re is the oracle)."""

from __future__ import annotations

import itertools
import re

import pytest
from xgrammar import Grammar
from xgrammar.testing import _is_grammar_accept_string as accepts

from scaleinfer.engine.json_whitespace import WhitespacePatternError, json_grammar_with_whitespace

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "tags"], "properties": {
    "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "integer"}}}}
TOKENS = ["{", '"name"', ":", '"a b"', ",", '"tags"', ":", "[", "1", ",", "2", "]", "}"]  # a valid object
GAPS = ["", " ", "  ", "\n", "\n  ", "\t"]


def joined(gaps: list[str]) -> str:
    return TOKENS[0] + "".join(gap + token for gap, token in zip(gaps, TOKENS[1:]))


@pytest.mark.parametrize("pattern", ["", "[ ]?", " ", r"(\n  )?", r"[ \n]{0,2}"])
def test_gaps_are_accepted_exactly_when_they_match(pattern):
    grammar = Grammar.from_ebnf(json_grammar_with_whitespace(SCHEMA, pattern))
    num_gaps = len(TOKENS) - 1
    for gap, other in itertools.product(GAPS, repeat=2):  # every gap `gap`, except the fourth: `other`
        gaps = [gap] * num_gaps
        gaps[3] = other
        expected = all(re.fullmatch(pattern, g) for g in gaps)
        assert accepts(grammar, joined(gaps)) == expected, (pattern, gaps)


def test_the_schema_still_holds():
    grammar = Grammar.from_ebnf(json_grammar_with_whitespace(SCHEMA, "[ ]?"))
    assert accepts(grammar, '{"name": "x", "tags": []}')
    assert not accepts(grammar, '{"name": 1, "tags": []}')
    assert not accepts(grammar, '{"name": "x"}')
    assert not accepts(grammar, '{"name": "x", "tags": [], "more": 1}')
    objects = Grammar.from_ebnf(json_grammar_with_whitespace('{"type": "object"}', "", strict_mode=False))
    assert accepts(objects, '{"any":[1,{"x":null}]}') and not accepts(objects, '{"any": 1}')


def test_a_bad_regex_is_refused_naming_why():
    with pytest.raises(WhitespacePatternError, match="Regex parsing error"):
        json_grammar_with_whitespace(SCHEMA, "[ ")
