"""Write Envoy's Kubernetes bootstrap, deploy/k8s/base/envoy/bootstrap.yaml (the envoy-bootstrap ConfigMap).

    .venv/bin/python deploy/k8s/bootstrap.py           # rewrite it
    .venv/bin/python deploy/k8s/bootstrap.py --check   # exit 1 if it is stale

It is the xDS control plane's own bootstrap (`tiermesh.control.xds.resources.mesh_config`, the same
split of the envoy/*.tmpl rendering that `python -m tiermesh.control.xds --bootstrap` writes), for
the ports in .env alone, with what differs in a pod: the listeners bind 0.0.0.0, the control plane
is the sidecar at 127.0.0.1:18000, and Envoy does not trace (no trace sink runs in the cluster).
tests/contract/test_k8s.py fails while the file differs from what this writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from tiermesh.control.xds.resources import mesh_config
from tiermesh.kit.topology import TIERS, read_settings

BOOTSTRAP = Path(__file__).resolve().parent / "base" / "envoy" / "bootstrap.yaml"
XDS_ADDRESS = ("127.0.0.1", 18000)
HEADER = """\
# Envoy's bootstrap in Kubernetes: listeners (gRPC, REST, metrics) on 0.0.0.0, the admin on
# 127.0.0.1, and the xDS control plane (the pod's sidecar, 127.0.0.1:18000) for clusters,
# endpoints, routes and A/B weights over ADS. Generated from envoy/*.tmpl and .env; do not edit:
# run `.venv/bin/python deploy/k8s/bootstrap.py`.
"""


class _Dumper(yaml.SafeDumper):
    """Writes a shared dict out each time it appears (no YAML anchors and aliases)."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def settings() -> dict[str, str]:
    """The ports file's settings as a pod sees them (no environment overrides, no trace sink)."""
    values = read_settings({})
    values.pop("OTLP_SINK_PORT", None)
    values["ENVOY_LISTEN_HOST"] = "0.0.0.0"
    return values


def render() -> str:
    """The bootstrap file's text."""
    bootstrap = mesh_config(settings(), TIERS, XDS_ADDRESS).bootstrap
    return HEADER + yaml.dump(bootstrap, Dumper=_Dumper, sort_keys=False, width=100)


def main(argv: list[str]) -> int:
    text = render()
    if argv == ["--check"]:
        if not BOOTSTRAP.is_file() or BOOTSTRAP.read_text() != text:
            print(f"{BOOTSTRAP} is stale: run .venv/bin/python deploy/k8s/bootstrap.py", file=sys.stderr)
            return 1
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    BOOTSTRAP.write_text(text)
    print(f"wrote {BOOTSTRAP}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
