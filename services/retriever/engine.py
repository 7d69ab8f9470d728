"""The retriever's engine: the serving index version, searched off the event loop and hot-swapped.

`IndexEngine.current` is the one reference requests read, held by the kit's `ModelSlot`: a new
version is opened and checked in a worker thread beside the old one, then swapped in one
assignment; a search that already took the old reference finishes on it, and the old index is
freed when its last search ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Mapping

import faiss
import numpy as np
from prometheus_client import Gauge, Histogram

from services.retriever.index import Hit, IndexArtifactError, LoadedIndex
from tiermesh.kit import metrics
from tiermesh.kit.hotswap import ModelSlot
from tiermesh.kit.registry import ModelVersion

logger = logging.getLogger(__name__)

VECTORS = Gauge("tiermesh_retriever_vectors", "Vectors in the serving index", ["index"])
MEMORY = Gauge("tiermesh_retriever_index_memory_bytes", "Memory held by the serving index", ["index"])
SEARCH_SECONDS = Histogram(
    "tiermesh_retriever_search_seconds",
    "FAISS search time per query (excluding embedding)",
    ["index", "kind"],
    buckets=metrics.LATENCY_BUCKETS,
)


class IndexEngine:
    """Holds the serving `LoadedIndex`; loads, checks and swaps versions; runs searches."""

    def __init__(self, *, max_nprobe: int, search_threads: int, faiss_threads: int) -> None:
        faiss.omp_set_num_threads(faiss_threads)
        self.slot: ModelSlot[LoadedIndex] = ModelSlot(
            "retriever", "index", lambda version: LoadedIndex(version, max_nprobe=max_nprobe)
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(search_threads, thread_name_prefix="search")

    @property
    def current(self) -> LoadedIndex | None:
        return self.slot.current

    def serving_version(self) -> str | None:
        return self.slot.serving_version()

    async def load(self, version: ModelVersion, *, embedder: ModelVersion) -> LoadedIndex:
        """Open and check `version` in the background, then make it the serving index."""
        built_with = version.metadata.get("parameters", {}).get("embedder", {})
        if built_with.get("version") != embedder.version or built_with.get("digest") != embedder.digest:
            raise IndexArtifactError(
                f"{version.name} {version.version} was built with embedder {built_with.get('name')} "
                f"{built_with.get('version')}, but the embedder tier serves "
                f"{embedder.name} {embedder.version}"
            )
        loaded = await self.slot.load(version)
        VECTORS.labels(version.name).set(loaded.count)
        MEMORY.labels(version.name).set(loaded.memory_bytes)
        return loaded

    async def search(
        self,
        loaded: LoadedIndex,
        vector: np.ndarray,
        *,
        k: int,
        nprobe: int,
        metadata_filter: Mapping[str, str],
    ) -> list[Hit]:
        """Top-k hits for one query vector on `loaded` (the version the request started with)."""

        def run() -> list[Hit]:
            bitmap = loaded.selector(metadata_filter)  # O(vectors): off the event loop too
            started = time.perf_counter()
            scores, ids = loaded.search(vector[None, :], k=k, nprobe=nprobe, bitmap=bitmap)
            SEARCH_SECONDS.labels(loaded.version.name, loaded.kind).observe(time.perf_counter() - started)
            return loaded.hits(scores[0], ids[0])

        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.slot.close()
