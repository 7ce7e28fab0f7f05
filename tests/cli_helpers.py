"""What a command would start, captured before anything loads: the EngineConfig it builds and the keyword
arguments it gives run_server (for the tests of flags reaching the config)."""

from __future__ import annotations

from typing import Any

import pytest


class Captured(Exception):
    """Raised in place of the engine or server the command would start."""


def started_by(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict[str, Any]]:
    """(the EngineConfig, run_server's keyword arguments, {} for generate and chat) of `scaleinfer argv`."""
    import scaleinfer.engine.llm_engine as llm_engine
    import scaleinfer.server.app as app
    from scaleinfer import cli

    calls = []

    def capture(config, *args, **kwargs):
        calls.append((config, kwargs))
        raise Captured

    monkeypatch.setattr(llm_engine, "LLMEngine", capture)
    monkeypatch.setattr(app, "run_server", capture)
    with pytest.raises(Captured):
        cli.main(argv)
    return calls[0]


def config_of(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    return started_by(argv, monkeypatch)[0]
