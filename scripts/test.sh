#!/usr/bin/env bash
# The README's second command (and CI's): install what is missing, lint, run every test.
# Unit, contract and integration tests all run; integration tests start real processes
# (valkey-server, Envoy, tiers) on free loopback ports. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --dev || exit 1

printf '\033[1m==> lint\033[0m\n'
.venv/bin/ruff check . && .venv/bin/ruff format --check . || exit 1

printf '\033[1m==> tests\033[0m\n'
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest "$@"
status=$?
if [[ $status == 5 ]]; then
  echo "error: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
exit $status
