"""Embedding engines: the model only, no gRPC. ONNX Runtime on CPU; PyTorch when CUDA is present.

Both take a published registry version (see `export.py`), produce L2-normalised vectors equal to
sentence-transformers' `encode(..., normalize_embeddings=True)`, and report per text how many
tokens the model saw and whether the text was cut at the model's window. The CPU engine is the
kit's MiniLM encoder (`tiermesh.kit.minilm`), which the classifiers and retriever run too; the
GPU engine is the embedder's own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from tiermesh.kit.minilm import TORCH_DIR, Embedded, OnnxEngine, Tokenizing
from tiermesh.kit.registry import ModelVersion


class EmbeddingEngine(Protocol):
    """The seam between the servicer and a model implementation."""

    model: ModelVersion
    dimension: int
    device: str

    def embed(self, texts: Sequence[str]) -> list[Embedded]:
        """Embed texts (blocking; the caller runs it off the event loop)."""
        ...

    def close(self) -> None:
        """Release the model."""
        ...


class TorchCudaEngine(Tokenizing):
    """The same model in PyTorch on a CUDA GPU, in half precision (a GPU wants big batches)."""

    device = "cuda"

    def __init__(self, model: ModelVersion) -> None:
        from sentence_transformers import SentenceTransformer

        super().__init__(model)
        self.st = SentenceTransformer(
            str(model.path / TORCH_DIR), device="cuda", local_files_only=True
        ).half()

    def embed(self, texts: Sequence[str]) -> list[Embedded]:
        encodings = self.encode(texts)
        vectors = self.st.encode(
            list(texts), batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True
        ).astype(np.float32)
        return [
            Embedded(vector, len(e.ids), bool(e.overflowing))
            for vector, e in zip(vectors, encodings, strict=True)
        ]

    def close(self) -> None:
        import torch

        del self.st
        torch.cuda.empty_cache()


def cuda_available() -> bool:
    # Importing torch costs seconds; skip it on hosts with no NVIDIA driver at all.
    if not os.path.exists("/proc/driver/nvidia/version"):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def load_engine(
    model: ModelVersion,
    *,
    device: str = "auto",
    threads: int = 0,
    token_budget: int = 64,
    spin_wait: str = "bulk",
) -> EmbeddingEngine:
    """The engine for `device`: `auto` picks CUDA when a GPU is visible, else ONNX on CPU."""
    if device == "cuda" or (device == "auto" and cuda_available()):
        return TorchCudaEngine(model)
    return OnnxEngine(model, threads=threads, token_budget=token_budget, spin_wait=spin_wait)
