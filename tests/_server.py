"""Test helpers for server processes (tests/test_serve.py, tests/test_llama_server.py): start one on
127.0.0.1, wait until it is ready, collect its output, and always end it."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Terminate `proc` if it still runs, and kill it if it has not exited `timeout` seconds later."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


class ServerProcess:
    """A server subprocess whose merged stdout/stderr a thread collects into `lines`.

    The constructor returns once `ready()` is true; if the process exits first, or `start_timeout`
    seconds pass, it stops the process and fails the test with the end of its log. Subclasses say
    what ready means (a log line, a health endpoint) and their name in failure messages."""

    name = "the server"

    def __init__(self, argv: list[str], start_timeout: float = 120, poll_s: float = 0.2):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + start_timeout
        while not self.ready():
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)    # the last lines it wrote
                self.stop()
                pytest.fail(f"{self.name} exited ({self.proc.returncode}) before it was ready:\n{self.log[-4000:]}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{self.name} was not ready after {start_timeout:.0f} s:\n{self.log[-4000:]}")
            time.sleep(poll_s)

    def ready(self) -> bool:
        raise NotImplementedError

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        stop_process(self.proc)
