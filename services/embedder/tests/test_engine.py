"""The ONNX engine against sentence-transformers itself, on the same texts."""

import numpy as np
import pytest

from services.embedder.engine import OnnxEngine

TEXTS = [
    "Can I afford a $25,000 car loan on $4,000 a month?",
    "What is APR?",
    "x",
    "Refinanzierung: lohnt sich das bei 4,5 % Zinsen?",
    "How do I dispute a late fee on my personal loan statement from March 3rd?",
    "debt consolidation " * 300,  # past the 256-token window
]


@pytest.fixture(scope="module")
def engine(embedding_model):
    engine = OnnxEngine(embedding_model, threads=2)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(embedding_model):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedding_model.path / "sentence-transformers"), device="cpu")


def test_matches_sentence_transformers(engine, reference):
    expected = reference.encode(TEXTS, normalize_embeddings=True)
    got = np.stack([e.vector for e in engine.embed(TEXTS)])
    assert got.shape == (len(TEXTS), 384)
    cosine = (got * expected).sum(axis=1)
    assert cosine.min() >= 0.999, cosine


def test_vectors_are_unit_length(engine):
    norms = np.linalg.norm(np.stack([e.vector for e in engine.embed(TEXTS)]), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_a_text_embeds_the_same_alone_and_in_a_padded_batch(engine):
    alone = engine.embed([TEXTS[1]])[0].vector
    batched = engine.embed(TEXTS)[1].vector
    assert float(alone @ batched) >= 0.99999


def test_reports_tokens_and_truncation(engine):
    results = engine.embed(TEXTS)
    assert results[1].token_count == 6 and not results[1].truncated  # [CLS] what is apr ? [SEP]
    assert results[-1].token_count == 256 and results[-1].truncated
