"""Live A/B traffic through Envoy's admin interface: the weights Envoy uses, and moving them.

Each tier's route is a weighted split (envoy/weighted_destination.yaml.tmpl) whose cluster weights
Envoy reads from its runtime under `tiermesh.weights.<tier>.<cluster>`. Setting a split writes every
key of the tier (its gRPC route and, for the gateway, its REST route) in one `/runtime_modify`
call, so Envoy swaps to a new runtime snapshot with all of them at once: the next request uses the
new weights, requests in flight keep the arm they were given. When Envoy's configuration has a disk
runtime layer this machine can write (the local runner's), the keys are written there first, so a
restarted Envoy starts with the same split.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tiermesh.control.runner import Mesh
from tiermesh.control.runtime_layer import PersistedRuntime
from tiermesh.kit.topology import (
    ARM_HEADER,
    ARMS,
    RUNTIME_PREFIX,
    TIERS,
    WEIGHT_SCALE,
    WEIGHTS_KEY,
    read_settings,
)


class TrafficError(RuntimeError):
    """A refused or failed traffic command; the message says why. Nothing was changed in Envoy."""


def admin_address() -> str:
    """The running mesh's Envoy admin, else the admin port from .env."""
    return Mesh().state().get("envoy", {}).get("admin") or f"127.0.0.1:{read_settings()['ENVOY_ADMIN_PORT']}"


class EnvoyAdmin:
    """The few admin endpoints tiermesh uses (loopback only: the admin can change routing)."""

    def __init__(self, address: str, *, timeout: float = 5.0) -> None:
        self.address = address
        self.timeout = timeout
        self._bootstrap: dict[str, Any] | None = None

    def _request(self, path: str, *, method: str = "GET") -> bytes:
        request = urllib.request.Request(f"http://{self.address}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            raise TrafficError(
                f"envoy admin {path}: HTTP {error.code}: {error.read().decode()[:200]}"
            ) from None
        except OSError as error:
            raise TrafficError(
                f"envoy admin at {self.address} is not answering ({error}); is the mesh up? (tiermesh status)"
            ) from None

    def config_dump(self) -> dict[str, Any]:
        return json.loads(self._request("/config_dump"))

    def runtime(self) -> dict[str, str]:
        entries = json.loads(self._request("/runtime")).get("entries", {})
        return {key: entry.get("final_value", "") for key, entry in entries.items()}

    def modify_runtime(self, values: Mapping[str, str]) -> None:
        """Set runtime keys: first where they outlive Envoy (the store its control plane serves
        weights from, or its disk layer), then in its admin layer, which applies them at once."""
        store = self.weights_store()
        if store is not None:
            keep_weights(store, values)
        persisted = self.persisted_runtime()
        if persisted is not None:
            try:
                persisted.write(values)
            except OSError as error:
                raise TrafficError(f"could not keep the runtime keys in {persisted.root}: {error}") from None
        self._request("/runtime_modify?" + urllib.parse.urlencode(values), method="POST")

    def weights_store(self) -> str | None:
        """The store whose `tiermesh:weights` the xDS control plane serves to this Envoy (its
        bootstrap's node metadata names it), or None when Envoy's config is a file."""
        return self.bootstrap().get("node", {}).get("metadata", {}).get("tiermesh_store") or None

    def persisted_runtime(self) -> PersistedRuntime | None:
        """The disk runtime layer of Envoy's bootstrap, when its directory is on this machine."""
        for layer in self.bootstrap().get("layered_runtime", {}).get("layers", []):
            link = layer.get("disk_layer", {}).get("symlink_root")
            if link and Path(link).parent.is_dir():
                return PersistedRuntime(Path(link).parent)
        return None

    def bootstrap(self) -> dict[str, Any]:
        """Envoy's bootstrap, read once: it does not change while Envoy runs."""
        if self._bootstrap is None:
            configs = self.config_dump().get("configs", [])
            self._bootstrap = next((c["bootstrap"] for c in configs if "bootstrap" in c), {})
        return self._bootstrap

    def stats(self, regex: str) -> dict[str, Any]:
        """Counters and gauges (name → value) and histograms (name → cumulative buckets) whose
        names match `regex`."""
        query = urllib.parse.urlencode({"format": "json", "filter": regex, "histogram_buckets": "cumulative"})
        values: dict[str, Any] = {}
        for entry in json.loads(self._request(f"/stats?{query}")).get("stats", []):
            if "name" in entry:
                values[entry["name"]] = entry.get("value", 0)
            for histogram in entry.get("histograms", []) if isinstance(entry.get("histograms"), list) else []:
                values[histogram["name"]] = [
                    (bucket["upper_bound"], bucket.get("cumulative", 0)) for bucket in histogram["buckets"]
                ]
        return values


def keep_weights(store_url: str, values: Mapping[str, str]) -> None:
    """Each treatment weight among runtime `values` (`<prefix>.<tier>.<tier>_treatment`) into the
    store's `tiermesh:weights` hash, which the control plane serves to every Envoy over RTDS."""
    import redis

    weights = {}
    for key, value in values.items():
        *_, tier, cluster = key.split(".")
        if cluster == f"{tier}_treatment":
            weights[tier] = int(value)
    if not weights:
        return
    try:
        redis.Redis.from_url(store_url, socket_timeout=2, socket_connect_timeout=2).hset(
            WEIGHTS_KEY, mapping=weights
        )
    except (redis.RedisError, OSError) as error:
        raise TrafficError(f"could not keep the weights in the store at {store_url}: {error}") from None


@dataclasses.dataclass(frozen=True)
class Split:
    """The weights Envoy uses for one tier's arms (hundredths of a percent, summing to 10000)."""

    tier: str
    clusters: dict[str, str]  # arm -> cluster
    weights: dict[str, int]  # arm -> weight
    source: str  # "runtime" (set live) or "config" (the rendered config's)
    runtime_keys: dict[str, str]  # every runtime key of the tier's weights (gRPC and REST) → its arm

    def percent(self, arm: str) -> float:
        total = sum(self.weights.values())
        return 100.0 * self.weights.get(arm, 0) / total if total else 0.0

    def shares(self) -> dict[str, Any]:
        """Each arm's percentage and where the weights come from, for JSON."""
        return {arm: self.percent(arm) for arm in self.clusters} | {"source": self.source}

    @property
    def has_treatment(self) -> bool:
        return "treatment" in self.clusters

    def describe(self) -> str:
        shares = "  ".join(f"{arm} {self.percent(arm):6.2f}%" for arm in ARMS if arm in self.clusters)
        if not self.has_treatment:
            return f"{self.tier:<12} {shares}   (no treatment deployment)"
        return f"{self.tier:<12} {shares}   ({self.source})"


def _weighted_routes(node: Any) -> Iterator[dict[str, Any]]:
    """Every `weighted_clusters` object in a config dump."""
    if isinstance(node, dict):
        if isinstance(node.get("weighted_clusters"), dict):
            yield node["weighted_clusters"]
        for value in node.values():
            yield from _weighted_routes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _weighted_routes(value)


def _arm_of(cluster: Mapping[str, Any]) -> str:
    for option in cluster.get("response_headers_to_add", []):
        header = option.get("header", {})
        if header.get("key") == ARM_HEADER:
            return header.get("value", "")
    return ""


def splits(admin: EnvoyAdmin) -> dict[str, Split]:
    """Every tier's split as Envoy has it: the routes in its config, weights from its runtime.
    A tier's REST route (the gateway's) shares its gRPC route's runtime prefix, so its keys are
    gathered with them and move together."""
    runtime = admin.runtime()
    found: dict[str, Split] = {}
    for weighted in _weighted_routes(admin.config_dump()):
        clusters = {_arm_of(c): c["name"] for c in weighted.get("clusters", [])}
        prefix = weighted.get("runtime_key_prefix", "")
        # a one-cluster route (no treatment) has no runtime keys: its control names the tier
        tier = prefix.removeprefix(RUNTIME_PREFIX + ".") if prefix else clusters.get("control", "")
        tier = tier.removesuffix("_rest")
        if not tier:
            continue
        keys = {f"{prefix}.{name}": arm for arm, name in clusters.items()} if prefix else {}
        weights, source = {}, "config"
        for cluster in weighted.get("clusters", []):
            key = f"{prefix}.{cluster['name']}"
            if key in keys and runtime.get(key, "").isdigit():
                weights[_arm_of(cluster)], source = int(runtime[key]), "runtime"
            else:
                weights[_arm_of(cluster)] = int(cluster.get("weight", 0))
        if tier in found:  # the config dump repeats routes, and the gateway has a REST route too
            found[tier] = dataclasses.replace(found[tier], runtime_keys={**found[tier].runtime_keys, **keys})
            continue
        found[tier] = Split(tier, clusters, weights, source, keys)
    return found


def split_of(admin: EnvoyAdmin, tier: str) -> Split:
    """One tier's split; refuses unknown tiers and tiers without a treatment."""
    current = splits(admin)
    if tier not in current:
        names = ", ".join(sorted(current)) or ", ".join(tier.name for tier in TIERS)
        raise TrafficError(f"unknown tier {tier!r} (tiers in Envoy: {names})")
    split = current[tier]
    if not split.has_treatment:
        raise TrafficError(
            f"{tier} has no treatment deployment: start one with `tiermesh deploy {tier} --treatment "
            f"KEY=VALUE ...` (a mesh on the xDS control plane), or set {tier.upper()}_TREATMENT in .env "
            "and start the mesh again (tiermesh down && tiermesh up)"
        )
    return split


def parse_assignment(text: str) -> float:
    """`treatment=<pct>` or `control=<pct>` → the treatment's percentage (0-100, 0.01 steps)."""
    arm, sep, raw = text.partition("=")
    arm = arm.strip().lower()
    if not sep or arm not in ARMS:
        raise TrafficError(f"expected treatment=<percent> or control=<percent>, got {text!r}")
    return checked_percent(raw, arm) if arm == "treatment" else 100.0 - checked_percent(raw, arm)


def checked_percent(raw: str | float, what: str = "treatment") -> float:
    try:
        value = float(raw)
    except ValueError:
        raise TrafficError(f"{what}: expected a percentage from 0 to 100, got {raw!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= 100.0:
        raise TrafficError(f"{what}: a weight must be from 0 to 100 percent, got {raw}")
    if abs(value * 100 - round(value * 100)) > 1e-6:
        raise TrafficError(f"{what}: weights go in steps of 0.01 percent, got {raw}")
    return value


def set_treatment(admin: EnvoyAdmin, tier: str, percent: float) -> tuple[Split, Split, float]:
    """Give `percent` of `tier`'s users to its treatment. Returns the split before, the split
    after (read back from Envoy) and the seconds the change took."""
    percent = checked_percent(percent)
    before = split_of(admin, tier)
    treatment = round(percent * WEIGHT_SCALE / 100)
    weights = {"control": WEIGHT_SCALE - treatment, "treatment": treatment}
    started = time.perf_counter()
    admin.modify_runtime({key: str(weights[arm]) for key, arm in before.runtime_keys.items()})
    after = split_of(admin, tier)
    elapsed = time.perf_counter() - started
    if after.weights != weights:
        raise TrafficError(f"{tier}: Envoy reports weights {after.weights} after setting {weights}")
    return before, after, elapsed
