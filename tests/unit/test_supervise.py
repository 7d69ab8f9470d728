"""The supervisor every local component runs under: restart with backoff, give up on a crash loop,
never retry a configuration error, stop (and say who asked) on SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiermesh.control.supervise import backoff_s, describe_exit


def supervise(tmp_path: Path, *command: str, max_restarts: int = 5) -> tuple[subprocess.Popen[str], Path]:
    status = tmp_path / "status.json"
    argv = [sys.executable, "-m", "tiermesh.control.supervise", "--name", "demo", "--status", str(status)]
    argv += ["--max-restarts", str(max_restarts), "--", *command]
    return subprocess.Popen(argv, stderr=subprocess.PIPE, text=True), status


def read_when(status: Path, condition, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            written = json.loads(status.read_text())
        except (OSError, ValueError):
            written = {}
        if written and condition(written):
            return written
        time.sleep(0.05)
    raise AssertionError(f"status never matched; last: {status.read_text() if status.exists() else None}")


def test_backoff_doubles_from_half_a_second_and_is_capped():
    assert [backoff_s(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_s(20) == 30.0


def test_exits_are_described_as_an_operator_reads_them():
    assert describe_exit(-9) == "signal SIGKILL"
    assert describe_exit(3) == "exit code 3"


def test_a_killed_child_is_started_again_and_sigterm_stops_both(tmp_path):
    process, status = supervise(tmp_path, "sleep", "60")
    try:
        first = read_when(status, lambda s: s["state"] == "running")
        os.kill(first["pid"], signal.SIGKILL)
        second = read_when(status, lambda s: s["state"] == "running" and s["pid"] != first["pid"])
        assert second["restarts"] == 1 and second["last_exit"] == "signal SIGKILL"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
    stopped = json.loads(status.read_text())
    assert stopped["state"] == "stopped"
    with pytest.raises(ProcessLookupError):
        os.kill(second["pid"], 0)
    log = process.stderr.read()
    assert "exited with signal SIGKILL; restart 1 in 0.5s" in log
    assert f"received SIGTERM from pid {os.getpid()}" in log  # who stopped it, always


def test_a_crash_loop_is_given_up_after_the_limit(tmp_path):
    process, status = supervise(tmp_path, sys.executable, "-c", "raise SystemExit(1)", max_restarts=2)
    assert process.wait(timeout=30) == 1
    written = json.loads(status.read_text())
    assert written["state"] == "crashloop" and written["restarts"] == 2
    assert written["last_exit"] == "exit code 1"
    assert "not restarting (a crash loop)" in process.stderr.read()


def test_a_configuration_error_is_not_retried(tmp_path):
    process, status = supervise(tmp_path, sys.executable, "-c", "raise SystemExit(2)")
    assert process.wait(timeout=10) == 2
    written = json.loads(status.read_text())
    assert written["state"] == "failed" and written["restarts"] == 0


def test_sigterm_during_the_backoff_stops_without_restarting(tmp_path):
    process, status = supervise(tmp_path, sys.executable, "-c", "raise SystemExit(1)", max_restarts=50)
    try:
        read_when(status, lambda s: s.get("restarts", 0) >= 4)  # the wait is now 4 s
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=3)
    finally:
        process.kill()
    assert json.loads(status.read_text())["state"] == "stopped"


def test_what_a_dead_child_left_behind_is_killed_before_the_restart(tmp_path):
    # the child starts a grandchild that outlives it (as vLLM's engine outlives a killed llm tier)
    script = "import subprocess, sys, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    process, status = supervise(tmp_path, sys.executable, "-c", script)
    try:
        first = read_when(status, lambda s: s["state"] == "running")
        grandchild = wait_for_child_of(first["pid"])
        os.kill(first["pid"], signal.SIGKILL)
        read_when(status, lambda s: s["state"] == "running" and s["pid"] != first["pid"])
        assert not alive(grandchild)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
    assert "left behind by the exited process" in process.stderr.read()


def wait_for_child_of(pid: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("no grandchild started")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
