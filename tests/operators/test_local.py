"""Local execution: output streamed line by line, exit status, and a stopped task stops its processes."""

from __future__ import annotations

import logging
import os
import sys
import textwrap
import threading
import time

import pytest

from operators.local import LocalCommandRunner


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); look at its state
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_output_is_streamed_line_by_line_including_progress_redraws(caplog):
    caplog.set_level(logging.INFO, logger="t")
    runner = LocalCommandRunner(log=logging.getLogger("t"))
    result = runner.run(
        py("""
        import sys
        print("one", flush=True)
        sys.stderr.write("10%\\r50%\\r100%\\n")
        print("error: bad input", file=sys.stderr)
        sys.exit(2)
    """)
    )
    assert result.exit_code == 2
    logged = [r.getMessage() for r in caplog.records if r.name == "t"]
    for line in ("one", "10%", "50%", "100%", "error: bad input"):
        assert line in logged
    assert result.last_error == "error: bad input"


def test_lines_reach_the_log_while_the_command_runs(caplog):
    caplog.set_level(logging.INFO, logger="t")
    runner = LocalCommandRunner(log=logging.getLogger("t"))
    seen_at = {}

    def watch():
        while "first" not in seen_at:
            if any(r.getMessage() == "first" for r in caplog.records):
                seen_at["first"] = time.monotonic()
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    runner.run(
        py("""
        import time
        print("first", flush=True)
        time.sleep(1.5)
        print("second", flush=True)
    """)
    )
    watcher.join(2)
    assert seen_at["first"] - t0 < 1.4  # logged before the command finished


def test_terminate_stops_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    runner = LocalCommandRunner(log=logging.getLogger("t"), kill_grace_seconds=2)
    # The child starts a grandchild that ignores SIGTERM, then both wait for a long time.
    argv = py(f"""
        import subprocess, sys, time
        g = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
        open({str(pidfile)!r}, "w").write(str(g.pid))
        print("started", flush=True)
        time.sleep(300)
    """)
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault("r", runner.run(argv)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    child = runner.process.pid
    runner.terminate()
    thread.join(10)
    assert not thread.is_alive()
    assert done["r"].exit_code != 0
    time.sleep(0.2)
    assert not alive(child) and not alive(grandchild)


def test_an_exception_while_streaming_kills_the_child(tmp_path, monkeypatch):
    """What an execution timeout does: AirflowTaskTimeout is raised inside run(); the child must not survive."""
    runner = LocalCommandRunner(log=logging.getLogger("t"), kill_grace_seconds=1)

    class Timeout(BaseException):
        pass

    def boom(pipe, tail):
        raise Timeout()

    monkeypatch.setattr(runner, "_stream", boom)
    with pytest.raises(Timeout):
        runner.run(py("import time; time.sleep(300)"))
    assert runner.process.poll() is not None
