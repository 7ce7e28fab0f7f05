"""JSON grammars whose whitespace follows a pattern (vLLM's whitespace_pattern: a regex every run of whitespace
between JSON tokens must match, e.g. "[ ]?" or "").

xgrammar's JSON grammar takes only any_whitespace / indent / separators, so the pattern is put in by hand:
xgrammar writes its any-whitespace JSON grammar as EBNF, every gap between tokens spelled ANY_WHITESPACE;
each becomes a reference to one rule, and Grammar.union joins that grammar with the pattern's own (from
Grammar.from_regex) under fresh rule names; the union's root is then cut back to the JSON grammar's root and
the rule pointed at the pattern's. Where xgrammar's EBNF no longer reads as expected, the request is refused
(WhitespacePatternError), never served with the pattern ignored.
"""

from __future__ import annotations

import json
import re
from typing import Any

ANY_WHITESPACE = "[ \\n\\r\\t]*"  # how xgrammar's any-whitespace JSON grammar spells a gap between tokens
GAP_RULE = "scaleinfer_json_gap"  # a name xgrammar never gives a rule (its are basic_*, root_*, and $defs names)
_UNION_ROOT = re.compile(r"root ::= \(\((\w+)\) \| \((\w+)\)\)")


class WhitespacePatternError(ValueError):
    """The pattern cannot be honoured (a bad regex, or a grammar this module cannot rewrite)."""


def json_grammar_with_whitespace(schema: dict[str, Any] | str, pattern: str, strict_mode: bool = True) -> str:
    """EBNF for `schema` (a JSON schema, or its text) with every gap between tokens matching `pattern`."""
    import xgrammar

    text = schema if isinstance(schema, str) else json.dumps(schema)
    grammar = str(xgrammar.Grammar.from_json_schema(text, any_whitespace=True, strict_mode=strict_mode))
    if ANY_WHITESPACE not in grammar or GAP_RULE in grammar:
        raise WhitespacePatternError("this xgrammar's JSON grammar does not spell whitespace as expected")
    gaps = xgrammar.Grammar.from_ebnf(grammar.replace(ANY_WHITESPACE, GAP_RULE) + f'\n{GAP_RULE} ::= ""\n')
    try:
        whitespace = xgrammar.Grammar.from_regex(pattern)
    except Exception as exc:  # xgrammar raises RuntimeError for a bad regex, naming where it failed
        raise WhitespacePatternError(str(exc)) from exc
    return _rooted(str(xgrammar.Grammar.union(gaps, whitespace)).splitlines())


def _rooted(lines: list[str]) -> str:
    """The union's lines with its root the JSON grammar's and GAP_RULE the whitespace grammar's root."""
    match = _UNION_ROOT.fullmatch(lines[0])
    gap_lines = [i for i, line in enumerate(lines) if line.startswith(f"{GAP_RULE} ::=")]
    if match is None or len(gap_lines) != 1:
        raise WhitespacePatternError("this xgrammar writes unions in an unexpected form")
    json_root, whitespace_root = match.groups()
    lines[0] = f"root ::= (({json_root}))"
    lines[gap_lines[0]] = f"{GAP_RULE} ::= (({whitespace_root}))"
    return "\n".join(lines)
