"""`python -m tiermesh.control.supervise CMD...`: run CMD as a child and live exactly as long as it does.

Envoy sets PR_SET_PDEATHSIG(SIGTERM) on itself, so it stops as soon as the process that started
it exits. The runner's `up` returns while the mesh keeps running, so Envoy gets this small parent
that forwards SIGTERM/SIGINT and exits with the child's status.
"""

from __future__ import annotations

import signal
import subprocess
import sys


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m tiermesh.control.supervise COMMAND [ARGS...]", file=sys.stderr)
        return 2
    child = subprocess.Popen(argv)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: child.send_signal(received))
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
