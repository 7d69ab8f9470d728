"""What a tier's commands get from the `tiermesh` root: where the running mesh is.

Each tier adds its own commands to the root's parser (`add_commands(sub)` in `services/<tier>/cli.py`).
The root lives in the control plane, which knows the running mesh; it hands that knowledge to every
command as `args.mesh`, so a tier's command module never imports the control plane.

Command modules import only the standard library and light modules at import time: building the
parser must work where only the CLI's own needs are installed (the Envoy image renders its
configuration with `tiermesh envoy render`).
"""

from __future__ import annotations

from typing import Protocol


class MeshAddresses(Protocol):
    """Where a command reaches the mesh."""

    def envoy(self) -> str:
        """host:port of Envoy's gRPC listener: the mesh's front door for every tier."""
        ...

    def store(self) -> str:
        """redis:// URL of the mesh's store (publish announcements, keys, experiments)."""
        ...
