"""The mesh's shape, in one place: its tiers, their services, arms, clusters, ports and headers.

Everything that draws the mesh reads it from here: the local runner (which processes to start, on
which ports), Envoy's rendered configuration (clusters, routes, weights), the compose and
observability checks, the tiers themselves (the header names they send and read), and later the
xDS server and the Kubernetes manifests. It holds names and arithmetic only: no I/O beyond
reading the ports file, no third-party imports, so a minimal image can use it.

Ports and replica counts come from the ports file (`.env` at the repository root), each value
overridden by an environment variable of the same name.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from collections.abc import Mapping
from pathlib import Path

from tiermesh.kit.contract import REPO_ROOT

ENV_FILE = REPO_ROOT / ".env"

# Request headers the mesh reads: the end user (Envoy hashes it to keep the user's A/B arm sticky),
# and which deployment a health or reflection call means when it goes through Envoy.
USER_HEADER = "x-tiermesh-user"
TIER_HEADER = "x-tiermesh-tier"
# Response header Envoy adds: the arm that served the call.
ARM_HEADER = "x-tiermesh-arm"

ARMS = ("control", "treatment")
# Weights are hundredths of a percent: the hash of a user id modulo this picks the arm.
WEIGHT_SCALE = 10_000
# Envoy's runtime keys of the A/B weights: `tiermesh.weights.<tier>.<cluster>`.
RUNTIME_PREFIX = "tiermesh.weights"
# The store's hash of A/B weights (tier -> treatment weight) the xDS control plane serves to Envoy.
WEIGHTS_KEY = "tiermesh:weights"
# The store's hash of treatment deployments started on a running mesh (tier -> its `<TIER>_TREATMENT`
# value; "" once removed): the control plane and the runner read it over the settings' own.
DEPLOYMENTS_KEY = "tiermesh:deployments"
# The most replicas one deployment may have.
MAX_REPLICAS = 16

# Settings a treatment may not override: the runner gives each deployment its own ports and arm.
_RUNNER_OWNED = ("_GRPC_PORT", "_METRICS_PORT", "_HTTP_PORT", "_REPLICAS", "TIERMESH_ARM", "TIERMESH_HOME")


class TopologyError(ValueError):
    """The mesh's settings describe no valid mesh; the message names the setting."""


@dataclasses.dataclass(frozen=True)
class TierSpec:
    """One tier: how it is started and how Envoy routes to it."""

    name: str
    service: str
    load_timeout_s: float = 180.0
    # The tier also serves a REST API (`<TIER>_HTTP_PORT`), behind Envoy's REST listener.
    rest: bool = False
    # Methods that stream or write: Envoy never repeats them once a replica may have acted on one
    # (every other method is idempotent and retried on another replica).
    unretried: tuple[str, ...] = ()
    # Calls one replica handles at once (`<TIER>_MAX_CONCURRENT_RPCS`); Envoy's circuit breaker
    # admits the sum over the replicas of a deployment.
    max_concurrency: int = 256

    @property
    def module(self) -> str:
        return f"services.{self.name}"

    @property
    def package(self) -> str:
        return self.service.rsplit(".", 1)[0]

    @property
    def prefix(self) -> str:
        return self.name.upper() + "_"

    def port_kinds(self) -> tuple[str, ...]:
        """The ports each of its processes listens on (`<TIER>_<KIND>_PORT`)."""
        return ("GRPC", "METRICS", "HTTP") if self.rest else ("GRPC", "METRICS")


# The front tier (health/reflection through Envoy without a header) comes first.
TIERS: tuple[TierSpec, ...] = (
    TierSpec("embedder", "tiermesh.embedder.v1.EmbedderService"),
    TierSpec("retriever", "tiermesh.retriever.v1.RetrieverService"),
    # vLLM's engine processes start in ~40 s on 2 cores (then a warm-up generation).
    # 128 calls: 32 generating (LLM_MAX_NUM_SEQS), the rest bounded in vLLM's waiting queue.
    TierSpec(
        "llm",
        "tiermesh.llm.v1.LlmService",
        load_timeout_s=300.0,
        unretried=("Generate", "GenerateStream"),
        max_concurrency=128,
    ),
    TierSpec("classifiers", "tiermesh.classifiers.v1.ClassifiersService"),
    TierSpec("bias", "tiermesh.bias.v1.BiasService", unretried=("RecordDecisions",)),
    # The gateway calls every other tier through Envoy; it starts fast (no model of its own).
    # An answer records feedback and decisions: never repeated.
    TierSpec(
        "gateway", "tiermesh.gateway.v1.AdvisorService", rest=True, unretried=("Advise", "AdviseStream")
    ),
)


def max_concurrency(settings: Mapping[str, str], tier: TierSpec, arm: str = "control") -> int:
    """Calls one replica of a deployment handles at once: `<TIER>_MAX_CONCURRENT_RPCS` (the
    treatment may override it), else the tier's own figure."""
    overrides = (treatment_overrides(settings, tier) or {}) if arm == "treatment" else {}
    name = f"{tier.prefix}MAX_CONCURRENT_RPCS"
    raw = overrides.get(name) or settings.get(name) or str(tier.max_concurrency)
    if not raw.isdigit() or int(raw) < 1:
        raise TopologyError(f"{name}: expected a positive integer, got {raw!r}")
    return int(raw)


def tier_named(name: str) -> TierSpec:
    """The tier called `name`; TopologyError listing the tiers if there is none."""
    for tier in TIERS:
        if tier.name == name:
            return tier
    raise TopologyError(f"unknown tier {name!r} (tiers: {', '.join(t.name for t in TIERS)})")


def only(*names: str) -> tuple[TierSpec, ...]:
    """Just these tiers, in the mesh's order (for tests, benchmarks and partial meshes)."""
    unknown = set(names) - {tier.name for tier in TIERS}
    if unknown:
        raise TopologyError(f"unknown tier(s): {', '.join(sorted(unknown))}")
    return tuple(tier for tier in TIERS if tier.name in names)


def cluster_name(tier: TierSpec, arm: str = "control") -> str:
    """Envoy's cluster for one arm of a tier (the control keeps the tier's name)."""
    return tier.name if arm == "control" else f"{tier.name}_{arm}"


def runtime_prefix(tier: str) -> str:
    """The runtime key prefix of a tier's weights; a cluster's weight is `<prefix>.<cluster>`."""
    return f"{RUNTIME_PREFIX}.{tier}"


def arm_prefix(tier: TierSpec, arm: str) -> str:
    """Where a deployment's ports and replica count are set: `LLM_...` or `LLM_TREATMENT_...`."""
    if arm not in ARMS:
        raise TopologyError(f"unknown arm {arm!r} (expected control or treatment)")
    return tier.prefix if arm == "control" else f"{tier.prefix}TREATMENT_"


def replica_name(tier: TierSpec, index: int, arm: str = "control") -> str:
    """A process's name in logs and status: `retriever`, `retriever-2`, `llm-treatment`, ..."""
    base = tier.name if arm == "control" else f"{tier.name}-{arm}"
    return base if index == 0 else f"{base}-{index + 1}"


def treatment_overrides(settings: Mapping[str, str], tier: TierSpec) -> dict[str, str] | None:
    """The settings `tier`'s treatment deployment differs in (`<TIER>_TREATMENT`: KEY=VALUE pairs
    separated by spaces, or `same` for an A/A test), or None when the tier has no treatment."""
    name = f"{tier.prefix}TREATMENT"
    raw = settings.get(name, "").strip()
    if not raw:
        return None
    if raw == "same":
        return {}
    overrides: dict[str, str] = {}
    for item in shlex.split(raw):
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raise TopologyError(
                f"{name}: expected KEY=VALUE pairs separated by spaces, or 'same'; got {item!r}"
            )
        if key.endswith(_RUNNER_OWNED):
            raise TopologyError(
                f"{name}: {key} is set by the runner for each deployment (use {name}_* ports)"
            )
        overrides[key] = value
    return overrides


def with_deployments(settings: Mapping[str, str], deployments: Mapping[str, str]) -> dict[str, str]:
    """`settings` with the treatments deployed (or removed, "") on the running mesh in their place."""
    merged = dict(settings)
    for tier in TIERS:
        if tier.name in deployments:
            merged[f"{tier.prefix}TREATMENT"] = deployments[tier.name]
    return merged


def mesh_hosts(settings: Mapping[str, str]) -> dict[str, str]:
    """The other hosts replicas may be placed on (`MESH_HOSTS`: NAME=ADDRESS, comma-separated)."""
    hosts: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in settings.get("MESH_HOSTS", "").split(","))):
        name, sep, address = item.partition("=")
        if not sep or not name.strip() or not address.strip():
            raise TopologyError(f"MESH_HOSTS: expected NAME=ADDRESS pairs separated by commas, got {item!r}")
        hosts[name.strip()] = address.strip()
    if hosts and not settings.get("MESH_ADDRESS"):
        raise TopologyError(
            "MESH_HOSTS: set MESH_ADDRESS too (where other hosts reach this one's Envoy and store)"
        )
    if hosts and "{" not in settings.get("MESH_HOST_EXEC", ""):
        raise TopologyError(
            "MESH_HOSTS: set MESH_HOST_EXEC, the command that runs a process on a host, with {name} or "
            "{address} in it (e.g. `ip netns exec {name}`)"
        )
    return hosts


def placement(settings: Mapping[str, str], tier: TierSpec, index: int) -> tuple[str, str] | None:
    """The host (name, address) replica `index` of `tier` runs on (`<TIER>_PLACEMENT`: host names,
    taken in turn), or None for this host."""
    key = f"{tier.prefix}PLACEMENT"
    names = [name.strip() for name in settings.get(key, "").split(",") if name.strip()]
    if not names:
        return None
    hosts = mesh_hosts(settings)
    name = names[index % len(names)]
    if name == "local":
        return None
    if name not in hosts:
        raise TopologyError(
            f"{key}: unknown host {name!r} (MESH_HOSTS has {', '.join(hosts) or 'none'}; or local)"
        )
    return name, hosts[name]


def arms(settings: Mapping[str, str], tier: TierSpec) -> tuple[str, ...]:
    """The deployments of `tier`: its control, and its treatment when one is configured."""
    return ARMS if treatment_overrides(settings, tier) is not None else ARMS[:1]


def replicas(settings: Mapping[str, str], tier: TierSpec, arm: str = "control") -> int:
    """How many processes serve one arm of `tier` (`<TIER>_REPLICAS`, `<TIER>_TREATMENT_REPLICAS`;
    default 1)."""
    key = f"{arm_prefix(tier, arm)}REPLICAS"
    raw = settings.get(key, "1")
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_REPLICAS:
        raise TopologyError(f"{key}: expected 1 to {MAX_REPLICAS}, got {raw!r}")
    return count


def replica_ports(
    settings: Mapping[str, str], tier: TierSpec, kind: str = "GRPC", arm: str = "control"
) -> list[int]:
    """Replica i listens on `<TIER>_<KIND>_PORT` + i (the treatment's: `<TIER>_TREATMENT_<KIND>_PORT` + i)."""
    key = f"{arm_prefix(tier, arm)}{kind}_PORT"
    if not settings.get(key):
        raise TopologyError(f"{key}: required to run the {tier.name} tier's {arm}")
    return [int(settings[key]) + i for i in range(replicas(settings, tier, arm))]


def read_settings(environ: Mapping[str, str] | None = None, env_file: Path = ENV_FILE) -> dict[str, str]:
    """The ports file's KEY=VALUE pairs, each overridden by an environment variable of that name."""
    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    if env_file.is_file():
        for number, line in enumerate(env_file.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise TopologyError(f"{env_file}:{number}: expected KEY=VALUE, got {line!r}")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]  # quoted as docker compose allows
            values[key.strip()] = value
    prefixes = ("ENVOY_", "STORE_", "TIERS_", "OTLP_", *(tier.prefix for tier in TIERS))
    for key, value in environ.items():
        if value and (key in values or key.startswith(prefixes)):
            values[key] = value
    return values
