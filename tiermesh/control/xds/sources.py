"""Where the control plane learns the mesh's live state: the replicas (the local runner's state
file, or Kubernetes' EndpointSlices), and the A/B weights and live treatment deployments (the
store)."""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx
import redis.asyncio as aioredis

from tiermesh.control.kubernetes import SELECTOR, endpoints_from_slices
from tiermesh.control.xds.resources import Endpoints
from tiermesh.kit.topology import DEPLOYMENTS_KEY, WEIGHTS_KEY, cluster_name, tier_named

logger = logging.getLogger(__name__)


class EndpointSource(Protocol):
    async def read(self) -> Endpoints:
        """The replicas now (the last known ones while the source cannot be read)."""
        ...


class StateFileEndpoints:
    """The replicas the local runner's state file lists: each entry with a tier, an arm and its
    gRPC address (and REST address, for the gateway). No file yet: no replicas."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._last: Endpoints = {}

    async def read(self) -> Endpoints:
        try:
            state = json.loads(self.path.read_text()) if self.path else {}
        except (OSError, ValueError):
            return self._last  # written at this moment, or gone: keep what was known
        endpoints: dict[str, list[tuple[str, int]]] = {}
        for entry in state.values():
            if not isinstance(entry, dict) or "tier" not in entry:
                continue
            cluster = cluster_name(tier_named(entry["tier"]), entry.get("arm", "control"))
            for kind, suffix in (("grpc", ""), ("http", "_rest")):
                host, _, port = str(entry.get(kind, "")).rpartition(":")
                if host and port.isdigit():
                    endpoints.setdefault(cluster + suffix, []).append((host, int(port)))
                elif entry.get(kind):
                    logger.warning(
                        "xds: %s: %s address %r is not host:port; left out", self.path, kind, entry[kind]
                    )
        self._last = endpoints
        return endpoints


class KubernetesEndpoints:
    """The tiers' EndpointSlices in one namespace, listed from the Kubernetes API at each read (in
    a pod: the API's address from the environment, the service account's token and CA)."""

    ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")

    def __init__(
        self, api: str, namespace: str, *, token_file: Path | None = None, ca: str | bool = True
    ) -> None:
        query = urllib.parse.urlencode({"labelSelector": SELECTOR})
        self.url = f"{api.rstrip('/')}/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices?{query}"
        self.token_file = token_file
        self.client = httpx.AsyncClient(verify=ca, timeout=5)
        self._last: Endpoints = {}
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
        # the token is read each time: Kubernetes rotates service account tokens
        headers = (
            {"Authorization": f"Bearer {self.token_file.read_text().strip()}"} if self.token_file else {}
        )
        try:
            response = await self.client.get(self.url, headers=headers)
            response.raise_for_status()
            self._last = endpoints_from_slices(response.json().get("items") or [])
        except (httpx.HTTPError, OSError, ValueError) as error:
            if not self._failing:
                logger.warning("xds: cannot list EndpointSlices (%s); keeping the last endpoints", error)
            self._failing = True
            return self._last
        if self._failing:
            logger.info("xds: listing EndpointSlices again")
        self._failing = False
        return self._last


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
