"""An xDS control plane for the mesh's Envoys: the state-of-the-world Aggregated Discovery Service.

`Snapshots` holds the current resources of every type and a version per type (a digest of the
resources, so an unchanged type is never re-sent). Each Envoy keeps one ADS stream open; per type
it asks for resources, the server answers with the current version and a fresh nonce, and Envoy
answers that nonce with an ACK (the version it now uses) or a NACK (`error_detail`: the version it
refused and why — logged, counted and kept for `tiermesh status`, while Envoy keeps its last good
configuration). When the snapshot changes, every stream gets the types that changed. A stream whose
cluster set changed is sent endpoints again too: Envoy re-warms a changed cluster and waits for
its endpoints.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format

from tiermesh.control.xds import protos
from tiermesh.control.xds.resources import TYPE_CLUSTER, TYPE_ENDPOINTS, TYPES

logger = logging.getLogger(__name__)


@dataclass
class Snapshot:
    """The resources of one type and their version."""

    version: str
    resources: dict[str, any_pb2.Any]


def pack(type_url: str, resources: Mapping[str, dict[str, Any]]) -> Snapshot:
    """Resources in Envoy's JSON form -> a versioned snapshot of packed messages; ValueError
    naming the resource when one does not parse."""
    packed = {}
    for name, resource in sorted(resources.items()):
        try:
            message = json_format.ParseDict(resource, protos.message_for(type_url))
        except json_format.ParseError as error:
            raise ValueError(f"{type_url.rsplit('.', 1)[-1]} {name}: {error}") from None
        packed[name] = any_pb2.Any()
        packed[name].Pack(message, deterministic=True)
    digest = hashlib.sha256(json.dumps(resources, sort_keys=True).encode()).hexdigest()[:12]
    return Snapshot(digest, packed)


@dataclass
class Rejection:
    """A NACK: which Envoy refused which version of a type, and why."""

    node: str
    type_url: str
    version: str
    message: str
    at: float = field(default_factory=time.time)


class Snapshots:
    """The current snapshot of every type; a stream waits with `wait_past` for a newer one."""

    def __init__(self) -> None:
        self.types: dict[str, Snapshot] = {}
        self.generation = 0  # bumped by every update that changed something
        self.rejections: list[Rejection] = []
        self.acks: dict[tuple[str, str], str] = {}  # (node, type) -> version it uses
        self._next = asyncio.Event()

    def update(self, resources: Mapping[str, Mapping[str, dict[str, Any]]]) -> list[str]:
        """Take new resources of every type; returns the types whose version changed."""
        fresh = {type_url: pack(type_url, resources.get(type_url, {})) for type_url in TYPES}
        changed = [t for t in TYPES if t not in self.types or self.types[t].version != fresh[t].version]
        if changed:
            self.types = fresh
            self.generation += 1
            reached, self._next = self._next, asyncio.Event()
            reached.set()
        return changed

    async def wait_past(self, generation: int) -> None:
        while self.generation <= generation:
            await self._next.wait()


@dataclass
class _Sent:
    version: str = ""
    nonce: str = ""
    names: tuple[str, ...] = ()


class AggregatedDiscovery:
    """ADS over `snapshots`, state of the world, one stream per Envoy."""

    def __init__(self, snapshots: Snapshots) -> None:
        self.snapshots = snapshots
        self._nonce = 0

    def register(self, server: grpc.aio.Server) -> None:
        _, ads = protos.discovery()
        ads.add_AggregatedDiscoveryServiceServicer_to_server(self, server)

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[Any]:
        stream = _Stream(self)
        async for response in stream.run(request_iterator):
            yield response

    async def DeltaAggregatedResources(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        """Incremental xDS is not served: Envoy's bootstrap asks for the state of the world."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "delta xDS is not served; use api_type GRPC")

    def next_nonce(self) -> str:
        self._nonce += 1
        return str(self._nonce)


class _Stream:
    """One Envoy's stream: what it subscribed to and what it was last sent, per type."""

    def __init__(self, server: AggregatedDiscovery) -> None:
        self.server = server
        self.snapshots = server.snapshots
        self.node = "?"
        self.subscribed: dict[str, tuple[str, ...]] = {}  # type -> names ((): every resource)
        self.sent: dict[str, _Sent] = {}

    async def run(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        inbox: asyncio.Queue[Any | None] = asyncio.Queue()

        async def read() -> None:
            async for request in requests:
                await inbox.put(request)
            await inbox.put(None)

        reader = asyncio.create_task(read())
        seen = self.snapshots.generation
        watcher = asyncio.create_task(self.snapshots.wait_past(seen))
        try:
            while True:
                getter = asyncio.create_task(inbox.get())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    request = getter.result()
                    if request is None:
                        return
                    for response in self.on_request(request):
                        yield response
                else:
                    getter.cancel()
                if watcher in done:
                    seen = self.snapshots.generation
                    watcher = asyncio.create_task(self.snapshots.wait_past(seen))
                    for response in self.on_change():
                        yield response
        finally:
            reader.cancel()
            watcher.cancel()
            logger.info("xds: %s disconnected", self.node)

    def on_request(self, request: Any) -> list[Any]:
        if request.node.id:
            if self.node == "?":
                logger.info("xds: %s connected", request.node.id)
            self.node = request.node.id
        type_url, names = request.type_url, tuple(sorted(request.resource_names))
        sent = self.sent.get(type_url, _Sent())
        if request.response_nonce and request.response_nonce != sent.nonce:
            return []  # an answer to an older response: the newer one is on its way
        if request.response_nonce and request.HasField("error_detail"):
            self._rejected(type_url, sent.version, request.error_detail.message)
        elif request.response_nonce:
            self.snapshots.acks[(self.node, type_url)] = request.version_info
        self.subscribed[type_url] = names
        if request.response_nonce and names == sent.names and sent.version == self._version(type_url):
            return []  # an ACK or NACK of what is current: nothing new to send
        return [self.respond(type_url)]

    def on_change(self) -> list[Any]:
        changed = [t for t in self.subscribed if self.sent.get(t, _Sent()).version != self._version(t)]
        if TYPE_CLUSTER in changed and TYPE_ENDPOINTS in self.subscribed and TYPE_ENDPOINTS not in changed:
            changed.append(TYPE_ENDPOINTS)  # changed clusters re-warm and wait for endpoints
        return [self.respond(t) for t in TYPES if t in changed]

    def respond(self, type_url: str) -> Any:
        discovery, _ = protos.discovery()
        snapshot = self.snapshots.types.get(type_url, Snapshot("", {}))
        names = self.subscribed.get(type_url, ())
        wanted = [
            snapshot.resources[n] for n in (names or sorted(snapshot.resources)) if n in snapshot.resources
        ]
        nonce = self.server.next_nonce()
        self.sent[type_url] = _Sent(snapshot.version, nonce, names)
        return discovery.DiscoveryResponse(
            version_info=snapshot.version, resources=wanted, type_url=type_url, nonce=nonce
        )

    def _version(self, type_url: str) -> str:
        snapshot = self.snapshots.types.get(type_url)
        return snapshot.version if snapshot else ""

    def _rejected(self, type_url: str, version: str, message: str) -> None:
        kind = type_url.rsplit(".", 1)[-1]
        logger.error("xds: %s rejected %s version %s: %s", self.node, kind, version, message)
        self.snapshots.rejections.append(Rejection(self.node, type_url, version, message))
        del self.snapshots.rejections[:-20]
