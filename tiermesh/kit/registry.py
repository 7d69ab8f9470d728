"""The local model registry: immutable, content-addressed model versions with a `latest` pointer.

Layout under `$TIERMESH_MODELS` (default `$TIERMESH_HOME/models`, i.e. `./var/models`):

    <name>/<version>/           the artifacts and metadata.json (never modified once published)
    <name>/latest -> <version>  a symlink, swapped atomically
    <name>/history.json         the versions `latest` pointed to, newest last (for rollback)

A version is MAJOR.MINOR.PATCH (models), or the first 12 hex digits of its content digest
(content-named artifacts such as retriever indexes: equal content, equal name).

A publish copies the artifacts into a hidden temporary folder, writes metadata.json (name,
version, created, source, sha256 of every file and of the whole version, metrics, previous
version, changelog), fsyncs everything and renames the folder into place, so a half-written
version is never visible. Publishing the same content again is a no-op.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

METADATA = "metadata.json"
LATEST = "latest"
HISTORY = "history.json"
_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")
_CONTENT_NAME = re.compile(r"^[0-9a-f]{12}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class RegistryError(Exception):
    """A registry operation failed; the message says which model and version."""


def home() -> Path:
    """tiermesh's working directory for models, indexes and runtime state (`TIERMESH_HOME`)."""
    return Path(os.environ.get("TIERMESH_HOME") or Path.cwd() / "var").resolve()


def models_root() -> Path:
    """Where the registry lives: `TIERMESH_MODELS`, else `$TIERMESH_HOME/models`."""
    return Path(os.environ.get("TIERMESH_MODELS") or home() / "models").resolve()


def _semver_key(version: str) -> tuple[int, int, int]:
    match = _SEMVER.match(version)
    if not match:
        raise RegistryError(f"version {version!r} is not MAJOR.MINOR.PATCH")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def _version_key(version: ModelVersion) -> tuple:
    """Semantic versions in numeric order; content-named versions in order of creation."""
    if _SEMVER.match(version.version):
        return (0, _semver_key(version.version))
    return (1, version.metadata.get("created", ""), version.version)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_digest(files: dict[str, str]) -> str:
    """One digest for a version: sha256 over the sorted (path, file sha256) pairs."""
    digest = hashlib.sha256()
    for relative in sorted(files):
        digest.update(f"{relative}\0{files[relative]}\n".encode())
    return "sha256:" + digest.hexdigest()


def _artifact_files(folder: Path) -> Iterable[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != METADATA)


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
        descriptor = os.open(path, flags)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """One published version: where it lives and what its metadata says."""

    name: str
    version: str
    path: Path
    metadata: dict[str, Any]

    @property
    def digest(self) -> str:
        return self.metadata["sha256"]

    def artifact(self, relative: str) -> Path:
        path = self.path / relative
        if not path.is_file():
            raise RegistryError(f"{self.name} {self.version}: artifact {relative!r} is missing")
        return path


class Registry:
    """Read and publish model versions under one root folder."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or models_root()).resolve()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[ModelVersion]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        found = [
            self._read(name, p.name)
            for p in folder.iterdir()
            if p.is_dir()
            and (_SEMVER.match(p.name) or _CONTENT_NAME.match(p.name))
            and (p / METADATA).is_file()
        ]
        return sorted(found, key=_version_key)

    def latest(self, name: str) -> ModelVersion | None:
        pointer = self.root / name / LATEST
        if not pointer.is_symlink():
            return None
        return self._read(name, os.readlink(pointer))

    def get(self, name: str, version: str = LATEST) -> ModelVersion:
        """A version by number, or the one `latest` points to."""
        if version == LATEST:
            found = self.latest(name)
            if found is None:
                raise RegistryError(
                    f"model {name!r} has no published version under {self.root} "
                    "(run the set-up, or `tiermesh models prepare`)"
                )
            return found
        if not (self.root / name / version / METADATA).is_file():
            known = ", ".join(v.version for v in self.versions(name)) or "none"
            raise RegistryError(f"model {name!r} has no version {version!r} (published: {known})")
        return self._read(name, version)

    def _read(self, name: str, version: str) -> ModelVersion:
        path = self.root / name / version
        try:
            metadata = json.loads((path / METADATA).read_text())
        except (OSError, ValueError) as error:
            raise RegistryError(f"{name} {version}: unreadable {METADATA}: {error}") from None
        return ModelVersion(name, version, path, metadata)

    def publish(
        self,
        name: str,
        source: Path,
        *,
        version: str | None = None,
        content_named: bool = False,
        origin: dict[str, Any] | None = None,
        parameters: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        changelog: str = "",
        make_latest: bool = True,
    ) -> ModelVersion:
        """Publish the files under `source` as a new immutable version of `name`.

        Without `version` the next patch version is used; content equal to the current latest
        publishes nothing and returns the latest. With `content_named` the version is named by
        the content digest, and publishing content that exists already returns that version.
        """
        if not _NAME.match(name):
            raise RegistryError(f"model name {name!r}: use lowercase letters, digits, '.', '_' and '-'")
        files = {str(p.relative_to(source)): file_sha256(p) for p in _artifact_files(source)}
        if not files:
            raise RegistryError(f"{source}: no artifact files to publish")
        digest = tree_digest(files)
        current = self.latest(name)
        if content_named:
            version = digest.removeprefix("sha256:")[:12]
            if (self.root / name / version / METADATA).is_file():
                return self._read(name, version)
        elif version is None and current is not None and current.digest == digest:
            return current
        existing = self.versions(name)
        if version is None:
            major, minor, patch = _semver_key(existing[-1].version) if existing else (1, 0, -1)
            version = f"{major}.{minor}.{patch + 1}"
        if not content_named:
            _semver_key(version)
        if any(v.version == version for v in existing):
            raise RegistryError(f"{name} {version} is already published; versions are immutable")

        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f".staging-{version}-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(source, staging, ignore=shutil.ignore_patterns(METADATA))
            staging.chmod(0o755)  # the source may be a private temporary folder
            metadata = {
                "name": name,
                "version": version,
                "created": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                "source": origin or {},
                "sha256": digest,
                "files": files,
                "parameters": parameters or {},
                "metrics": metrics or {},
                "previous_version": current.version if current else None,
                "changelog": changelog,
            }
            (staging / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
            _fsync_tree(staging)
            os.rename(staging, folder / version)
            _fsync_tree(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if make_latest:
            self.set_latest(name, version)
        return self._read(name, version)

    def set_latest(self, name: str, version: str) -> ModelVersion:
        """Point `latest` at an already published version and remember it for rollback."""
        target = self._point(name, version)
        history = self.history(name)
        if not history or history[-1] != version:
            self._write_history(name, [*history, version])
        return target

    def rollback(self, name: str) -> ModelVersion:
        """Point `latest` back at the version it pointed to before the current one."""
        history = self.history(name)
        current = self.latest(name)
        while history and current is not None and history[-1] != current.version:
            history.pop()  # `latest` was moved by hand; forget what came after it
        if len(history) < 2:
            raise RegistryError(f"{name}: no earlier version to roll back to")
        target = self._point(name, history[-2])
        self._write_history(name, history[:-1])
        return target

    def history(self, name: str) -> list[str]:
        """The versions `latest` has pointed to, oldest first (rolled-back ones removed)."""
        try:
            return list(json.loads((self.root / name / HISTORY).read_text()))
        except (OSError, ValueError):
            return []

    def _write_history(self, name: str, versions: list[str]) -> None:
        temporary = self.root / name / f".history-{uuid.uuid4().hex[:8]}"
        temporary.write_text(json.dumps(versions) + "\n")
        os.replace(temporary, self.root / name / HISTORY)

    def _point(self, name: str, version: str) -> ModelVersion:
        target = self.get(name, version)
        pointer = self.root / name / LATEST
        temporary = self.root / name / f".latest-{uuid.uuid4().hex[:8]}"
        os.symlink(version, temporary)
        os.replace(temporary, pointer)
        return target
