"""`scaleinfer chat` on a pseudo-terminal, as a user types into it: Ctrl-C stops a reply and the session goes on,
an empty line sends nothing, a history past the context loses its oldest turns with a note, Ctrl-D ends it. One
process serves the whole session; every wait is for text the terminal shows (its timeout only bounds a failure)."""

from __future__ import annotations

import io
import os
import pty
import select
import signal
import sys
import time

import pytest

FAILURE_BOUND_S = 240


class Terminal:
    """A child on a pty it has as its controlling terminal, so that ^C is SIGINT and ^D at a line's start EOF."""

    def __init__(self, args: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: nothing of pytest's may run here
            os.execv(sys.executable, [sys.executable, *args])
        self.text, self.seen, self.exit_code = "", 0, None

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def expect(self, fragment: str) -> str:
        """Everything shown from the last match through the next `fragment`."""
        deadline = time.monotonic() + FAILURE_BOUND_S
        while (found := self.text.find(fragment, self.seen)) < 0:
            assert self._read(deadline - time.monotonic()), f"no {fragment!r} in {self.text[self.seen:]!r}"
        shown, self.seen = self.text[self.seen:found + len(fragment)], found + len(fragment)
        return shown

    def expect_more(self) -> None:
        """Wait until anything past the last match is shown."""
        deadline = time.monotonic() + FAILURE_BOUND_S
        while len(self.text) <= self.seen:
            assert self._read(deadline - time.monotonic()), f"nothing after {self.text[-200:]!r}"

    def _read(self, seconds: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, seconds))
        if not ready:
            return False
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # the child closed the terminal
            return False
        self.text += chunk.decode(errors="replace").replace("\r\n", "\n")
        return bool(chunk)

    def wait(self) -> int:
        deadline = time.monotonic() + FAILURE_BOUND_S
        while time.monotonic() < deadline:
            self._read(0.5)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                self.exit_code = os.waitstatus_to_exitcode(status)
                return self.exit_code
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"chat did not exit: {self.text[-500:]!r}")


@pytest.fixture(scope="module")
def session():
    terminal = Terminal(["-m", "scaleinfer", "chat", "--device", "cpu", "--temperature", "0", "--max-tokens", "24",
                         "--max-model-len", "224"])
    yield terminal
    if terminal.exit_code is None:  # a test failed before Ctrl-D ended it
        os.kill(terminal.pid, signal.SIGKILL)
        os.waitpid(terminal.pid, 0)


def test_the_startup_line_comes_first(session):
    shown = session.expect("> ")
    assert "smollm2-135m (LlamaForCausalLM) on cpu, float32" in shown and "max_model_len 224" in shown


def test_ctrl_c_stops_the_reply_not_the_session(session):
    session.type("Tell me a very long story about a dragon and a knight.\n")
    session.expect("knight.\n")  # the terminal's echo
    session.expect_more()  # the reply has started
    session.type("\x03")
    assert "finish: abort" in session.expect("[stopped]") + session.expect("> ")


def test_another_turn_after_a_stop_answers(session):
    session.type("What is the capital of France?\n")
    assert "Paris" in session.expect("> ")


def test_an_empty_line_sends_nothing_and_does_not_quit(session):
    session.type("\n")
    assert "tokens, time to first token" not in session.expect("> ")


def test_a_history_past_the_context_loses_its_oldest_turns(session):
    session.type("Please count these words: " + "apple " * 130 + "\n")
    shown = session.expect("> ")
    assert "oldest messages were dropped: the history no longer fit the context of 224 tokens" in shown


def test_a_message_too_long_alone_is_not_sent_and_the_chat_goes_on(session):
    session.type("pear " * 300 + "\n")
    assert "it was not sent]" in session.expect("> ")
    session.type("What is the capital of France?\n")
    # answered (its summary line), from a history without the refused message (no pear in the reply). What the
    # 135M model says after the trimmed history is its own: "Paris" came, or French about France, with the
    # package versions of the day (the plain turn above still checks for Paris).
    shown = session.expect("> ")
    assert "tokens, time to first token" in shown and "pear" not in shown


def test_ctrl_d_ends_the_session(session):
    session.type("\x04")
    assert session.wait() == 0


def test_a_model_without_a_chat_template_is_refused_at_start(tiny_models, capsys, monkeypatch):
    from scaleinfer import cli

    folder = str(tiny_models["llama2"][0])
    monkeypatch.setattr(sys, "stdin", io.StringIO("never read\n"))
    assert cli.main(["chat", "--model", folder, "--device", "cpu", "--max-model-len", "64"]) == 1
    err = capsys.readouterr().err
    assert f"error: model {folder!r} has no chat template, which `scaleinfer chat` needs" in err
    assert "--chat-template" in err
