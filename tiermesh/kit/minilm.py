"""The MiniLM sentence encoder (all-MiniLM-L6-v2): the one model three tiers run in-process.

The embedder serves it; the classifiers compute the intent head's features with it; the retriever
embeds corpora with it when it builds an index. It lives in the kit rather than in the embedder
because those two tiers need the same vectors *inside their own process* — an intent
prediction would otherwise add a network hop to every question, and an index build would send
a million passages through the mesh — while tiers never import each other. The embedder tier adds
the GPU engine and serving; everything here runs on the CPU with ONNX Runtime.

`served_model` names the version all three use (`EMBEDDER_MODEL`, `EMBEDDER_MODEL_VERSION`), so the
vectors of an index, of the intent head's training data and of a live query always agree.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer

from tiermesh.kit.registry import ModelVersion, Registry

MODEL_NAME = "all-minilm-l6-v2"
ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
TORCH_DIR = "sentence-transformers"


@dataclasses.dataclass(frozen=True)
class Embedded:
    """One text's embedding and what the model saw of it."""

    vector: np.ndarray
    token_count: int
    truncated: bool


def token_budget_groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of texts grouped for the model: sorted by length, each group's padded size
    (members x longest) within `budget` tokens; a text longer than the budget runs alone.

    On CPU, padding is the dominant waste for mixed-length text: measured with MiniLM on 2
    cores, one padded batch of 64 mixed questions ran at ~150 texts/s, one text at a time at
    ~250/s, while very short texts gain ~2x from batching; a 64-token budget got both.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    for index in order:
        if groups and (len(groups[-1]) + 1) * lengths[index] <= budget:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


class Tokenizing:
    """Tokenization shared by both engines, identical to sentence-transformers' settings."""

    def __init__(self, model: ModelVersion) -> None:
        self.model = model
        self.dimension = int(model.metadata["parameters"]["dimension"])
        self.max_tokens = int(model.metadata["parameters"]["max_seq_length"])
        self.tokenizer = Tokenizer.from_file(str(model.artifact(TOKENIZER_FILE)))
        self.tokenizer.enable_truncation(max_length=self.max_tokens)
        self.tokenizer.no_padding()
        self.pad_id = self.tokenizer.token_to_id("[PAD]")

    def encode(self, texts: Sequence[str]) -> list[Encoding]:
        """Token ids per text, truncated to the model's window, unpadded."""
        return self.tokenizer.encode_batch(list(texts))

    def padded(self, encodings: Sequence[Encoding]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) for a group, padded to its longest member."""
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        return ids, mask


class OnnxEngine(Tokenizing):
    """MiniLM exported to ONNX with mean pooling and normalisation inside the graph."""

    device = "cpu"

    def __init__(
        self, model: ModelVersion, *, threads: int = 0, token_budget: int = 64, spin_wait: str = "bulk"
    ) -> None:
        super().__init__(model)
        self.token_budget = token_budget
        self.threads = threads or (os.cpu_count() or 1)
        # Spinning worker threads keep the cores hot between model calls, which pays off when one
        # batch needs many calls but steals the cores Envoy and the next request need when it
        # does not. Measured through Envoy on 2 cores: always spinning, single-query p99 12.2 ms;
        # never, 6.2 ms but bulk throughput ~20% lower; "bulk" (a spinning session only for
        # batches of several calls) kept p99 at ~6 ms with the bulk throughput.
        self.session = self._session(spin=spin_wait == "on")
        self.bulk_session = self._session(spin=True) if spin_wait == "bulk" else self.session

    def _session(self, *, spin: bool) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        return ort.InferenceSession(
            str(self.model.artifact(ONNX_FILE)), options, providers=["CPUExecutionProvider"]
        )

    def embed(self, texts: Sequence[str]) -> list[Embedded]:
        encodings = self.encode(texts)
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        groups = token_budget_groups([len(e.ids) for e in encodings], self.token_budget)
        session = self.bulk_session if len(groups) > 1 else self.session
        for group in groups:
            ids, mask = self.padded([encodings[i] for i in group])
            (vectors[group],) = session.run(None, {"input_ids": ids, "attention_mask": mask})
        return [
            Embedded(vector, len(e.ids), bool(e.overflowing))
            for vector, e in zip(vectors, encodings, strict=True)
        ]

    def close(self) -> None:
        del self.session, self.bulk_session


def served_model(registry: Registry) -> ModelVersion:
    """The model version the embedder tier serves under this environment (for tiers and tools
    that must use the same vectors, such as the retriever and its index builds)."""
    model = os.environ.get("EMBEDDER_MODEL") or MODEL_NAME
    return registry.get(model, os.environ.get("EMBEDDER_MODEL_VERSION") or "latest")
