"""Retriever settings, all read from `RETRIEVER_*` environment variables."""

from __future__ import annotations

import dataclasses

from tiermesh.kit.config import FollowingConfig, setting

INDEX_NAME = "loan-kb"
# An index version is published only when its recall@RECALL_K against exact search reaches this.
RECALL_K = 5
RECALL_THRESHOLD = 0.95


@dataclasses.dataclass(frozen=True)
class RetrieverConfig(FollowingConfig):
    index: str = setting("INDEX", INDEX_NAME, help="registry name of the index to serve")
    index_version: str = setting(
        "INDEX_VERSION", "latest", help="index version to serve; 'latest' follows publishes (hot swap)"
    )
    embedder_target: str = setting(
        "EMBEDDER_TARGET", "127.0.0.1:8080", help="gRPC address that answers EmbedderService (Envoy)"
    )
    embed_timeout_s: float = setting(
        "EMBED_TIMEOUT_S", 5.0, help="deadline for embedding a text query", min=0.01, max=120
    )
    default_k: int = setting(
        "DEFAULT_K", 5, help="passages returned when a request sets no k", min=1, max=1000
    )
    max_k: int = setting("MAX_K", 100, help="largest k a request may ask for", min=1, max=10_000)
    max_nprobe: int = setting(
        "MAX_NPROBE", 256, help="largest nprobe a request may ask for", min=1, max=65_536
    )
    max_text_chars: int = setting(
        "MAX_TEXT_CHARS", 2048, help="characters accepted in a text query", min=1, max=1_000_000
    )
    search_threads: int = setting(
        "SEARCH_THREADS", 2, help="searches run at once, off the event loop", min=1, max=256
    )
    faiss_threads: int = setting(
        "FAISS_THREADS", 1, help="OpenMP threads inside one FAISS search (1 suits many small queries)",
        min=1, max=256,
    )  # fmt: skip
