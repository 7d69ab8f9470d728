"""`python -m tiermesh.control.supervise --name NAME --status FILE -- CMD...`: keep CMD running.

The local runner starts every component (store, trace sink, Envoy, each tier replica) under one of
these small parents, detached from the command that started the mesh:

* CMD exits by itself (a crash, an OOM kill, a SIGKILL from an operator) → it is started again
  after an exponential backoff (0.5 s, 1 s, 2 s, ... capped), so a dead replica comes back alone;
* it keeps failing within seconds of each start `--max-restarts` times in a row → the supervisor
  gives up (a crash loop) and exits, and `tiermesh status` reports it with the end of its log;
  exit status 2 (the kit's "configuration error") is never retried: it will not fix itself;
* SIGTERM/SIGINT → forwarded to CMD, no restart, and the supervisor exits with CMD's status;
  who sent the signal (pid and command line) is logged, so an unexpected stop always says why;
* whenever CMD has exited, whatever it left behind in the supervisor's process group (vLLM's
  engine processes outlive a SIGKILLed llm tier) is killed before it starts again, so a restart
  never doubles the memory a component holds.

Envoy sets PR_SET_PDEATHSIG(SIGTERM) on itself, so it also needs a parent that outlives `tiermesh
up`. The state (`FILE`, JSON: the child's pid, restarts, last exit, since when it runs) is what
`tiermesh status` shows; it is replaced atomically, so readers never see half of it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# The kit exits 2 on a configuration error: restarting cannot help.
PERMANENT_EXIT_CODES = frozenset({2})
WATCHED = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}


def describe_exit(returncode: int) -> str:
    """'exit code 1' or 'signal SIGKILL', as an operator reads it."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def backoff_s(failures: int, *, first: float = 0.5, cap: float = 30.0) -> float:
    """Wait before restart number `failures` (1-based) of a run of quick failures: doubling, capped."""
    return min(cap, first * 2 ** max(0, failures - 1))


def leftovers() -> list[int]:
    """Processes of this process group other than this one: what an exited child left behind."""
    group, me, found = os.getpgid(0), os.getpid(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            try:
                if os.getpgid(int(entry.name)) == group:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def sender(pid: int) -> str:
    """A signal sender as a log line names it: its pid and command line when it still runs."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        cmdline = "(gone)"
    return f"pid {pid} {cmdline.strip()[:200]}"


class Supervisor:
    """Runs one command, restarts it when it dies, records what happened in a status file."""

    def __init__(self, name: str, argv: list[str], status_file: Path, *, max_restarts: int, stable_s: float):
        self.name = name
        self.argv = argv
        self.status_file = status_file
        self.max_restarts = max_restarts
        self.stable_s = stable_s
        self.status: dict[str, Any] = {"name": name, "supervisor": os.getpid(), "restarts": 0}
        self.child: subprocess.Popen[bytes] | None = None

    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        print(f"{stamp} supervise[{self.name}]: {message}", file=sys.stderr, flush=True)

    def save(self, **changes: Any) -> None:
        self.status.update(changes)
        temporary = self.status_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.status) + "\n")
        os.replace(temporary, self.status_file)

    def start(self) -> None:
        # The supervisor blocks the signals it waits for; the child must not inherit that.
        self.child = subprocess.Popen(
            self.argv, preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, WATCHED)
        )
        self.save(state="running", pid=self.child.pid, started=time.time())

    def wait(self) -> tuple[int, signal.Signals | None]:
        """Until the child exits (its return code, None) or a stop signal arrives (None, the signal)."""
        assert self.child is not None
        while True:
            stop_signal = self._stop_signal(signal.sigtimedwait(WATCHED, 1.0))
            if self.child.poll() is not None:
                return self.child.returncode, None
            if stop_signal is not None:
                return 0, stop_signal

    def stop(self, signum: signal.Signals) -> int:
        """Forward the stop signal and wait for the child (the runner SIGKILLs us both after its grace)."""
        assert self.child is not None
        self.child.send_signal(signum)
        returncode = self.child.wait()
        self.clean_up()
        self.save(state="stopped", last_exit=describe_exit(returncode))
        return 0 if returncode == -signum else returncode  # stopped as asked

    def clean_up(self) -> None:
        """SIGKILL what the exited child left in the group (its own children, orphaned)."""
        for pid in leftovers():
            self.log(f"killing {sender(pid)}, left behind by the exited process")
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def pause(self, seconds: float) -> signal.Signals | None:
        """Sleep before a restart; a stop signal meanwhile ends the wait (and the supervisor)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            stop_signal = self._stop_signal(signal.sigtimedwait(WATCHED, left))
            if stop_signal is not None:
                return stop_signal
        return None

    def _stop_signal(self, info: Any) -> signal.Signals | None:
        """The stop signal `sigtimedwait` returned (logged with its sender), or None."""
        if info is None or info.si_signo == signal.SIGCHLD:
            return None
        received = signal.Signals(info.si_signo)
        self.log(f"received {received.name} from {sender(info.si_pid)}: stopping")
        return received

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
        if os.getpgid(0) != os.getpid():
            os.setpgid(0, 0)  # a group of its own: clean_up must never reach beyond this component
        failures = 0
        while True:
            self.start()
            started = time.monotonic()
            returncode, stop_signal = self.wait()
            if stop_signal is not None:
                return self.stop(stop_signal)
            exit_text = describe_exit(returncode)
            self.clean_up()
            failures = 1 if time.monotonic() - started >= self.stable_s else failures + 1
            if returncode in PERMANENT_EXIT_CODES or failures > self.max_restarts:
                why = "a configuration error" if returncode in PERMANENT_EXIT_CODES else "a crash loop"
                self.log(f"{self.argv[0]} stopped with {exit_text}: not restarting ({why})")
                self.save(
                    state="crashloop" if failures > self.max_restarts else "failed", last_exit=exit_text
                )
                return returncode or 1
            delay = backoff_s(failures)
            self.log(f"exited with {exit_text}; restart {self.status['restarts'] + 1} in {delay:.1f}s")
            self.save(state="backoff", last_exit=exit_text, restarts=self.status["restarts"] + 1, pid=None)
            if self.pause(delay) is not None:
                self.save(state="stopped")
                return returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tiermesh.control.supervise",
        description="Run a command, restart it with backoff when it dies, forward SIGTERM/SIGINT.",
    )
    parser.add_argument("--name", required=True, help="the component's name, for logs and status")
    parser.add_argument("--status", required=True, type=Path, help="JSON file the state is written to")
    parser.add_argument(
        "--max-restarts", type=int, default=5, help="quick failures in a row before giving up"
    )
    parser.add_argument(
        "--stable-s", type=float, default=60.0, help="a run this long resets the failure count"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("a command to run is required after --")
    supervisor = Supervisor(
        args.name, command, args.status, max_restarts=args.max_restarts, stable_s=args.stable_s
    )
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
