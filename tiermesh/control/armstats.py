"""What each A/B arm of a tier served: requests, failures and latency, from Envoy and the tiers.

Envoy's gRPC stats (the grpc_stats filter, per cluster and method) count every call of the tier's
own service by final status, and time it upstream (`upstream_rq_time`, ms); each deployment's
/metrics adds the tier's server-side time (`tiermesh_rpc_latency_seconds`, labelled by arm).
Counters only grow, so the traffic of a time window is a later snapshot minus an earlier one;
a counter that went down means its process restarted, and the later value is the window.
"""

from __future__ import annotations

import dataclasses
import math
import re
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tiermesh.control.abstats import histogram_quantile, subtract_cumulative
from tiermesh.control.traffic import EnvoyAdmin, Split
from tiermesh.kit.topology import tier_named

Buckets = tuple[tuple[float, float], ...]  # (upper bound, cumulative count), the last bound inf


@dataclasses.dataclass(frozen=True)
class ArmCounts:
    """Cumulative counts of one arm (or, after `minus`, of a window)."""

    requests: int = 0
    failures: int = 0
    envoy_ms: Buckets = ()  # Envoy's upstream time of the tier's calls, milliseconds
    tier_s: Buckets = ()  # the tier's own server time, seconds

    @property
    def error_rate(self) -> float | None:
        return self.failures / self.requests if self.requests else None

    def envoy_quantile(self, q: float) -> float | None:
        """A latency quantile in milliseconds, as Envoy saw it."""
        return _quantile(self.envoy_ms, q)

    def tier_quantile(self, q: float) -> float | None:
        """A latency quantile in milliseconds, as the tier measured it."""
        value = _quantile(self.tier_s, q)
        return None if value is None else value * 1000.0

    def minus(self, earlier: ArmCounts) -> ArmCounts:
        restarted = self.requests < earlier.requests or self.failures < earlier.failures
        return ArmCounts(
            requests=self.requests if restarted else self.requests - earlier.requests,
            failures=self.failures if restarted else self.failures - earlier.failures,
            envoy_ms=_subtract(self.envoy_ms, earlier.envoy_ms),
            tier_s=_subtract(self.tier_s, earlier.tier_s),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "failures": self.failures,
            "envoy_ms": [[_bound_json(b), c] for b, c in self.envoy_ms],
            "tier_s": [[_bound_json(b), c] for b, c in self.tier_s],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ArmCounts:
        return cls(
            requests=int(data["requests"]),
            failures=int(data["failures"]),
            envoy_ms=tuple((float(b), float(c)) for b, c in data.get("envoy_ms", [])),
            tier_s=tuple((float(b), float(c)) for b, c in data.get("tier_s", [])),
        )


def _bound_json(bound: float) -> float | str:
    return "inf" if math.isinf(bound) else bound


def _quantile(buckets: Buckets, q: float) -> float | None:
    if not buckets:
        return None
    bounds, counts = zip(*buckets, strict=True)
    return histogram_quantile(q, bounds, counts)


def _subtract(later: Buckets, earlier: Buckets) -> Buckets:
    if not earlier or [b for b, _ in later] != [b for b, _ in earlier]:
        return later
    counts = subtract_cumulative([c for _, c in later], [c for _, c in earlier])
    return tuple(zip([b for b, _ in later], counts, strict=True))


def _add(buckets: Iterable[Buckets]) -> Buckets:
    """Sum histograms that share bounds (methods of a service, replicas of an arm)."""
    total: dict[float, float] = {}
    for histogram in buckets:
        for bound, count in histogram:
            total[bound] = total.get(bound, 0.0) + count
    return tuple(sorted(total.items()))


def envoy_counts(admin: EnvoyAdmin, split: Split) -> dict[str, ArmCounts]:
    """Per arm: calls of the tier's own service (health checks and reflection left out)."""
    package = re.escape(tier_named(split.tier).package)
    clusters = "|".join(re.escape(c) for c in split.clusters.values())
    stats = admin.stats(rf"^cluster\.({clusters})\.grpc\.{package}\.")
    counts = {}
    for arm, cluster in split.clusters.items():
        prefix = f"cluster.{cluster}.grpc."
        mine = {name: value for name, value in stats.items() if name.startswith(prefix)}
        histograms = [v for name, v in mine.items() if name.endswith(".upstream_rq_time")]
        counts[arm] = ArmCounts(
            requests=sum(int(v) for name, v in mine.items() if name.endswith(".total")),
            failures=sum(int(v) for name, v in mine.items() if name.endswith(".failure")),
            envoy_ms=_with_inf(_add(tuple((_bound(b), float(c)) for b, c in h) for h in histograms)),
        )
    return counts


def _bound(value: Any) -> float:
    return math.inf if str(value).lower() in ("inf", "+inf") else float(value)


def _with_inf(buckets: Buckets) -> Buckets:
    """Envoy's JSON buckets stop at the last finite bound (300 s here); close them with +Inf."""
    finite = tuple((b, c) for b, c in buckets if not math.isinf(b))
    return (*finite, (math.inf, finite[-1][1])) if finite else ()


def tier_latency(metrics_addresses: Iterable[str], tier: str, arm: str, *, timeout: float = 2.0) -> Buckets:
    """The tier's server-side latency histogram of one arm, summed over its replicas' /metrics
    (replicas that do not answer are left out)."""
    histograms = []
    own_methods = f"/{tier_named(tier).package}."
    for address in metrics_addresses:
        try:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as response:
                text = response.read().decode()
        except OSError:
            continue
        buckets: dict[float, float] = {}
        for family in text_string_to_metric_families(text):
            if family.name != "tiermesh_rpc_latency_seconds":
                continue
            for sample in family.samples:
                labels = sample.labels
                if (
                    sample.name.endswith("_bucket")
                    and labels.get("tier") == tier
                    and labels.get("arm") == arm
                    and labels.get("method", "").startswith(own_methods)
                ):
                    bound = _bound(labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
        histograms.append(tuple(sorted(buckets.items())))
    return _add(histograms)


def snapshot(
    admin: EnvoyAdmin, split: Split, deployments: Mapping[str, Any] | None = None
) -> dict[str, ArmCounts]:
    """Every arm's cumulative counts now. `deployments` is the runner's state (name → entry with
    tier, arm and metrics address); without it only Envoy's figures are taken."""
    counts = envoy_counts(admin, split)
    for arm in counts:
        addresses = [
            entry["metrics"]
            for entry in (deployments or {}).values()
            if entry.get("tier") == split.tier and entry.get("arm") == arm and entry.get("metrics")
        ]
        if addresses:
            counts[arm] = dataclasses.replace(counts[arm], tier_s=tier_latency(addresses, split.tier, arm))
    return counts


def window(later: Mapping[str, ArmCounts], earlier: Mapping[str, ArmCounts]) -> dict[str, ArmCounts]:
    return {arm: counts.minus(earlier.get(arm, ArmCounts())) for arm, counts in later.items()}
