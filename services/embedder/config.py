"""Embedder settings, all read from `EMBEDDER_*` environment variables."""

from __future__ import annotations

import dataclasses

from tiermesh.kit.config import ServerConfig, setting
from tiermesh.kit.minilm import MODEL_NAME


@dataclasses.dataclass(frozen=True)
class EmbedderConfig(ServerConfig):
    model: str = setting("MODEL", MODEL_NAME, help="registry name of the embedding model")
    model_version: str = setting("MODEL_VERSION", "latest", help="registry version to serve, or 'latest'")
    device: str = setting(
        "DEVICE", "auto", help="cpu (ONNX Runtime), cuda (PyTorch) or auto", choices=("auto", "cpu", "cuda")
    )
    threads: int = setting("THREADS", 0, help="ONNX Runtime intra-op threads (0 = all cores)", min=0, max=256)
    max_batch_size: int = setting(
        "MAX_BATCH_SIZE", 64, help="texts per model call when batching", min=1, max=4096
    )
    # 0: a batch starts as soon as the engine is free; under load, requests queue while the
    # previous batch runs, so batches form without making a lone query wait.
    max_wait_ms: float = setting(
        "MAX_WAIT_MS", 0.0, help="how long the first text waits for others to join its batch", min=0, max=1000
    )
    spin_wait: str = setting(
        "SPIN_WAIT",
        "bulk",
        help="ONNX Runtime threads spin between calls: off, bulk (batches of several calls) or on",
        choices=("off", "bulk", "on"),
    )
    token_budget: int = setting(
        "TOKEN_BUDGET",
        64,
        help="padded tokens per ONNX call: batches are cut by length",
        min=1,
        max=1_000_000,
    )
    max_texts: int = setting(
        "MAX_TEXTS", 256, help="texts accepted in one EmbedBatch request", min=1, max=100_000
    )
    max_text_chars: int = setting(
        "MAX_TEXT_CHARS", 8192, help="characters accepted per text", min=1, max=1_000_000
    )
    cache_url: str = setting("CACHE_URL", "", help="redis:// URL of the embedding cache; empty disables it")
    cache_ttl_s: int = setting(
        "CACHE_TTL_S", 86_400, help="seconds a cached embedding lives", min=1, max=31_536_000
    )
