"""Envoy runtime keys kept on disk, so a restarted Envoy keeps what operators set live (A/B weights).

Envoy's disk runtime layer reads one file per key below a symlink it watches; the admin layer
above it takes live changes at once. `tiermesh traffic` writes both (see `traffic.EnvoyAdmin`).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path


class PersistedRuntime:
    """Runtime keys on disk for Envoy's disk layer: `<root>/current` is a symlink to a version
    directory holding one file per key under `keys/` (`tiermesh.weights.llm.llm` is the file
    `keys/tiermesh/weights/llm/llm`). A write makes a new version and swaps the symlink with a
    rename, so Envoy (which watches for it) never reads half of a change."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure(self) -> None:
        """An empty layer when there is none yet (Envoy refuses to start without the symlink)."""
        if not (self.root / "current").exists():
            self.write({})

    def reset(self) -> None:
        """Forget every key: a freshly started mesh starts from its configuration's weights."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "current").unlink(missing_ok=True)
        self.write({})

    def read(self) -> dict[str, str]:
        keys = self.root / "current" / "keys"
        if not keys.is_dir():
            return {}
        return {
            ".".join(path.relative_to(keys).parts): path.read_text().strip()
            for path in sorted(keys.rglob("*"))
            if path.is_file()
        }

    def write(self, values: Mapping[str, str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        merged = {**self.read(), **values}
        version = self.root / f"v{time.time_ns()}"
        for key, value in merged.items():
            path = version / "keys" / Path(*key.split("."))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(value)
        (version / "keys").mkdir(parents=True, exist_ok=True)
        link = self.root / "current.tmp"
        link.unlink(missing_ok=True)
        link.symlink_to(version.name)
        os.replace(link, self.root / "current")
        # the version before stays, in case Envoy is still reading it
        for old in self.versions()[:-2]:
            shutil.rmtree(old, ignore_errors=True)

    def versions(self) -> list[Path]:
        """The version directories this layer wrote (`v<nanoseconds>`), oldest first."""
        written = [
            path for path in self.root.iterdir() if re.fullmatch(r"v\d{19}", path.name) and path.is_dir()
        ]
        return sorted(written, key=lambda path: int(path.name[1:]))
