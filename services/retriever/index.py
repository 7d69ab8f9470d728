"""Index artifacts: build a FAISS index over passages, open and check a published version, search it.

A version folder in the registry (`<index name>/<12 hex of the content digest>/`) holds:

    index.faiss      IndexFlatIP or IndexIVFFlat over L2-normalised embeddings (inner product = cosine)
    passages.jsonl   one passage per line, in vector-id order
    offsets.npy      byte offset of every line, so a search reads only the passages it returns
    filters.npz      for each filterable "key=value" of the metadata, the ids that have it
    probes.npy       a few stored vectors; a replica checks each finds itself before serving
    index.json       kind, nlist, default nprobe, dimension, count and the embedder version the
                     vectors came from (also in metadata.json, with the file sizes)

Nothing here knows gRPC; the servicer validates requests and converts the results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import mmap
import os
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from services.retriever.corpus import Passage
from tiermesh.kit.registry import ModelVersion, Registry, file_sha256

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
PASSAGES_FILE = "passages.jsonl"
OFFSETS_FILE = "offsets.npy"
FILTERS_FILE = "filters.npz"
PROBES_FILE = "probes.npy"
PARAMETERS_FILE = "index.json"
FORMAT = 1
KINDS = ("flat", "ivf")
# Metadata keys with more distinct values than this (urls, ids) are stored but not filterable.
MAX_FILTER_VALUES = 1000
PROBE_COUNT = 8
HASHED_FILE_BYTES = 64 << 20
HNSW_ASSIGN_MIN_LISTS = 1024
ADD_CHUNK = 65_536


class IndexArtifactError(Exception):
    """An index cannot be built, loaded or used; the message says which version and why."""


# -- building ----------------------------------------------------------------------------------


def default_nlist(count: int) -> int:
    """nlist ~ 4 * sqrt(N), but at least 39 training vectors per list (FAISS's k-means minimum)."""
    return max(1, min(round(4 * math.sqrt(count)), count // 39))


def default_nprobe(nlist: int) -> int:
    """Lists scanned when a request sets none: 16, or nlist/128 for large nlist.

    Measured on MiniLM embeddings of the synthetic corpus: recall@5 0.975 at nprobe 16 with
    1,265 lists (100k vectors) but 0.938 with 4,000 lists (1M), 0.968 at 32 (bench/retriever.py).
    """
    return min(nlist, max(16, round(nlist / 128)))


def _assigner(centroids: np.ndarray | int, dimension: int) -> faiss.Index:
    """The index that finds each vector's nearest centroid while building.

    Exact search over thousands of centroids is most of an IVF build (1M x 4000 x 384 on two
    cores is about a minute per pass), so with many lists an HNSW graph over the centroids does
    it ~5x faster, agreeing with exact assignment for ~98% of vectors (the rest land in a
    neighbouring list). Searches still use the exact flat quantizer.
    """
    count = centroids if isinstance(centroids, int) else len(centroids)
    if count < HNSW_ASSIGN_MIN_LISTS:
        index: faiss.Index = faiss.IndexFlatIP(dimension)
    else:
        index = faiss.IndexHNSWFlat(dimension, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 40
        index.hnsw.efSearch = 32
    if not isinstance(centroids, int):
        index.add(centroids)
    return index


def train_ivf(
    vectors: np.ndarray, nlist: int, *, sample: int | None = None, iterations: int = 10, seed: int = 1234
) -> np.ndarray:
    """Spherical k-means centroids for an IVF index, one progress step per iteration.

    Trained on a random sample (default 40 vectors per list, just above FAISS's minimum of 39)
    because k-means cost grows with sample x nlist; reproducible per seed.
    """
    count, dimension = vectors.shape
    size = min(count, sample or 40 * nlist)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(count, size=size, replace=False)) if size < count else np.arange(count)
    training = np.ascontiguousarray(vectors[chosen], dtype=np.float32)
    clustering = faiss.Clustering(dimension, nlist)
    clustering.spherical = True
    clustering.seed = seed
    clustering.niter = 1
    clustering.max_points_per_centroid = 1 << 30  # the sample is already the right size
    assigner = _assigner(nlist, dimension)
    centroids = None
    for _ in tqdm(range(iterations), desc=f"training {nlist} lists on {size:,}", unit="iter"):
        if centroids is not None:  # continue from the previous iteration's centroids
            faiss.copy_array_to_vector(centroids.ravel(), clustering.centroids)
        clustering.train(training, assigner)
        centroids = faiss.vector_to_array(clustering.centroids).reshape(nlist, dimension)
    assert centroids is not None
    return centroids


def build_faiss(
    vectors: np.ndarray, *, kind: str, nlist: int | None = None, sample: int | None = None
) -> faiss.Index:
    """An IndexFlatIP or IndexIVFFlat over `vectors` (rows L2-normalised), with progress bars."""
    count, dimension = vectors.shape
    assigner = None
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(dimension)
    elif kind == "ivf":
        nlist = nlist or default_nlist(count)
        if not 1 <= nlist <= count:
            raise IndexArtifactError(f"nlist must be between 1 and the vector count {count}, got {nlist}")
        centroids = train_ivf(vectors, nlist, sample=sample)
        quantizer = faiss.IndexFlatIP(dimension)
        quantizer.add(centroids)
        index = faiss.IndexIVFFlat(quantizer, dimension, nlist, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()  # the IVF index frees its quantizer
        assigner = _assigner(centroids, dimension)
    else:
        raise IndexArtifactError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    with tqdm(total=count, desc=f"adding to {kind} index", unit="vec") as bar:
        for start in range(0, count, ADD_CHUNK):
            chunk = np.ascontiguousarray(vectors[start : start + ADD_CHUNK], dtype=np.float32)
            if assigner is None:
                index.add(chunk)
            else:  # add to the lists the assigner chose (ids continue from ntotal)
                _, lists = assigner.search(chunk, 1)
                index.add_core(len(chunk), faiss.swig_ptr(chunk), None, faiss.swig_ptr(lists.ravel()))
            bar.update(len(chunk))
    return index


def _write_passages(passages: Sequence[Passage], folder: Path) -> None:
    offsets = np.empty(len(passages) + 1, dtype=np.int64)
    position = 0
    with open(folder / PASSAGES_FILE, "wb") as handle:
        for number, passage in enumerate(passages):
            line = json.dumps(passage.to_json(), ensure_ascii=False).encode() + b"\n"
            offsets[number] = position
            handle.write(line)
            position += len(line)
    offsets[-1] = position
    np.save(folder / OFFSETS_FILE, offsets)


def _write_filters(passages: Sequence[Passage], folder: Path) -> list[str]:
    """The "key=value" -> ids table for metadata keys with few enough distinct values."""
    by_key: dict[str, dict[str, list[int]]] = {}
    for number, passage in enumerate(passages):
        for key, value in passage.metadata.items():
            by_key.setdefault(key, {}).setdefault(value, []).append(number)
    names, ids, bounds = [], [], [0]
    filterable = sorted(key for key, values in by_key.items() if len(values) <= MAX_FILTER_VALUES)
    for key in filterable:
        for value, members in sorted(by_key[key].items()):
            names.append(f"{key}={value}")
            ids.extend(members)
            bounds.append(len(ids))
    np.savez(
        folder / FILTERS_FILE,
        names=np.array(names, dtype=str),
        ids=np.array(ids, dtype=np.int64),
        bounds=np.array(bounds, dtype=np.int64),
    )
    return filterable


def write_artifact(
    registry: Registry,
    name: str,
    passages: Sequence[Passage],
    vectors: np.ndarray,
    *,
    kind: str,
    nlist: int | None,
    nprobe: int | None,
    embedder: ModelVersion,
    source: dict[str, Any],
    sample: int | None = None,
) -> tuple[ModelVersion, float]:
    """Build the index and publish it as an immutable, content-named version (not made latest).

    Returns the version and the seconds FAISS took (training + adding).
    """
    if len(passages) != len(vectors):
        raise IndexArtifactError(f"{len(passages)} passages but {len(vectors)} vectors")
    started = time.perf_counter()
    index = build_faiss(vectors, kind=kind, nlist=nlist, sample=sample)
    build_s = time.perf_counter() - started
    nlist = index.nlist if kind == "ivf" else 0
    rng = np.random.default_rng(0)
    probe_ids = np.sort(rng.choice(len(vectors), size=min(PROBE_COUNT, len(vectors)), replace=False))
    root = registry.root / name
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as staging:
        folder = Path(staging)
        faiss.write_index(index, str(folder / INDEX_FILE))
        _write_passages(passages, folder)
        filterable = _write_filters(passages, folder)
        np.save(folder / PROBES_FILE, np.asarray(vectors[probe_ids], dtype=np.float32))
        parameters = {
            "format": FORMAT,
            "kind": kind,
            "dimension": int(vectors.shape[1]),
            "count": len(passages),
            "nlist": int(nlist),
            "default_nprobe": min(nprobe or default_nprobe(nlist), nlist) if nlist else 0,
            "probe_ids": probe_ids.tolist(),
            "filterable_keys": filterable,
            "embedder": {"name": embedder.name, "version": embedder.version, "digest": embedder.digest},
        }
        # An artifact file too, so the content digest (the version's name) covers how the index
        # is served: the same vectors with another default nprobe are another version.
        (folder / PARAMETERS_FILE).write_text(json.dumps(parameters, indent=2, sort_keys=True) + "\n")
        sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
        version = registry.publish(
            name,
            folder,
            content_named=True,
            make_latest=False,
            origin=source,
            parameters={**parameters, "file_sizes": sizes},
            metrics={"faiss_build_seconds": round(build_s, 2)},
        )
    return version, build_s


# -- a loaded version ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hit:
    """One search result: the passage and its cosine similarity to the query."""

    passage: Passage
    score: float


class _PassageStore:
    """Passages read on demand from the memory-mapped JSONL, so loading costs nothing per passage."""

    def __init__(self, folder: Path) -> None:
        self.offsets = np.load(folder / OFFSETS_FILE)
        self._file = open(folder / PASSAGES_FILE, "rb")  # noqa: SIM115 - closed by close()
        size = os.fstat(self._file.fileno()).st_size
        if size != int(self.offsets[-1]):
            raise IndexArtifactError(
                f"{PASSAGES_FILE} is {size} bytes, its offsets say {int(self.offsets[-1])}"
            )
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        # After a hot swap the old version is closed when its last search lets go of it.
        self._closer = weakref.finalize(self, _close, self._map, self._file)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, number: int) -> Passage:
        start, end = int(self.offsets[number]), int(self.offsets[number + 1])
        return Passage.from_json(json.loads(self._map[start:end]))

    def close(self) -> None:
        self._closer()


def _close(mapped: mmap.mmap | bytes, handle: Any) -> None:
    if isinstance(mapped, mmap.mmap):
        mapped.close()
    handle.close()


class LoadedIndex:
    """One published index version in memory, checked and ready to search from many threads.

    Searches never mutate shared state: nprobe and the metadata filter travel in per-call
    `SearchParameters`, so concurrent requests with different settings cannot interfere.
    """

    def __init__(self, version: ModelVersion, *, max_nprobe: int) -> None:
        self.version = version
        parameters = version.metadata.get("parameters", {})
        if parameters.get("format") != FORMAT or parameters.get("kind") not in KINDS:
            raise IndexArtifactError(
                f"{version.name} {version.version}: not a tiermesh index (format {FORMAT})"
            )
        self.kind: str = parameters["kind"]
        self.dimension = int(parameters["dimension"])
        self.nlist = int(parameters["nlist"])
        self.default_nprobe = int(parameters["default_nprobe"])
        self.max_nprobe = min(self.nlist, max_nprobe) if self.nlist else 0
        self.embedder: dict[str, str] = parameters["embedder"]
        self.filterable: list[str] = parameters["filterable_keys"]
        self._verify(parameters["file_sizes"])
        try:
            # Zero-copy: the vectors stay in the page cache, mapped, so opening a version takes
            # milliseconds whatever its size, and replicas on one host share the memory. Versions
            # are immutable, so the mapped file never changes underneath.
            self.index = faiss.read_index(str(version.artifact(INDEX_FILE)), faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError as error:
            raise IndexArtifactError(
                f"{version.name} {version.version}: unreadable {INDEX_FILE}: {error}"
            ) from None
        self.passages = _PassageStore(version.path)
        with np.load(version.artifact(FILTERS_FILE)) as filters:  # each [] re-reads the zip member
            names, ids, bounds = filters["names"], filters["ids"], filters["bounds"]
        self._filter_ids = {str(name): ids[bounds[i] : bounds[i + 1]] for i, name in enumerate(names)}
        self._check(np.load(version.artifact(PROBES_FILE)), parameters["probe_ids"], int(parameters["count"]))

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def memory_bytes(self) -> int:
        """Vectors, ids and centroids held by FAISS, plus the passage offsets and filter tables."""
        vectors = self.count * self.dimension * 4
        extra = self.count * 8 + self.nlist * self.dimension * 4 if self.kind == "ivf" else 0
        tables = self.passages.offsets.nbytes + sum(ids.nbytes for ids in self._filter_ids.values())
        return vectors + extra + tables

    def _verify(self, sizes: Mapping[str, int]) -> None:
        """Every file has its recorded size; small ones also their recorded sha256 (large ones are
        covered by the probe queries: hashing gigabytes would make a swap take seconds)."""
        where = f"{self.version.name} {self.version.version}"
        for relative, expected in sizes.items():
            path = self.version.artifact(relative)
            actual = path.stat().st_size
            if actual != expected:
                raise IndexArtifactError(
                    f"{where}: {relative} is {actual} bytes, expected {expected} (truncated or replaced)"
                )
            digest = self.version.metadata["files"].get(relative)
            if actual <= HASHED_FILE_BYTES and digest and file_sha256(path) != digest:
                raise IndexArtifactError(f"{where}: {relative} does not match its sha256 (corrupt)")

    def _check(self, probes: np.ndarray, probe_ids: list[int], count: int) -> None:
        """Refuse a version whose index, passages and probes disagree (corrupt or mismatched)."""
        where = f"{self.version.name} {self.version.version}"
        if self.index.d != self.dimension or probes.shape[1:] != (self.dimension,):
            raise IndexArtifactError(
                f"{where}: index dimension {self.index.d}, metadata says {self.dimension}"
            )
        if self.count != count or len(self.passages) != count:
            raise IndexArtifactError(
                f"{where}: {self.count} vectors and {len(self.passages)} passages, metadata says {count}"
            )
        scores, ids = self.search(probes, k=1, nprobe=max(1, self.default_nprobe))
        for expected, found, score in zip(probe_ids, ids[:, 0], scores[:, 0], strict=True):
            # a probe finds itself (or an identical duplicate) with cosine ~1
            if found < 0 or score < 0.999 or (found != expected and score < 0.99999):
                raise IndexArtifactError(
                    f"{where}: probe query for vector {expected} failed (got {found}, {score:.3f})"
                )

    def selector(self, metadata_filter: Mapping[str, str]) -> np.ndarray | None:
        """A bitmap of the ids matching every key=value (None = no filter); KeyError names a bad key."""
        if not metadata_filter:
            return None
        bitmap = np.ones(self.count, dtype=bool)
        for key, value in metadata_filter.items():
            if key not in self.filterable:
                raise KeyError(key)
            members = np.zeros(self.count, dtype=bool)
            members[self._filter_ids.get(f"{key}={value}", np.empty(0, dtype=np.int64))] = True
            bitmap &= members
        return np.packbits(bitmap, bitorder="little")

    def search(
        self, vectors: np.ndarray, *, k: int, nprobe: int, bitmap: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS scores and ids (-1 = fewer results) for each query row; blocking, thread-safe."""
        selector = faiss.IDSelectorBitmap(self.count, faiss.swig_ptr(bitmap)) if bitmap is not None else None
        if self.kind == "ivf":
            parameters = faiss.SearchParametersIVF(nprobe=nprobe, sel=selector)
        else:
            parameters = faiss.SearchParameters(sel=selector)
        scores, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k, params=parameters)
        return scores, ids

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
        return [Hit(self.passages[int(i)], float(s)) for s, i in zip(scores, ids, strict=True) if i >= 0]

    def stored_vectors(self) -> np.ndarray:
        """Every vector in id order, read back from the index (for exact-search validation)."""
        if self.kind == "flat":
            return faiss.rev_swig_ptr(self.index.get_xb(), self.count * self.dimension).reshape(
                self.count, self.dimension
            )
        ivf = faiss.extract_index_ivf(self.index)
        lists = ivf.invlists
        vectors = np.empty((self.count, self.dimension), dtype=np.float32)
        for number in range(ivf.nlist):
            size = lists.list_size(number)
            if not size:
                continue
            ids = faiss.rev_swig_ptr(lists.get_ids(number), size).copy()
            codes = faiss.rev_swig_ptr(lists.get_codes(number), size * self.dimension * 4)
            vectors[ids] = codes.view(np.float32).reshape(size, self.dimension)
        return vectors

    def close(self) -> None:
        self.passages.close()


# -- validation --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recall:
    """recall@k of an index against exact search over the same vectors."""

    k: int
    nprobe: int
    recall: float
    queries: int


def measure_recall(
    loaded: LoadedIndex, queries: np.ndarray, *, k: int, nprobes: Sequence[int]
) -> list[Recall]:
    """Mean |approximate top-k ∩ exact top-k| / k over `queries`, for each nprobe."""
    exact = faiss.IndexFlatIP(loaded.dimension)
    exact.add(loaded.stored_vectors())
    _, truth = exact.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    results = []
    for nprobe in nprobes:
        _, found = loaded.search(queries, k=k, nprobe=nprobe)
        overlap = [len(set(a[a >= 0]) & set(b[b >= 0])) / k for a, b in zip(found, truth, strict=True)]
        results.append(
            Recall(k, nprobe if loaded.kind == "ivf" else 0, float(np.mean(overlap)), len(queries))
        )
    return results
