"""Fixtures for the retriever's tests: a scratch registry and small artifacts built in it."""

from __future__ import annotations

import numpy as np
import pytest

from services.retriever.corpus import Passage
from services.retriever.index import write_artifact
from tiermesh.kit import testing
from tiermesh.kit.registry import ModelVersion, Registry

TOPICS = ("fees", "credit", "hardship", "documents")


@pytest.fixture
def scratch_registry(tmp_path, embedding_model) -> Registry:
    """A registry of its own (indexes published here touch nothing else) sharing the embedder."""
    return testing.scratch_registry(tmp_path / "models", embedding_model)


def clustered(count: int, dimension: int = 32, *, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres: structured like embeddings, cheap to make."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dimension))
    vectors = centres[rng.integers(0, clusters, count)] + 0.35 * rng.normal(size=(count, dimension))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def passages(count: int) -> list[Passage]:
    return [
        Passage(f"doc-{i}", 0, f"title {i}", "section", f"text {i}", {"topic": TOPICS[i % len(TOPICS)]})
        for i in range(count)
    ]


def artifact(
    registry: Registry, embedder: ModelVersion, *, count: int = 2000, seed: int = 0, **options
) -> tuple[ModelVersion, np.ndarray]:
    vectors = clustered(count, seed=seed)
    options = {"kind": "ivf", "nlist": None, "nprobe": 8, **options}
    version, _ = write_artifact(
        registry, "test-index", passages(count), vectors, embedder=embedder, source={}, **options
    )
    return version, vectors
