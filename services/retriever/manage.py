"""Index operations behind `tiermesh index build|validate|publish|rollback|list|synth`.

build     embed a corpus with the embedder version the mesh serves, build FAISS, store a
          content-named version (not yet live)
validate  recall@k of a version against exact search on held-out queries; the result is kept
publish   refuse below the recall threshold (unless forced, which is logged) or a different
          embedder version; then move `latest` and announce it, and every replica swaps
rollback  move `latest` back to the version before, announced the same way
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from services.retriever import corpus
from services.retriever.config import INDEX_NAME, RECALL_K, RECALL_THRESHOLD
from services.retriever.index import IndexArtifactError, LoadedIndex, Recall, measure_recall, write_artifact
from tiermesh.kit.hotswap import announce_latest
from tiermesh.kit.minilm import served_model
from tiermesh.kit.registry import ModelVersion, Registry, RegistryError, file_sha256

logger = logging.getLogger(__name__)

EMBED_CHUNK = 256
VALIDATIONS = "validations"


class PublishRefused(Exception):
    """Publishing was refused; the message says why and how to proceed."""


def embed_texts(texts: Sequence[str], embedder: ModelVersion, *, desc: str = "embedding") -> np.ndarray:
    """Vectors of `texts` from the embedder version, in-process (same ONNX model as the tier)."""
    from tiermesh.kit.minilm import OnnxEngine

    engine = OnnxEngine(embedder, token_budget=512, spin_wait="on")
    vectors = np.empty((len(texts), engine.dimension), dtype=np.float32)
    with tqdm(total=len(texts), desc=desc, unit="text", disable=len(texts) < EMBED_CHUNK) as bar:
        for start in range(0, len(texts), EMBED_CHUNK):
            batch = texts[start : start + EMBED_CHUNK]
            vectors[start : start + len(batch)] = np.stack([e.vector for e in engine.embed(batch)])
            bar.update(len(batch))
    engine.close()
    return vectors


def build(
    registry: Registry,
    corpus_path: Path = corpus.DEFAULT_CORPUS,
    *,
    name: str = INDEX_NAME,
    kind: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
) -> ModelVersion:
    """Embed and index a corpus; returns the new (or identical existing) version, not yet live."""
    passages = corpus.load(corpus_path)
    if kind == "auto":  # exact search is fast enough below ~50k vectors
        kind = "flat" if len(passages) < 50_000 else "ivf"
    embedder = served_model(registry)
    texts = [f"{p.title}\n{p.text}" if p.title else p.text for p in passages]
    vectors = embed_texts(texts, embedder, desc=f"embedding {len(passages)} passages")
    version, seconds = write_artifact(
        registry,
        name,
        passages,
        vectors,
        kind=kind,
        nlist=nlist,
        nprobe=nprobe,
        embedder=embedder,
        source={"corpus": str(corpus_path), "corpus_sha256": file_sha256(Path(corpus_path))},
    )
    logger.info("built %s %s (%s, %d passages) in %.1fs", name, version.version, kind, len(passages), seconds)
    return version


def _validation_file(registry: Registry, name: str, version: str) -> Path:
    return registry.root / name / VALIDATIONS / f"{version}.json"


def validation(registry: Registry, name: str, version: str) -> dict[str, Any] | None:
    """The stored validation result of a version, if it was validated."""
    try:
        return json.loads(_validation_file(registry, name, version).read_text())
    except (OSError, ValueError):
        return None


def default_queries(version: ModelVersion) -> list[str]:
    """Held-out questions for the shipped knowledge base, else a sample of passage titles."""
    source = version.metadata.get("source", {}).get("corpus", "")
    questions = Path(source).with_name("questions.jsonl") if source else None
    if questions is not None and questions.is_file():
        return corpus.load_questions(questions)
    rows = corpus.load(Path(source)) if source and Path(source).is_file() else []
    titles = sorted({p.title for p in rows if p.title})
    if not titles:
        raise IndexArtifactError(f"{version.name} {version.version}: no queries; pass --queries FILE")
    return titles[:: max(1, len(titles) // 200)]


def validate(
    registry: Registry,
    version: str,
    *,
    name: str = INDEX_NAME,
    queries: Sequence[str] | None = None,
    k: int = RECALL_K,
    extra_nprobes: Sequence[int] = (1, 4, 8, 16, 32, 64),
) -> tuple[Recall, list[Recall]]:
    """recall@k at the version's default nprobe (stored with the version) and at other nprobes."""
    model = registry.get(name, version)
    loaded = LoadedIndex(model, max_nprobe=1 << 30)
    try:
        texts = list(queries) if queries else default_queries(model)
        embedder = registry.get(loaded.embedder["name"], loaded.embedder["version"])
        vectors = embed_texts(texts, embedder, desc="embedding queries")
        nprobes = sorted({loaded.default_nprobe, *(n for n in extra_nprobes if n <= loaded.nlist)})
        results = measure_recall(loaded, vectors, k=k, nprobes=nprobes if loaded.kind == "ivf" else [0])
    finally:
        loaded.close()
    at_default = next(
        r for r in results if r.nprobe == (loaded.default_nprobe if loaded.kind == "ivf" else 0)
    )
    record = {
        "version": model.version,
        "digest": model.digest,
        "k": k,
        "nprobe": at_default.nprobe,
        "recall": at_default.recall,
        "queries": at_default.queries,
        "by_nprobe": {str(r.nprobe): r.recall for r in results},
        "validated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    target = _validation_file(registry, name, model.version)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temporary, target)
    return at_default, results


def publish(
    registry: Registry,
    version: str,
    *,
    name: str = INDEX_NAME,
    store_url: str | None,
    allow_low_recall: bool = False,
    threshold: float = RECALL_THRESHOLD,
    progress: Callable[[str], None] = print,
) -> ModelVersion:
    """Make a validated version live: move `latest`, then announce it to every replica."""
    model = registry.get(name, version)
    embedder = served_model(registry)
    built_with = model.metadata["parameters"]["embedder"]
    if built_with["digest"] != embedder.digest:
        raise PublishRefused(
            f"{name} {model.version} was built with embedder {built_with['version']} but the mesh serves "
            f"{embedder.version}; rebuild it with `tiermesh index build`"
        )
    result = validation(registry, name, model.version)
    if result is None:
        progress(f"{name} {model.version} was not validated yet; validating now")
        validate(registry, model.version, name=name)
        result = validation(registry, name, model.version)
    assert result is not None
    if result["recall"] < threshold:
        message = (
            f"{name} {model.version}: recall@{result['k']} {result['recall']:.3f} at nprobe "
            f"{result['nprobe']} is below {threshold}"
        )
        if not allow_low_recall:
            raise PublishRefused(message + " (publish with --allow-low-recall to override)")
        logger.warning(
            "%s; published anyway (--allow-low-recall) by %s", message, os.environ.get("USER", "?")
        )
        progress(f"WARNING: {message}; publishing anyway (--allow-low-recall, logged)")
    registry.set_latest(name, model.version)
    announce_latest(store_url, model, progress)
    return model


def rollback(
    registry: Registry,
    *,
    name: str = INDEX_NAME,
    store_url: str | None,
    progress: Callable[[str], None] = print,
) -> ModelVersion:
    """Move `latest` back to the previously published version and announce it."""
    model = registry.rollback(name)
    announce_latest(store_url, model, progress)
    return model


def synth(path: Path, count: int, *, seed: int = 0) -> Path:
    """Write a synthetic lending corpus of `count` documents as JSONL (see synthetic.py)."""
    from services.retriever import synthetic

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(temporary, "w", encoding="utf-8") as handle:
        for passage in tqdm(synthetic.passages(count, seed=seed), total=count, desc="generating", unit="doc"):
            record = {"id": passage["id"], "title": passage["title"], "section": passage["section"]}
            handle.write(
                json.dumps({**record, "text": passage["text"], "metadata": passage["metadata"]}) + "\n"
            )
    os.replace(temporary, path)
    return path


def versions_table(registry: Registry, name: str = INDEX_NAME) -> list[dict[str, Any]]:
    """Every version with its kind, size, recall and whether it is live."""
    try:
        latest = registry.latest(name)
    except RegistryError:
        latest = None
    rows = []
    for model in registry.versions(name):
        parameters = model.metadata.get("parameters", {})
        checked = validation(registry, name, model.version)
        rows.append(
            {
                "version": model.version,
                "live": latest is not None and latest.version == model.version,
                "kind": parameters.get("kind"),
                "vectors": parameters.get("count"),
                "nlist": parameters.get("nlist"),
                "nprobe": parameters.get("default_nprobe"),
                "recall": None if checked is None else round(checked["recall"], 4),
                "embedder": parameters.get("embedder", {}).get("version"),
                "created": model.metadata.get("created"),
            }
        )
    return rows


def prepare(registry: Registry, *, name: str = INDEX_NAME) -> ModelVersion:
    """Set-up: build, validate and publish the shipped knowledge base unless a usable index is live."""
    live = registry.latest(name)
    embedder = served_model(registry)
    if live is not None and live.metadata["parameters"]["embedder"]["digest"] == embedder.digest:
        return live
    version = build(registry, name=name)
    return publish(registry, version.version, name=name, store_url=None, progress=lambda _line: None)
