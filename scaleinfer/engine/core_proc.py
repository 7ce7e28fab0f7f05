"""The engine core in a process of its own, and the front's handle on it (CoreProcess).

Two ZeroMQ ipc:// sockets in a fresh temporary folder: the front PUSHes msgspec-encoded commands (tokenized
requests, aborts) and PULLs msgspec-encoded messages (CoreReady, then EngineCoreOutputs per step). Token ids
and small structs only; nothing is pickled after the process starts (its start arguments are, by spawn).

The process is started with spawn and is not daemonic: a tensor-parallel core spawns its own worker
processes. It ignores SIGINT (Ctrl-C reaches the whole process group; the front decides how to stop), and
exits by itself once the front's process is gone. The front notices a dead core within READER_POLL_S.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import zmq

from scaleinfer.config import EngineConfig
from scaleinfer.engine.core_loop import CoreLoop
from scaleinfer.engine.core_types import (
    CoreCommand,
    CoreFailed,
    CoreMessage,
    CoreReady,
    Shutdown,
    command_decoder,
    command_encoder,
    message_decoder,
    message_encoder,
)
from scaleinfer.errors import EngineDeadError
from scaleinfer.heap import frozen_heap
from scaleinfer.startup import engine_summary, print_startup

logger = logging.getLogger(__name__)
READER_POLL_S = 1.0  # how often the front's reader, with nothing to read, checks that the core lives
# A command waits at most this long for a core to take it (none connected: it died or has not started).
SEND_TIMEOUT_MS = 2000
SHUTDOWN_JOIN_S = 30.0


def run_core_process(config: EngineConfig, core_class: type, tokenizer_eos_token_id: int | None,
                     input_path: str, output_path: str, front_pid: int) -> None:
    """The core process's main: connect, load the model, send CoreReady, serve commands until Shutdown."""
    # Ctrl-C (SIGINT) and a supervisor's SIGTERM reach the whole process group (a terminal, systemd, docker stop):
    # the front drains its streams and then sends Shutdown, so the core must not die first. It cannot outlive
    # the front either: the loop ends when the front's pid is no longer its parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    context = zmq.Context()
    commands, messages = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    commands.connect(input_path)
    messages.connect(output_path)
    send = lambda message: messages.send(message_encoder.encode(message), copy=False)  # noqa: E731
    try:
        try:
            core = core_class(config, progress=False, tokenizer_eos_token_id=tokenizer_eos_token_id)
        except BaseException as exc:
            send(CoreFailed(f"engine core failed to start: {type(exc).__name__}: {exc}"))
            raise
        print_startup(engine_summary(core))  # to serve's stderr, before the front's line (sent on ready)
        with frozen_heap():  # the model and the libraries: no full collection walks them mid-run
            send(core.ready())  # after the start-up collection, which would hold up the first requests
            CoreLoop(core, _receiver(commands), send, lambda: os.getppid() == front_pid).run()
    finally:
        messages.close(linger=5000)  # what was sent last (outputs, CoreFailed) reaches the front before the exit


def _receiver(socket: zmq.Socket) -> Callable[[float | None], list[CoreCommand]]:
    def recv(timeout_s: float | None) -> list[CoreCommand]:
        if not socket.poll(None if timeout_s is None else int(timeout_s * 1000)):
            return []
        commands = [command_decoder.decode(socket.recv(copy=False))]
        with contextlib.suppress(zmq.Again):
            while True:
                commands.append(command_decoder.decode(socket.recv(zmq.NOBLOCK, copy=False)))
        return commands
    return recv


class CoreProcess:
    """The front's side: start the core process, send it commands, hand every message it sends to on_message
    (called on a reader thread, in order). A core that exits unasked reaches on_message as CoreFailed."""

    def __init__(self, config: EngineConfig, on_message: Callable[[CoreMessage], None],
                 tokenizer_eos_token_id: int | None, core_class: type | None = None) -> None:
        from scaleinfer.engine.core import EngineCore

        self.on_message = on_message
        self._folder = tempfile.mkdtemp(prefix="scaleinfer-core-")
        self._context = zmq.Context()
        self._commands = self._bind(zmq.PUSH, "commands")
        self._commands.setsockopt(zmq.SNDHWM, 0)  # never block a coroutine on a busy core: commands are small
        self._commands.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        self._messages = self._bind(zmq.PULL, "messages")
        self._send_lock = threading.Lock()  # zmq sockets are not thread-safe; coroutines and the reader send
        self._stopping = False
        args = (config, core_class or EngineCore, tokenizer_eos_token_id, self._address("commands"),
                self._address("messages"), os.getpid())
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_core_process, args=args, name="scaleinfer-engine-core", daemon=False)
        self.process.start()
        self._reader = threading.Thread(target=self._read, name="scaleinfer-core-reader", daemon=True)

    def _address(self, name: str) -> str:
        return f"ipc://{self._folder}/{name}"

    def _bind(self, kind: int, name: str) -> zmq.Socket:
        socket = self._context.socket(kind)
        # Unsent commands to a core that is gone are dropped at close, so closing (or collecting) the
        # context never waits on them: with zmq's default linger its term() would block for ever.
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(self._address(name))
        return socket

    def wait_ready(self) -> CoreReady:
        """Block until the model is loaded; raises EngineDeadError if the core failed to start."""
        while not self._messages.poll(int(READER_POLL_S * 1000)):
            if not self.process.is_alive():
                raise EngineDeadError(f"engine core process exited with code {self.process.exitcode} while "
                                      "starting")
        message = message_decoder.decode(self._messages.recv(copy=False))
        if isinstance(message, CoreFailed):
            self.process.join(10)
            raise EngineDeadError(message.message)
        self._reader.start()
        return message

    def send(self, command: Any) -> None:
        """Raises EngineDeadError when no core takes it within SEND_TIMEOUT_MS."""
        try:
            with self._send_lock:
                self._commands.send(command_encoder.encode(command), copy=False)
        except zmq.Again:
            raise EngineDeadError(f"the engine core took no command for {SEND_TIMEOUT_MS} ms: it is gone") from None

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def _read(self) -> None:
        while True:
            if self._messages.poll(int(READER_POLL_S * 1000)):
                message = message_decoder.decode(self._messages.recv(copy=False))
                self.on_message(message)
                if isinstance(message, CoreFailed):
                    return
            elif not self.process.is_alive():
                if not self._stopping:
                    self.on_message(CoreFailed(f"engine core process exited with code {self.process.exitcode}"))
                return

    def shutdown(self, timeout_s: float = SHUTDOWN_JOIN_S) -> None:
        """Ask the core to stop after its current step; kill it past timeout_s. Idempotent."""
        self._stopping = True
        if self.process.is_alive():
            with contextlib.suppress(zmq.ZMQError, EngineDeadError):
                self.send(Shutdown())
            self.process.join(timeout_s)
        if self.process.is_alive():
            logger.error("engine core did not stop within %.0f s; killing it", timeout_s)
            self.process.kill()
            self.process.join(10)
        if self._reader.is_alive():  # it returns within READER_POLL_S once the core is gone
            self._reader.join(10 * READER_POLL_S)
        if not self._reader.is_alive() and not self._context.closed:  # no socket closes under a polling thread
            self._context.destroy(linger=0)
        shutil.rmtree(self._folder, ignore_errors=True)
