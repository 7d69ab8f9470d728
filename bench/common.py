"""What every benchmark shares: progress lines on stderr, a description of the host, JSON output."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def log(message: str) -> None:
    """A progress line on stderr (stdout carries the tables)."""
    print(message, file=sys.stderr, flush=True)


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def host(packages: Iterable[str], **extra: Any) -> dict[str, Any]:
    """The machine and the versions of `packages`, recorded with every result."""
    memory = None
    with contextlib.suppress(OSError, AttributeError):
        found = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        memory = int(found.group(1)) * 1024 if found else None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": memory,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        **extra,
        "versions": {package: package_version(package) for package in packages},
    }


def percentiles(latencies: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 in milliseconds of latencies in seconds (NaN when there are none)."""
    import numpy as np

    if not len(latencies):
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    ms = np.asarray(latencies, dtype=float) * 1000
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)}


def summary(latencies: Sequence[float], wall_s: float) -> dict[str, float]:
    """Request count, p50/p95/p99 in milliseconds and throughput of latencies in seconds."""
    return {"requests": len(latencies), **percentiles(latencies), "per_s": len(latencies) / wall_s}


async def keep_in_flight(
    concurrency: int, indices: Iterable[int], one: Callable[[int], Awaitable[T]]
) -> tuple[list[T], float]:
    """Keep `concurrency` calls of `one(index)` running until every index was asked:
    (the results in the order they finished, the wall time in seconds)."""
    queue = iter(indices)
    done: list[T] = []

    async def worker() -> None:
        for index in queue:
            done.append(await one(index))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, time.perf_counter() - started


def timed(
    call: Callable[[int], Any], duration_s: float, *, warmup: int = 20, min_calls: int = 1
) -> dict[str, float]:
    """Call `call(i)` back to back for `duration_s` and at least `min_calls` times, after `warmup`
    untimed calls; the `summary` of the timed ones."""
    for i in range(warmup):
        call(i)
    latencies: list[float] = []
    started, i = time.perf_counter(), 0
    while time.perf_counter() - started < duration_s or len(latencies) < min_calls:
        before = time.perf_counter()
        call(i)
        latencies.append(time.perf_counter() - before)
        i += 1
    return summary(latencies, time.perf_counter() - started)


def finite(value: Any) -> Any:
    """`value` with NaN/inf (no measurement) replaced by None, which JSON can carry."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(report), indent=2, allow_nan=False) + "\n")


def verdicts(results: Sequence[dict[str, Any]]) -> str:
    """One line per target: what it asks, what was measured (`unit`, optional `at`), met or not."""
    lines = []
    for r in results:
        measured = "none" if r["measured"] is None else f"{r['measured']:g}{r.get('unit', '')}"
        at = f" at {r['at']}" if r.get("at") else ""
        lines.append(f"target: {r['target']}: measured {measured}{at} -> {'met' if r['met'] else 'NOT met'}")
    return "\n".join(lines)


async def unlimited_key(store_url: str, name: str) -> str:
    """A new API key (its secret) whose rate limits a benchmark never reaches."""
    import redis.asyncio as aioredis

    from services.gateway.keys import KeyStore

    client = aioredis.Redis.from_url(store_url)
    try:
        secret, _ = await KeyStore(client).create(
            name, requests_per_minute=1_000_000_000, tokens_per_minute=1_000_000_000_000
        )
    finally:
        await client.aclose()
    return secret
