"""Where the control plane learns the mesh's live state: the replicas (the store's registry, where
replicas on any host register while SERVING, or Kubernetes' EndpointSlices), and the A/B weights
and the treatments deployed live (the store)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import redis.asyncio as aioredis

from tiermesh.control.kubernetes import SELECTOR, endpoints_from_slices
from tiermesh.control.xds.resources import Endpoints
from tiermesh.kit.cancellation import raise_if_cancelled
from tiermesh.kit.membership import REPLICA_KEY_PREFIX
from tiermesh.kit.topology import DEPLOYMENTS_KEY, WEIGHTS_KEY, TopologyError, cluster_name, tier_named

logger = logging.getLogger(__name__)


class EndpointSource(Protocol):
    async def read(self) -> Endpoints:
        """The replicas now (the last known ones while the source cannot be read)."""
        ...


def endpoints_of(entries: Mapping[str, Any]) -> tuple[Endpoints, set[str]]:
    """Registry entries by key (a tier, an arm, a gRPC address and, for the gateway, a REST
    address) as each cluster's endpoints, and what was wrong with the entries left out."""
    endpoints: dict[str, list[tuple[str, int]]] = {}
    problems = set()
    for key, entry in entries.items():
        if not isinstance(entry, dict):
            problems.add(f"{key}: not a JSON object")
            continue
        try:
            cluster = cluster_name(tier_named(str(entry.get("tier"))), str(entry.get("arm", "control")))
        except TopologyError as error:
            problems.add(f"{key}: {error}")
            continue
        for kind, suffix in (("grpc", ""), ("http", "_rest")):
            host, _, port = str(entry.get(kind, "")).rpartition(":")
            if host and port.isdigit():
                endpoints.setdefault(cluster + suffix, []).append((host, int(port)))
            elif entry.get(kind):
                problems.add(f"{key}: {kind} address {entry[kind]!r} is not host:port")
    return endpoints, problems


class RegistryEndpoints:
    """The replicas registered in the store (`tiermesh.kit.membership`): one key per SERVING
    replica, on whatever host it runs, expiring when the replica stops refreshing it. A bad entry
    is left out (the others still reach Envoy) and logged once, not at every read."""

    def __init__(self, url: str) -> None:
        self.client = aioredis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        self._last: Endpoints = {}
        self._down = False
        self._reported: set[str] = set()

    async def read(self) -> Endpoints:
        try:
            keys = [key async for key in self.client.scan_iter(match=f"{REPLICA_KEY_PREFIX}*", count=1000)]
            values = await self.client.mget(keys) if keys else []
        except (aioredis.RedisError, OSError) as error:
            raise_if_cancelled()
            if not self._down:
                logger.warning("xds: cannot read the registry (%s); keeping the last endpoints", error)
            self._down = True
            return self._last
        if self._down:
            logger.info("xds: reading the registry again")
        self._down = False
        entries = {}
        for key, value in zip(keys, values, strict=True):
            if value is None:  # expired between SCAN and MGET
                continue
            try:
                entries[key.decode(errors="replace")] = json.loads(value)
            except ValueError:
                entries[key.decode(errors="replace")] = None  # reported as not a JSON object
        self._last, problems = endpoints_of(entries)
        for problem in sorted(problems - self._reported):
            logger.warning("xds: registry entry %s; left out", problem)
        self._reported = problems
        return self._last


class KubernetesEndpoints:
    """The tiers' EndpointSlices in one namespace, kept current by a watch on the Kubernetes API:
    listed once, then followed event by event (added, modified, deleted) from the list's
    resourceVersion, listed again when the watch expired (410 Gone) or failed. In a pod: the API's
    address from the environment, the service account's token (read at each request: Kubernetes
    rotates it) and CA. While the API cannot be reached, the last endpoints stay."""

    ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
    WATCH_S = 300  # a watch the API server ends after this long; the next one resumes from it

    def __init__(
        self, api: str, namespace: str, *, token_file: Path | None = None, ca: str | bool = True
    ) -> None:
        self.url = f"{api.rstrip('/')}/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
        self.token_file = token_file
        self.client = httpx.AsyncClient(verify=ca, timeout=httpx.Timeout(5, read=self.WATCH_S + 30))
        self.slices: dict[str, Mapping[str, Any]] = {}  # by name
        self._version: str | None = None  # where the next watch resumes; None: list first
        self._following: asyncio.Task | None = None
        self._failing = False

    @classmethod
    def in_cluster(cls) -> KubernetesEndpoints:
        """From inside a pod; KeyError naming what is missing when not in one."""
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        namespace = os.environ.get("POD_NAMESPACE") or (cls.ACCOUNT / "namespace").read_text().strip()
        return cls(
            f"https://{host}:{port}",
            namespace,
            token_file=cls.ACCOUNT / "token",
            ca=str(cls.ACCOUNT / "ca.crt"),
        )

    async def read(self) -> Endpoints:
        if self._following is None:
            await self._step()  # the first read lists, so the first snapshot has the endpoints
            self._following = asyncio.create_task(self._follow())
        return endpoints_from_slices(self.slices.values())

    async def close(self) -> None:
        """Stop following and close the API connection."""
        if self._following is not None:
            self._following.cancel()
            await asyncio.wait({self._following})
        await self.client.aclose()

    async def _follow(self) -> None:
        while True:
            started = time.monotonic()
            # a failure, or a watch that ended at once (a proxy cutting it): never a tight loop
            if not await self._step() or time.monotonic() - started < 1.0:
                await asyncio.sleep(1.0)

    async def _step(self) -> bool:
        """List (when there is no version to resume from) or watch once; False when it failed."""
        try:
            if self._version is None:
                self._version = await self._list()
            else:
                self._version = await self._watch(self._version)
        except (httpx.HTTPError, OSError, ValueError) as error:
            if not self._failing:
                logger.warning("xds: cannot follow EndpointSlices (%s); keeping the last endpoints", error)
            self._failing, self._version = True, None
            return False
        if self._failing:
            logger.info("xds: following EndpointSlices again")
        self._failing = False
        return True

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_file.read_text().strip()}"} if self.token_file else {}

    async def _list(self) -> str:
        response = await self.client.get(
            self.url, params={"labelSelector": SELECTOR}, headers=self._headers()
        )
        response.raise_for_status()
        listed = response.json()
        self.slices = {item["metadata"]["name"]: item for item in listed.get("items") or []}
        return str(listed.get("metadata", {}).get("resourceVersion", ""))

    async def _watch(self, version: str) -> str | None:
        """Apply one watch's events; the version to resume from, or None to list again."""
        params = {"labelSelector": SELECTOR, "watch": "1", "resourceVersion": version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(self.WATCH_S)}  # fmt: skip
        async with self.client.stream("GET", self.url, params=params, headers=self._headers()) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, item = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if item.get("code") == 410:  # too old to resume from: list again
                        return None
                    raise ValueError(f"watch error {item.get('code')}: {item.get('message')}")
                version = str(item.get("metadata", {}).get("resourceVersion") or version)
                name = item.get("metadata", {}).get("name", "")
                if kind in ("ADDED", "MODIFIED"):
                    self.slices[name] = item
                elif kind == "DELETED":
                    self.slices.pop(name, None)
        return version


@dataclass(frozen=True)
class LiveState:
    """What operators changed on the running mesh: each tier's treatment weight (hundredths of a
    percent) and the treatments deployed (tier -> `<TIER>_TREATMENT` value; "" once removed)."""

    weights: Mapping[str, int] = field(default_factory=dict)
    deployments: Mapping[str, str] = field(default_factory=dict)


class StoreState:
    """The live state from the store: the `tiermesh:weights` and `tiermesh:deployments` hashes."""

    def __init__(self, url: str) -> None:
        self.client = aioredis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        self._down = False

    async def read(self, last: LiveState) -> LiveState:
        """The state now, or `last` while the store cannot be read."""
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                raw_weights, raw_deployments = (
                    await pipe.hgetall(WEIGHTS_KEY).hgetall(DEPLOYMENTS_KEY).execute()
                )
        except (aioredis.RedisError, OSError) as error:
            raise_if_cancelled()
            if not self._down:
                logger.warning(
                    "xds: cannot read the store (%s); keeping the last weights and deployments", error
                )
            self._down = True
            return last
        self._down = False
        weights = {}
        for tier, value in raw_weights.items():
            try:
                weights[tier.decode()] = int(value)
            except ValueError:
                logger.warning("xds: %s: weight %r is not an integer; ignored", WEIGHTS_KEY, value)
        deployments = {tier.decode(): value.decode() for tier, value in raw_deployments.items()}
        return LiveState(weights, deployments)
