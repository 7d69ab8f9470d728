"""Loan-intent classification: MiniLM sentence features from the embedder's own engine, then a small
MLP head exported to ONNX (softmax inside the graph).

Training embeds the repo's labelled questions with exactly the embedder version the mesh serves
(recorded in the version, so serving computes the same features), trains the head in PyTorch on
the fixed train split and evaluates on the fixed held-out split. Serving needs no PyTorch.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.classifiers.config import INTENT
from tiermesh.kit.minilm import OnnxEngine, served_model
from tiermesh.kit.registry import ModelVersion, Registry, RegistryError

LABELS = (
    "loan_affordability",
    "loan_eligibility",
    "interest_rates",
    "loan_comparison",
    "refinancing",
    "debt_consolidation",
    "credit_score",
    "repayment_options",
    "application_status",
    "required_documents",
    "fees_and_penalties",
    "hardship_assistance",
    "fraud_dispute",
    "out_of_scope",
)
FALLBACK = "out_of_scope"
DATA = Path(__file__).parent / "data" / "intent"
HEAD_ONNX = "head.onnx"
HEAD_WEIGHTS = "head.safetensors"
DEFAULT_THRESHOLD = 0.4
TOP = 3


@dataclasses.dataclass(frozen=True)
class IntentPrediction:
    label: str
    probability: float
    candidates: list[tuple[str, float]]  # top 3 before the low-confidence rule
    low_confidence: bool
    threshold: float


def read_examples(path: Path) -> tuple[list[str], list[str]]:
    """(texts, labels) from a JSONL file of {"text", "label"}; errors name the line."""
    texts, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, label = row["text"], row["label"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: expected {{'text': ..., 'label': ...}} ({error})") from None
        if label not in LABELS:
            raise ValueError(f"{path}:{number}: label {label!r} is not one of {', '.join(LABELS)}")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{number}: text must be a non-empty string")
        texts.append(text)
        labels.append(label)
    return texts, labels


def predictions(probabilities: np.ndarray, labels: Sequence[str], threshold: float) -> list[IntentPrediction]:
    """Label, top-3 and the low-confidence rule for each row of class probabilities."""
    found = []
    for row in probabilities:
        order = np.argsort(-row)[:TOP]
        best = float(row[order[0]])
        low = best < threshold
        found.append(
            IntentPrediction(
                label=FALLBACK if low else labels[order[0]],
                probability=best,
                candidates=[(labels[i], float(row[i])) for i in order],
                low_confidence=low,
                threshold=threshold,
            )
        )
    return found


class IntentModel:
    """A published intent version, ready to classify (blocking calls; run them off the event loop)."""

    def __init__(
        self, version: ModelVersion, registry: Registry, *, threads: int = 1, check: bool = True
    ) -> None:
        import onnxruntime as ort

        self.version = version
        parameters = version.metadata["parameters"]
        self.labels: tuple[str, ...] = tuple(parameters["labels"])
        self.threshold = float(parameters["threshold"])
        wanted = parameters["embedder"]
        embedder = registry.get(wanted["name"], wanted["version"])
        if embedder.digest != wanted["digest"]:
            raise RegistryError(
                f"{version.name} {version.version} was trained on {wanted['name']} {wanted['version']} "
                f"{wanted['digest']}, but the registry holds {embedder.digest} under that version"
            )
        # Spinning threads would steal the cores the other models and Envoy need between calls.
        self.embedder = OnnxEngine(embedder, threads=threads, spin_wait="off")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.head = ort.InferenceSession(
            str(version.artifact(HEAD_ONNX)), options, providers=["CPUExecutionProvider"]
        )
        if check:
            self._check(parameters["probe"])

    def features(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([embedded.vector for embedded in self.embedder.embed(texts)])

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        (probabilities,) = self.head.run(None, {"features": self.features(texts)})
        return probabilities

    def classify(self, texts: Sequence[str], threshold: float | None = None) -> list[IntentPrediction]:
        chosen = self.threshold if threshold is None else threshold
        return predictions(self.probabilities(texts), self.labels, chosen)

    def _check(self, probe: dict[str, Any]) -> None:
        """Refuse a version whose head or features do not reproduce what training saw."""
        got = self.probabilities(probe["texts"])
        if not np.allclose(got, np.asarray(probe["probabilities"]), atol=1e-4):
            raise RegistryError(
                f"{self.version.name} {self.version.version}: probe questions do not reproduce the "
                "probabilities recorded at training (corrupt head or different embedder)"
            )

    def close(self) -> None:
        self.embedder.close()
        del self.head


def evaluate(model: IntentModel, path: Path = DATA / "test.jsonl") -> dict[str, Any]:
    """Accuracy and macro-F1 on a labelled file: the metrics `metadata.json` reports."""
    from sklearn.metrics import accuracy_score, f1_score

    texts, truth = read_examples(path)
    probabilities = model.probabilities(texts)
    argmax = [model.labels[i] for i in probabilities.argmax(axis=1)]
    served = [p.label for p in predictions(probabilities, model.labels, model.threshold)]
    per_label = f1_score(truth, argmax, labels=list(model.labels), average=None, zero_division=0)
    return {
        "examples": len(texts),
        "accuracy": round(float(accuracy_score(truth, argmax)), 4),
        "macro_f1": round(float(f1_score(truth, argmax, average="macro", zero_division=0)), 4),
        "accuracy_with_threshold": round(float(accuracy_score(truth, served)), 4),
        "low_confidence_rate": round(float((probabilities.max(axis=1) < model.threshold).mean()), 4),
        "f1_per_label": {label: round(float(f), 4) for label, f in zip(model.labels, per_label, strict=True)},
    }


def build_head(dimension: int, classes: int, hidden: int) -> Any:
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(dimension, hidden),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(hidden, classes),
    )


def train(
    registry: Registry,
    *,
    data: Path = DATA,
    seed: int = 0,
    hidden: int = 256,
    epochs: int = 300,
    threshold: float = DEFAULT_THRESHOLD,
    changelog: str = "",
    make_latest: bool = False,
) -> ModelVersion:
    """Train, export, evaluate and publish a new version (live only with `make_latest`)."""
    import torch
    from safetensors.torch import save_file

    embedder_version = served_model(registry)
    train_texts, train_labels = read_examples(data / "train.jsonl")
    inputs = torch.from_numpy(embed_questions(embedder_version, train_texts))
    targets = torch.tensor([LABELS.index(label) for label in train_labels])
    head = fit_head(inputs, targets, hidden=hidden, epochs=epochs, seed=seed)

    with tempfile.TemporaryDirectory(prefix="tiermesh-intent-") as scratch:
        staging = Path(scratch)
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(staging / HEAD_WEIGHTS))
        export_head(head, inputs.shape[1], staging / HEAD_ONNX)
        test_texts, _ = read_examples(data / "test.jsonl")
        parameters: dict[str, Any] = {
            "labels": list(LABELS),
            "threshold": threshold,
            "dimension": int(inputs.shape[1]),
            "hidden": hidden,
            "embedder": {
                "name": embedder_version.name,
                "version": embedder_version.version,
                "digest": embedder_version.digest,
            },
            "training": {"seed": seed, "epochs": epochs, "examples": len(train_texts), "optimiser": "AdamW"},
        }
        candidate = ModelVersion(INTENT, "candidate", staging, {"parameters": {**parameters, "probe": None}})
        model = IntentModel(candidate, registry, check=False)  # the probe is recorded from this model
        probe_texts = test_texts[:4]
        parameters["probe"] = {
            "texts": probe_texts,
            "probabilities": model.probabilities(probe_texts).round(6).tolist(),
        }
        metrics = evaluate(model, data / "test.jsonl")
        model.close()
        return registry.publish(
            INTENT,
            staging,
            origin={
                "data": str(data.relative_to(Path(__file__).parent)),
                "trainer": "services.classifiers.intent",
            },
            parameters=parameters,
            metrics=metrics,
            changelog=changelog
            or f"MiniLM features + MLP head ({hidden} hidden) on {len(train_texts)} questions, seed {seed}",
            make_latest=make_latest,
        )


def embed_questions(embedder: ModelVersion, texts: list[str]) -> np.ndarray:
    """The MiniLM features of `texts` (the head's inputs), with a progress bar of batches."""
    from tqdm import tqdm

    engine = OnnxEngine(embedder, spin_wait="on")
    batches = [texts[i : i + 64] for i in range(0, len(texts), 64)]
    try:
        return np.stack(
            [
                e.vector
                for batch in tqdm(batches, desc="intent: embedding questions", unit="batch")
                for e in engine.embed(batch)
            ]
        )
    finally:
        engine.close()


def fit_head(inputs: Any, targets: Any, *, hidden: int, epochs: int, seed: int) -> Any:
    """The MLP head trained full-batch on the features (seeded: the same data gives the same head)."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(seed)
    head = build_head(inputs.shape[1], len(LABELS), hidden)
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    loss_function = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    head.train()
    for _ in tqdm(range(epochs), desc="intent: training head", unit="epoch"):
        optimiser.zero_grad()
        loss = loss_function(head(inputs), targets)
        loss.backward()
        optimiser.step()
    return head.eval()


def export_head(head: Any, dimension: int, target: Path) -> None:
    import torch

    class WithSoftmax(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = head

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.head(features), dim=-1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            WithSoftmax().eval(),
            (torch.zeros(2, dimension),),
            str(target),
            input_names=["features"],
            output_names=["probabilities"],
            dynamic_axes={"features": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=17,
            dynamo=False,  # the TorchScript exporter: one small graph, no torch.export tracing needed
        )
