"""OpenAI-compatible HTTP server over the AsyncLLMEngine."""

from scaleinfer.server.app import build_app, run_server

__all__ = ["build_app", "run_server"]
