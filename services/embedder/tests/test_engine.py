"""The ONNX engine against sentence-transformers itself, on the same texts."""

import numpy as np
import pytest

from tiermesh.kit.minilm import OnnxEngine, token_budget_groups

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


def test_groups_are_sorted_by_length_and_stay_within_the_budget():
    lengths = [30, 5, 6, 200, 5, 29, 7]
    groups = token_budget_groups(lengths, budget=64)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        padded = len(group) * max(lengths[i] for i in group)
        assert padded <= 64 or len(group) == 1
    assert groups[0] == [1, 4, 2, 6]  # the shortest texts share a call
    assert [3] in groups  # longer than the budget: alone


def test_budget_of_one_runs_every_text_alone():
    assert token_budget_groups([3, 1, 2], budget=1) == [[1], [2], [0]]


def test_results_do_not_depend_on_how_texts_are_grouped(embedding_model):
    alone = OnnxEngine(embedding_model, threads=2, token_budget=1)
    together = OnnxEngine(embedding_model, threads=2, token_budget=100_000)
    a = np.stack([e.vector for e in alone.embed(TEXTS)])
    b = np.stack([e.vector for e in together.embed(TEXTS)])
    assert (a * b).sum(axis=1).min() >= 0.99999
