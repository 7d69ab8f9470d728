"""Index artifacts: build, open with checks, search safely under concurrency, measure recall."""

import concurrent.futures
import shutil

import numpy as np
import pytest

from services.retriever import index as index_module
from services.retriever.index import (
    INDEX_FILE,
    PASSAGES_FILE,
    IndexArtifactError,
    LoadedIndex,
    default_nlist,
    default_nprobe,
    measure_recall,
)
from services.retriever.tests.conftest import artifact, clustered


def test_default_nlist_follows_four_sqrt_n_with_enough_training_points():
    assert default_nlist(1_000_000) == 4000
    assert default_nlist(2000) == 51  # 4*sqrt(2000)=179 lists would have <39 points each
    assert default_nlist(10) == 1


def test_default_nprobe_grows_with_nlist_within_bounds():
    assert [default_nprobe(n) for n in (8, 1265, 4000, 16384)] == [8, 16, 31, 128]


def test_ivf_artifact_round_trip(scratch_registry, embedding_model):
    version, vectors = artifact(scratch_registry, embedding_model)
    assert len(version.version) == 12 and version.digest.startswith("sha256:" + version.version)
    assert scratch_registry.latest("test-index") is None  # built, not live
    loaded = LoadedIndex(version, max_nprobe=32)
    assert (loaded.kind, loaded.count, loaded.dimension, loaded.nlist) == ("ivf", 2000, 32, 51)
    assert (loaded.default_nprobe, loaded.max_nprobe) == (8, 32)
    assert loaded.memory_bytes >= 2000 * 32 * 4
    scores, ids = loaded.search(vectors[:5], k=3, nprobe=4)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4] and np.allclose(scores[:, 0], 1, atol=1e-5)
    (hit, *_) = loaded.hits(scores[2], ids[2])
    assert (hit.passage.doc_id, hit.passage.title, hit.passage.metadata) == (
        "doc-2",
        "title 2",
        {"topic": "hardship"},
    )


def test_the_same_content_gives_the_same_version(scratch_registry, embedding_model):
    first, _ = artifact(scratch_registry, embedding_model, kind="flat")
    again, _ = artifact(scratch_registry, embedding_model, kind="flat")
    assert first.version == again.version and len(scratch_registry.versions("test-index")) == 1


def test_another_default_nprobe_is_another_version(scratch_registry, embedding_model):
    first, _ = artifact(scratch_registry, embedding_model, nprobe=4)
    second, _ = artifact(scratch_registry, embedding_model, nprobe=8)
    assert first.version != second.version
    assert [LoadedIndex(v, max_nprobe=64).default_nprobe for v in (first, second)] == [4, 8]


def test_metadata_filter_returns_only_matching_passages(scratch_registry, embedding_model):
    version, vectors = artifact(scratch_registry, embedding_model, kind="flat")
    loaded = LoadedIndex(version, max_nprobe=8)
    bitmap = loaded.selector({"topic": "fees"})
    scores, ids = loaded.search(vectors[1:2], k=10, nprobe=0, bitmap=bitmap)
    assert all(hit.passage.metadata["topic"] == "fees" for hit in loaded.hits(scores[0], ids[0]))
    assert 1 not in ids[0]  # the query's own passage is "credit"
    none = loaded.selector({"topic": "no-such-topic"})
    assert (loaded.search(vectors[:1], k=3, nprobe=0, bitmap=none)[1] == -1).all()
    with pytest.raises(KeyError):
        loaded.selector({"colour": "red"})


def test_per_call_nprobe_never_mutates_the_shared_index(scratch_registry, embedding_model):
    version, _ = artifact(scratch_registry, embedding_model)
    loaded = LoadedIndex(version, max_nprobe=51)
    queries = clustered(64, seed=7)
    expected = {nprobe: loaded.search(queries, k=5, nprobe=nprobe)[1] for nprobe in (1, 51)}
    assert not np.array_equal(expected[1], expected[51])  # the setting matters for these queries
    nprobe_before = loaded.index.nprobe
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        jobs = [(n, pool.submit(loaded.search, queries, k=5, nprobe=n)) for n in (1, 51) * 50]
        for nprobe, job in jobs:
            assert np.array_equal(job.result()[1], expected[nprobe])
    assert loaded.index.nprobe == nprobe_before


def test_recall_is_one_for_flat_and_low_for_a_bad_ivf(scratch_registry, embedding_model):
    queries = clustered(100, seed=3)
    flat, _ = artifact(scratch_registry, embedding_model, kind="flat")
    assert measure_recall(LoadedIndex(flat, max_nprobe=1), queries, k=5, nprobes=[0])[0].recall == 1.0
    bad, _ = artifact(scratch_registry, embedding_model, kind="ivf", nlist=500, nprobe=1)
    low, high = measure_recall(LoadedIndex(bad, max_nprobe=500), queries, k=5, nprobes=[1, 500])
    assert low.recall < 0.9 and high.recall == 1.0


def test_truncated_index_file_is_refused(scratch_registry, embedding_model):
    version, _ = artifact(scratch_registry, embedding_model)
    index_file = version.path / INDEX_FILE
    index_file.write_bytes(index_file.read_bytes()[:-100])
    with pytest.raises(IndexArtifactError, match=r"index.faiss is \d+ bytes, expected \d+"):
        LoadedIndex(version, max_nprobe=8)


def test_index_swapped_for_another_of_the_same_size_fails_the_probe(
    scratch_registry, embedding_model, monkeypatch
):
    monkeypatch.setattr(index_module, "HASHED_FILE_BYTES", 0)  # as for a file too large to hash
    version, _ = artifact(scratch_registry, embedding_model, kind="flat")
    other, _ = artifact(scratch_registry, embedding_model, kind="flat", seed=1)
    shutil.copyfile(other.path / INDEX_FILE, version.path / INDEX_FILE)  # same size, other vectors
    with pytest.raises(IndexArtifactError, match="probe query for vector"):
        LoadedIndex(version, max_nprobe=8)


@pytest.mark.parametrize("hashed", [True, False])
def test_garbage_index_file_is_refused(scratch_registry, embedding_model, monkeypatch, hashed):
    if not hashed:
        monkeypatch.setattr(index_module, "HASHED_FILE_BYTES", 0)
    version, _ = artifact(scratch_registry, embedding_model, kind="flat")
    index_file = version.path / INDEX_FILE
    index_file.write_bytes(b"\0" * index_file.stat().st_size)
    message = r"index\.faiss does not match its sha256" if hashed else r"unreadable index\.faiss"
    with pytest.raises(IndexArtifactError, match=message):
        LoadedIndex(version, max_nprobe=8)


def test_passages_file_of_the_wrong_size_is_refused(scratch_registry, embedding_model):
    version, _ = artifact(scratch_registry, embedding_model, kind="flat")
    with open(version.path / PASSAGES_FILE, "ab") as handle:
        handle.write(b"{}\n")
    with pytest.raises(IndexArtifactError, match=r"passages\.jsonl is"):
        LoadedIndex(version, max_nprobe=8)
