"""How the flow reaches the tiers: one call interface, served by gRPC stubs through Envoy.

Every call carries its own deadline, the caller's trace context (the channel's interceptor) and
the end user's id in `x-tiermesh-user`, so Envoy can keep the user's A/B arm sticky; the arm that
served the call comes back in the `x-tiermesh-arm` response header.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tiermesh.bias.v1 import bias_pb2_grpc
from tiermesh.classifiers.v1 import classifiers_pb2_grpc
from tiermesh.embedder.v1 import embedder_pb2_grpc
from tiermesh.gateway.v1 import gateway_pb2
from tiermesh.kit import telemetry
from tiermesh.kit.topology import ARM_HEADER, TIER_HEADER, USER_HEADER
from tiermesh.llm.v1 import llm_pb2_grpc
from tiermesh.retriever.v1 import retriever_pb2_grpc

ARMS = {"control": gateway_pb2.ARM_CONTROL, "treatment": gateway_pb2.ARM_TREATMENT}

STUBS: Mapping[int, Any] = {
    gateway_pb2.TIER_CLASSIFIERS: classifiers_pb2_grpc.ClassifiersServiceStub,
    gateway_pb2.TIER_EMBEDDER: embedder_pb2_grpc.EmbedderServiceStub,
    gateway_pb2.TIER_RETRIEVER: retriever_pb2_grpc.RetrieverServiceStub,
    gateway_pb2.TIER_LLM: llm_pb2_grpc.LlmServiceStub,
    gateway_pb2.TIER_BIAS: bias_pb2_grpc.BiasServiceStub,
}

# full service names, e.g. "tiermesh.llm.v1.LlmService"
SERVICES = {
    tier: stub.__module__.rsplit(".", 1)[0] + "." + stub.__name__.removesuffix("Stub")
    for tier, stub in STUBS.items()
}


@dataclasses.dataclass(frozen=True)
class Reply:
    """A tier's response and the A/B arm that produced it."""

    message: Any
    arm: int = gateway_pb2.ARM_UNSPECIFIED


class Tiers(Protocol):
    """The tiers as the flow sees them; `AioRpcError` (or any `grpc.RpcError` with `code()`) on failure."""

    async def call(self, tier: int, rpc: str, request: Any, *, timeout: float, user_id: str) -> Reply: ...

    def stream(
        self, tier: int, rpc: str, request: Any, *, timeout: float, user_id: str
    ) -> AsyncIterator[Reply]: ...

    async def close(self) -> None: ...


def arm_of_error(error: grpc.RpcError) -> int:
    """The arm that refused a call: Envoy's header comes back with the error's metadata, if the
    call reached a deployment at all."""
    for read in ("initial_metadata", "trailing_metadata"):
        metadata = getattr(error, read, None)
        if callable(metadata):
            arm = arm_of(metadata() or ())
            if arm != gateway_pb2.ARM_UNSPECIFIED:
                return arm
    return gateway_pb2.ARM_UNSPECIFIED


def arm_of(metadata: Any) -> int:
    for key, value in metadata or ():
        if key == ARM_HEADER:
            return ARMS.get(value, gateway_pb2.ARM_UNSPECIFIED)
    return gateway_pb2.ARM_UNSPECIFIED


class RemoteTiers:
    """Stubs over one channel per distinct target (normally all Envoy)."""

    def __init__(self, targets: Mapping[int, str], *, max_message_mb: int = 16) -> None:
        size = max_message_mb * 1024 * 1024
        options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
        # plain channels: each call opens its span itself (telemetry.client_call), cheaper than
        # an intercepted channel on the gateway's hot path
        self._channels = {
            target: grpc.aio.insecure_channel(target, options=options) for target in set(targets.values())
        }
        self._targets = dict(targets)
        self._stubs = {tier: STUBS[tier](self._channels[target]) for tier, target in targets.items()}

    @staticmethod
    def _metadata(user_id: str) -> list[tuple[str, str]]:
        return [(USER_HEADER, user_id)] if user_id else []

    async def call(self, tier: int, rpc: str, request: Any, *, timeout: float, user_id: str) -> Reply:
        with telemetry.client_call(f"{SERVICES[tier]}/{rpc}", self._metadata(user_id)) as metadata:
            call = getattr(self._stubs[tier], rpc)(request, timeout=timeout, metadata=metadata)
            message = await call
            return Reply(message, arm_of(await call.initial_metadata()))

    async def stream(
        self, tier: int, rpc: str, request: Any, *, timeout: float, user_id: str
    ) -> AsyncIterator[Reply]:
        # the span covers establishing the stream (its first message), like the interceptor's
        with telemetry.client_call(f"{SERVICES[tier]}/{rpc}", self._metadata(user_id)) as metadata:
            call = getattr(self._stubs[tier], rpc)(request, timeout=timeout, metadata=metadata)
            arm = arm_of(await call.initial_metadata())
        try:
            async for message in call:
                yield Reply(message, arm)
        finally:
            call.cancel()  # a consumer that stops early (client gone) stops the generation too

    async def health(self, name: str) -> str:
        """The health status of tier `name` through Envoy (SERVING, NOT_SERVING, UNAVAILABLE, ...)."""
        tier = getattr(gateway_pb2, f"TIER_{name.upper()}")
        stub = health_pb2_grpc.HealthStub(self._channels[self._targets[tier]])
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=SERVICES[tier]),
                timeout=1.0,
                metadata=[(TIER_HEADER, name)],
            )
        except grpc.RpcError as error:
            return error.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
