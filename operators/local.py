"""Local execution: run a command in a child process of the worker, its output streamed into the task log.

The child gets its own process group, so stopping it (task killed, execution timeout, any exception while
streaming) stops everything it started: SIGTERM to the group, then SIGKILL after a grace period.
Progress bars that redraw with carriage returns are split into lines too, so they reach the log.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass

_LINE_END = re.compile(rb"[\r\n]")


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    tail: tuple[str, ...]  # the last lines of output, for error messages

    @property
    def last_error(self) -> str:
        """The most telling line: the last `error:` line, else the last line."""
        for line in reversed(self.tail):
            if line.lower().startswith("error:"):
                return line
        return self.tail[-1] if self.tail else ""


class LocalCommandRunner:
    """Runs one command at a time; `terminate()` may be called from a signal handler or another thread."""

    def __init__(self, log: logging.Logger | None = None, kill_grace_seconds: float = 30.0, tail_lines: int = 40):
        self.log = log or logging.getLogger(__name__)
        self.kill_grace_seconds = kill_grace_seconds
        self.tail_lines = tail_lines
        self.process: subprocess.Popen | None = None

    def run(self, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> CommandResult:
        self.log.info("Running: %s", " ".join(argv))
        tail: deque[str] = deque(maxlen=self.tail_lines)
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
            start_new_session=True,
            restore_signals=True,
        )
        try:
            self._stream(self.process.stdout, tail)
            code = self.process.wait()
        except BaseException:
            # Execution timeout (AirflowTaskTimeout), SIGTERM handling, KeyboardInterrupt...: never leave
            # the child running behind a task that is no longer watching it.
            self.terminate()
            raise
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()
        self.log.info("Command exited with status %s", code)
        return CommandResult(code, tuple(tail))

    def _stream(self, pipe, tail: deque[str]) -> None:
        buf = b""
        while chunk := pipe.read1(65536):
            buf += chunk
            *lines, buf = _LINE_END.split(buf)
            for raw in lines:
                self._emit(raw, tail)
        if buf:
            self._emit(buf, tail)

    def _emit(self, raw: bytes, tail: deque[str]) -> None:
        line = raw.decode("utf-8", errors="backslashreplace").rstrip()
        if line:
            self.log.info("%s", line)
            tail.append(line)

    def terminate(self) -> None:
        """SIGTERM to the child's process group, SIGKILL if it is still there after the grace period."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            return
        self.log.warning("Stopping command (process group %s)", pgid)
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + self.kill_grace_seconds
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        try:
            os.killpg(pgid, signal.SIGKILL)  # also reaps grandchildren that ignored SIGTERM
        except ProcessLookupError:
            pass
        proc.wait()
