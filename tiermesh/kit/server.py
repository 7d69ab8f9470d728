"""The gRPC bootstrap every tier runs: one call from a tier's `__main__` to a serving process.

`run(...)` loads and validates configuration (a bad variable stops the process with a one-line
message), configures JSON logs and tracing, and serves the tier:

* the port opens at once with the standard health service reporting NOT_SERVING, so a runner
  or Envoy can tell "starting" from "dead"; the engine loads, then health flips to SERVING;
* server reflection lists the tier's services (descriptors of the whole tiermesh contract can be
  resolved, so any tier answers reflection for calls routed through Envoy);
* every product RPC passes one interceptor that continues the caller's trace, records Prometheus
  metrics, turns `tiermesh.kit.errors.RpcError` into its status and an unexpected exception into
  INTERNAL (logged, never a crash), and answers undecodable requests with INVALID_ARGUMENT
  naming the field;
* at most `MAX_CONCURRENT_RPCS` product calls run at once; one more is refused at once with
  RESOURCE_EXHAUSTED (health and reflection are never refused), so overload is a fast, clear
  answer and every queue behind the servicer (micro-batches, vLLM's waiting requests) is bounded;
* with `TIERMESH_REGISTRY_URL` set, a SERVING replica keeps its entry in the mesh's registry of live
  replicas (`tiermesh.kit.membership`), which the xDS control plane serves to Envoy; NOT_SERVING
  takes it out at once, and a replica that dies or is cut off expires from it;
* SIGTERM/SIGINT: health goes NOT_SERVING while calls are still served for `DRAIN_DELAY_S` (long
  enough for Envoy's health checks to take the replica out of the pool, so nothing is sent to a
  closed port); then new calls are refused, in-flight ones get the grace period to finish, the
  engine is closed and the process exits 0.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import context as otel_context
from opentelemetry import trace

from tiermesh.common.v1 import common_pb2
from tiermesh.kit import contract, logs, metrics, telemetry
from tiermesh.kit.config import ConfigError, ServerConfig, describe, load
from tiermesh.kit.errors import RpcError, explain_undecodable
from tiermesh.kit.membership import Membership, MembershipConfig

logger = logging.getLogger(__name__)

ConfigT = TypeVar("ConfigT", bound="ServerConfig")


class Tier(Protocol):
    """What a tier gives the bootstrap: its services, a servicer to register and an engine."""

    name: str
    service_names: Sequence[str]

    @property
    def model(self) -> common_pb2.ModelInfo:
        """The model being served; empty until the engine is loaded (labels metrics and spans).
        A tier serving several models also has `models` (all of them) and `model_for(method)`."""
        ...

    def register(self, server: grpc.aio.Server) -> None:
        """Add the tier's servicers to the server."""

    async def start(self) -> None:
        """Load the engine; RPCs before this returns should answer UNAVAILABLE."""

    async def stop(self) -> None:
        """Release the engine after the server has drained."""


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments."""
    return [
        ("grpc.so_reuseport", 0),  # a port already in use must fail, not be shared
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # the PINGs a client may send: Envoy sends one every 2 s, calls or not, to find replicas
        # whose host went silent; more often than this earns GOAWAY "too_many_pings", which
        # fails the calls on the connection
        ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


class TierServer:
    """A started gRPC server for one tier, with health, reflection, metrics and tracing."""

    def __init__(
        self,
        tier: Tier,
        config: ServerConfig,
        membership: MembershipConfig | None = None,
        arm: str = "control",
    ) -> None:
        self.tier = tier
        self.config = config
        self.membership_config = membership or MembershipConfig()
        self.arm = arm
        self.membership: Membership | None = None
        self.port = 0
        self.metrics_port = 0
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._metrics_http: Any = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        """Open the port (health NOT_SERVING) and the metrics endpoint."""
        contract.load_all()
        max_bytes = self.config.max_message_mb * 1024 * 1024
        server = grpc.aio.server(
            interceptors=[_ObservingInterceptor(self.tier, self.config.max_concurrent_rpcs)],
            options=server_options(max_bytes),
        )
        self.tier.register(server)
        if hasattr(self.tier, "report_serving"):  # tiers whose engine can die under them
            self.tier.report_serving = self.report_serving
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self.report_serving(False)
        reflection.enable_server_reflection(
            [*self.tier.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        self.port = server.add_insecure_port(f"{self.config.host}:{self.config.grpc_port}")
        await server.start()
        self._server = server
        self._metrics_http, _ = metrics.serve_metrics(self.config.host, self.config.metrics_port)
        self.metrics_port = self._metrics_http.server_port
        self._join_registry()
        logger.info(
            "%s listening on %s (metrics on :%d), loading engine",
            self.tier.name,
            self.address,
            self.metrics_port,
            extra={"fields": {"grpc_port": self.port, "metrics_port": self.metrics_port}},
        )

    def _join_registry(self) -> None:
        """Prepare the registry entry (written once SERVING): where other hosts reach this replica."""
        if not self.membership_config.registry_url:
            return
        host = self.membership_config.advertise_host or self.config.host
        if host in ("0.0.0.0", "::"):  # every interface (a container): the one its name resolves to
            host = socket.gethostbyname(socket.gethostname())
        entry = {"tier": self.tier.name, "arm": self.arm, "grpc": f"{host}:{self.port}"}
        self.membership = Membership(
            self.membership_config.registry_url, entry, ttl_s=self.membership_config.registry_ttl_s
        )
        self.membership.start()

    async def report_serving(self, serving: bool) -> None:
        """Set every service's health: a tier calls this with False when its engine fails, so
        Envoy and the runner stop sending it traffic instead of letting calls hang. The registry
        entry follows."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", *self.tier.service_names):
            await self.health.set(service, status)
        if self.membership is not None:
            http_port = getattr(self.tier, "http_port", None)  # a tier with a REST face (the gateway)
            if http_port:
                host = self.membership.entry["grpc"].rpartition(":")[0]
                self.membership.entry["http"] = f"{host}:{http_port}"
            await self.membership.set_serving(serving)

    async def load(self) -> None:
        """Load the engine, then report SERVING."""
        started = time.perf_counter()
        await self.tier.start()
        await self.report_serving(True)
        models = served_models(self.tier)
        for model in models:
            metrics.set_model_info(self.tier.name, model.name, model.version, model.digest)
        logger.info(
            "%s SERVING %s after %.1fs",
            self.tier.name,
            ", ".join(f"model {model.name} version {model.version}" for model in models),
            time.perf_counter() - started,
        )

    async def drain(self) -> None:
        """Report NOT_SERVING but keep serving for the drain delay: Envoy's health checks take the
        replica out of the pool before its port closes, so no call is sent to a closed port."""
        await self.health.enter_graceful_shutdown()
        if self.membership is not None:
            await self.membership.set_serving(False)
        if hasattr(self.tier, "drain"):  # a tier with another face to take out of the pool (REST)
            await self.tier.drain()
        if self.config.drain_delay_s:
            logger.info(
                "%s NOT_SERVING: still serving for %.1fs while Envoy takes it out of the pool",
                self.tier.name,
                self.config.drain_delay_s,
            )
            await asyncio.sleep(self.config.drain_delay_s)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, let in-flight ones finish within the grace period, close the engine."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        await self.tier.stop()
        if self.membership is not None:
            await self.membership.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        logger.info("%s stopped", self.tier.name)


async def serve(
    tier: Tier, config: ServerConfig, membership: MembershipConfig | None = None, arm: str = "control"
) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    server = TierServer(tier, config, membership, arm)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    loading = asyncio.create_task(server.load())
    stop_wait = asyncio.create_task(stopping.wait())
    await asyncio.wait({loading, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if loading.done() and loading.exception() is not None:
        logger.error(
            "%s failed to load its engine: %s", tier.name, loading.exception(), exc_info=loading.exception()
        )
        exit_code = 1
    elif not stopping.is_set():
        await stop_wait
    if not loading.done():
        loading.cancel()
    logger.info(
        "%s shutting down: draining in-flight calls for up to %.0fs",
        tier.name,
        config.drain_delay_s + config.shutdown_grace_s,
    )
    if exit_code == 0:
        await server.drain()
    await server.stop()
    return exit_code


def run(name: str, config_class: type[ConfigT], build: Callable[[ConfigT], Tier]) -> None:
    """Process entry point of a tier: configure from the environment, serve, exit."""
    prefix = name.upper() + "_"
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(f"python -m services.{name}: serve the {name} tier.\n")
        print("Configured only by environment variables (a bad value stops start-up):\n")
        rows = describe(config_class, prefix=prefix) + describe(telemetry.TelemetryConfig, prefix="TIERMESH_")
        rows += describe(MembershipConfig, prefix="TIERMESH_")
        for variable, default, meaning in rows:
            print(f"  {variable:<30} {default:<20} {meaning}")
        raise SystemExit(0)
    try:
        config = load(config_class, prefix=prefix)
        telemetry_config = load(telemetry.TelemetryConfig, prefix="TIERMESH_")
        membership = load(MembershipConfig, prefix="TIERMESH_")
        logs.configure(f"tiermesh-{name}", telemetry_config.log_level)
        telemetry.configure(f"tiermesh-{name}", telemetry_config)
        metrics.set_arm(telemetry_config.arm)
    except ConfigError as error:
        print(f"tiermesh-{name}: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(asyncio.run(serve(build(config), config, membership, telemetry_config.arm)))


# -- the interceptor ---------------------------------------------------------------------------


class _Undecodable:
    """Stands in for a request that failed to decode, carrying the explanation."""

    def __init__(self, explanation: str) -> None:
        self.explanation = explanation


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    message_class = getattr(deserializer, "__self__", None)
    if deserializer is None or message_class is None:
        return deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _Undecodable(explain_undecodable(message_class, data))

    return deserialize


def served_models(tier: Tier) -> list[common_pb2.ModelInfo]:
    """Every model a tier serves: its `models` when it has several, else its one `model`."""
    return list(getattr(tier, "models", None) or [tier.model])


def served_version(tier: Tier, method: str) -> str:
    """The model version that answers `method` (a tier with several models defines `model_for`)."""
    model_for = getattr(tier, "model_for", None)
    return (model_for(method) if model_for else tier.model).version


class _Observation:
    """Span, latency and status bookkeeping for one server-side RPC."""

    def __init__(self, tier: Tier, method: str, context: grpc.aio.ServicerContext) -> None:
        self.tier = tier
        self.method = method
        self.code = grpc.StatusCode.OK
        parent = telemetry.extract_context(context.invocation_metadata())
        self.span = trace.get_tracer("tiermesh.server").start_span(
            method.lstrip("/"), context=parent, kind=trace.SpanKind.SERVER
        )
        self.span.set_attribute("rpc.system", "grpc")
        self.span.set_attribute("tiermesh.tier", tier.name)
        self._token = otel_context.attach(trace.set_span_in_context(self.span))
        self._started = time.perf_counter()
        metrics.RPC_IN_FLIGHT.labels(tier.name, method).inc()

    async def fail(self, context: grpc.aio.ServicerContext, error: BaseException) -> None:
        """Map an exception to a status, abort the RPC with it (raises AbortError)."""
        if isinstance(error, RpcError):
            self.code, detail = error.code, str(error)
        else:
            self.code = grpc.StatusCode.INTERNAL
            trace_id = format(self.span.get_span_context().trace_id, "032x")
            detail = f"internal error in {self.tier.name} (trace {trace_id})"
            logger.error("unexpected error in %s: %r", self.method, error, exc_info=error)
        await context.abort(self.code, detail)

    def finish(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            self.code = grpc.StatusCode.CANCELLED
        elif isinstance(error, grpc.aio.AbortError) and self.code == grpc.StatusCode.OK:
            self.code = context.code() or grpc.StatusCode.UNKNOWN  # the servicer aborted by itself
        version = served_version(self.tier, self.method)
        metrics.RPC_IN_FLIGHT.labels(self.tier.name, self.method).dec()
        arm = metrics.arm()
        metrics.RPC_REQUESTS.labels(self.tier.name, arm, self.method, self.code.name, version).inc()
        metrics.RPC_LATENCY.labels(self.tier.name, arm, self.method, version).observe(
            time.perf_counter() - self._started
        )
        self.span.set_attribute("rpc.grpc.status_code", self.code.value[0])
        if version:
            self.span.set_attribute("tiermesh.model_version", version)
        if self.code != grpc.StatusCode.OK:
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, self.code.name))
        otel_context.detach(self._token)
        self.span.end()


class _ObservingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tier: Tier, limit: int) -> None:
        self.tier = tier
        self.limit = limit
        self.in_flight = 0  # product calls being handled (one event loop: no lock needed)

    async def _admit(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Take a slot, or refuse the call at once when the tier is at its limit."""
        if self.in_flight >= self.limit:
            metrics.RPC_REFUSED.labels(self.tier.name, method).inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.tier.name} is at its limit of {self.limit} concurrent calls "
                f"({self.tier.name.upper()}_MAX_CONCURRENT_RPCS); retry later",
            )
        self.in_flight += 1

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith("/grpc.") or handler.request_streaming:
            return handler
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._unary(handler.unary_unary, method),
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.explanation)
            await self._admit(method, context)
            observation = _Observation(self.tier, method, context)
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError) as raised:
                error = raised
                raise
            except Exception as raised:
                error = raised
                await observation.fail(context, raised)
            finally:
                self.in_flight -= 1
                observation.finish(context, error)

        return observed

    def _stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):
            raise TypeError(f"{method}: streaming handlers must be async generators")

        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.explanation)
            await self._admit(method, context)
            observation = _Observation(self.tier, method, context)
            error: BaseException | None = None
            try:
                async for item in behavior(request, context):
                    yield item
            except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit) as raised:
                error = raised
                raise
            except Exception as raised:
                error = raised
                await observation.fail(context, raised)
            finally:
                self.in_flight -= 1
                observation.finish(context, error)

        return observed
