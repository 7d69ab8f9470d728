"""Train, evaluate and publish the four classifier models (`tiermesh train`, set-up)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from services.classifiers import anomaly, credit, intent, ner
from services.classifiers.config import MODELS
from tiermesh.kit.registry import ModelVersion, Registry

logger = logging.getLogger(__name__)

TRAINERS: dict[str, Callable[..., ModelVersion]] = {
    "intent": intent.train,
    "ner": ner.train,
    "credit": credit.train,
    "anomaly": anomaly.train,
}
# What `tiermesh train` prints for each: the metrics the targets are about.
HEADLINES: dict[str, Callable[[dict[str, Any]], str]] = {
    "intent": lambda m: (
        f"accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} on {m['examples']} held-out"
    ),
    "ner": lambda m: f"micro F1 {m['micro']['f1']:.3f} on {m['sentences']} annotated sentences",
    "credit": lambda m: f"ROC-AUC {m['roc_auc']:.3f} on {m['applications']} held-out applications",
    "anomaly": lambda m: (
        f"detection rate {m['detection_rate']:.3f} at false-positive rate {m['false_positive_rate']:.4f}"
        f" on {m['transactions']} held-out transactions"
    ),
}


def train(kind: str, registry: Registry, **options: Any) -> ModelVersion:
    """Train `kind` (intent, ner, credit or anomaly) and publish it as a new version."""
    version = TRAINERS[kind](registry, **options)
    logger.info("%s %s: %s", version.name, version.version, headline(kind, version))
    return version


def headline(kind: str, version: ModelVersion) -> str:
    return HEADLINES[kind](version.metadata["metrics"])


def prepare(registry: Registry) -> list[ModelVersion]:
    """Set-up: train and publish every model that has no live version yet (idempotent)."""
    ready = []
    for kind, name in MODELS.items():
        live = registry.latest(name)
        ready.append(live if live is not None else train(kind, registry, make_latest=True))
    return ready
