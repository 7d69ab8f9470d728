"""Embedding engines: the model only, no gRPC. ONNX Runtime on CPU; PyTorch when CUDA is present.

Both take a published registry version (see `export.py`), produce L2-normalised vectors equal to
sentence-transformers' `encode(..., normalize_embeddings=True)`, and report per text how many
tokens the model saw and whether the text was cut at the model's window.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer

from tiermesh.registry import ModelVersion

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
TORCH_DIR = "sentence-transformers"


@dataclasses.dataclass(frozen=True)
class Embedded:
    """One text's embedding and what the model saw of it."""

    vector: np.ndarray
    token_count: int
    truncated: bool


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


class _Tokenizing:
    """Tokenization shared by both engines, identical to sentence-transformers' settings."""

    def __init__(self, model: ModelVersion) -> None:
        self.model = model
        self.dimension = int(model.metadata["parameters"]["dimension"])
        self.max_tokens = int(model.metadata["parameters"]["max_seq_length"])
        self.tokenizer = Tokenizer.from_file(str(model.artifact(TOKENIZER_FILE)))
        self.tokenizer.enable_truncation(max_length=self.max_tokens)
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token="[PAD]")

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[int], list[bool]]:
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        counts = [int(row.sum()) for row in mask]
        truncated = [bool(e.overflowing) for e in encodings]
        return ids, mask, counts, truncated


class OnnxEngine(_Tokenizing):
    """MiniLM exported to ONNX with mean pooling and normalisation inside the graph."""

    device = "cpu"

    def __init__(self, model: ModelVersion, *, threads: int = 0) -> None:
        import onnxruntime as ort

        super().__init__(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(model.artifact(ONNX_FILE)), options, providers=["CPUExecutionProvider"]
        )

    def embed(self, texts: Sequence[str]) -> list[Embedded]:
        ids, mask, counts, truncated = self.tokenize(texts)
        (vectors,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask})
        return [
            Embedded(v, c, t) for v, c, t in zip(vectors.astype(np.float32), counts, truncated, strict=True)
        ]

    def close(self) -> None:
        del self.session


class TorchCudaEngine(_Tokenizing):
    """The same model in PyTorch on a CUDA GPU, in half precision."""

    device = "cuda"

    def __init__(self, model: ModelVersion) -> None:
        from sentence_transformers import SentenceTransformer

        super().__init__(model)
        self.st = SentenceTransformer(
            str(model.path / TORCH_DIR), device="cuda", local_files_only=True
        ).half()

    def embed(self, texts: Sequence[str]) -> list[Embedded]:
        _, _, counts, truncated = self.tokenize(texts)
        vectors = self.st.encode(
            list(texts), batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True
        ).astype(np.float32)
        return [Embedded(v, c, t) for v, c, t in zip(vectors, counts, truncated, strict=True)]

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


def load_engine(model: ModelVersion, *, device: str = "auto", threads: int = 0) -> EmbeddingEngine:
    """The engine for `device`: `auto` picks CUDA when a GPU is visible, else ONNX on CPU."""
    if device == "cuda" or (device == "auto" and cuda_available()):
        return TorchCudaEngine(model)
    return OnnxEngine(model, threads=threads)
