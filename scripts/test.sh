#!/usr/bin/env bash
# The README's second command (and CI's): install what is missing, lint, check the layers, run
# every test. Unit, contract and integration tests all run; integration tests start real processes
# (valkey-server, Envoy, tiers) on free loopback ports. Extra arguments go to pytest: the fast lane
# while developing is `scripts/test.sh -m "unit and not slow"` (docs/testing.md).
set -uo pipefail
cd "$(dirname "$0")/.."
say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

scripts/install.sh --dev || exit 1

# docker-compose validates docker-compose.yml in tests/contract/test_compose.py (no Docker engine
# needed); Debian packages it.
if ! command -v docker-compose >/dev/null 2>&1; then
  say "installing docker-compose (validates docker-compose.yml)"
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    apt-get install -y -qq docker-compose >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null; } \
      || die "apt-get could not install docker-compose"
  else
    die "the compose checks need docker-compose: sudo apt-get install docker-compose"
  fi
fi

say "lint"
.venv/bin/ruff check . && .venv/bin/ruff format --check . || exit 1

say "layers (lint-imports: control plane -> tiers -> kit -> stubs, tiers independent, no cycles)"
.venv/bin/lint-imports --no-cache | sed -n '/^Contracts$/,$p' | grep -v '^-*$'
[[ ${PIPESTATUS[0]} == 0 ]] || exit 1

say "tests"
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest "$@"
status=$?
if [[ $status == 5 ]]; then
  echo "error: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
exit $status
