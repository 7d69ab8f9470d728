import json
import os

import pytest

from tiermesh.kit.registry import Registry, RegistryError


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "models")


def _artifacts(folder, content: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights.bin").write_text(content)
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "vocab.txt").write_text("a b c")
    return folder


def test_publish_writes_metadata_and_moves_latest(registry, tmp_path):
    first = registry.publish(
        "demo", _artifacts(tmp_path / "a", "one"), origin={"package": "p"}, metrics={"acc": 0.9}
    )
    assert first.version == "1.0.0"
    assert registry.latest("demo").version == "1.0.0"
    metadata = json.loads((first.path / "metadata.json").read_text())
    assert metadata["sha256"].startswith("sha256:") and set(metadata["files"]) == {
        "weights.bin",
        "sub/vocab.txt",
    }
    assert metadata["metrics"] == {"acc": 0.9} and metadata["previous_version"] is None

    second = registry.publish("demo", _artifacts(tmp_path / "b", "two"), changelog="retrained")
    assert second.version == "1.0.1" and second.metadata["previous_version"] == "1.0.0"
    assert registry.latest("demo").version == "1.0.1"
    assert second.digest != first.digest
    assert [v.version for v in registry.versions("demo")] == ["1.0.0", "1.0.1"]


def test_same_content_publishes_nothing(registry, tmp_path):
    first = registry.publish("demo", _artifacts(tmp_path / "a", "one"))
    again = registry.publish("demo", _artifacts(tmp_path / "b", "one"))
    assert again.version == first.version
    assert len(registry.versions("demo")) == 1


def test_versions_are_immutable(registry, tmp_path):
    registry.publish("demo", _artifacts(tmp_path / "a", "one"), version="2.0.0")
    with pytest.raises(RegistryError, match="already published"):
        registry.publish("demo", _artifacts(tmp_path / "b", "two"), version="2.0.0")


def test_rollback_moves_latest_back(registry, tmp_path):
    registry.publish("demo", _artifacts(tmp_path / "a", "one"))
    registry.publish("demo", _artifacts(tmp_path / "b", "two"))
    registry.set_latest("demo", "1.0.0")
    assert registry.get("demo").version == "1.0.0"
    assert os.readlink(registry.root / "demo" / "latest") == "1.0.0"


def test_failed_publish_leaves_nothing_visible(registry, tmp_path, monkeypatch):
    registry.publish("demo", _artifacts(tmp_path / "a", "one"))

    def broken_fsync(_folder):
        raise OSError("disk full")

    monkeypatch.setattr("tiermesh.kit.registry._fsync_tree", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        registry.publish("demo", _artifacts(tmp_path / "b", "two"))
    assert [v.version for v in registry.versions("demo")] == ["1.0.0"]
    assert registry.latest("demo").version == "1.0.0"
    assert sorted(p.name for p in (registry.root / "demo").iterdir()) == ["1.0.0", "history.json", "latest"]


def test_unknown_model_and_version_are_clear_errors(registry, tmp_path):
    with pytest.raises(RegistryError, match="no published version"):
        registry.get("missing")
    registry.publish("demo", _artifacts(tmp_path / "a", "one"))
    with pytest.raises(RegistryError, match=r"no version '9.9.9' \(published: 1.0.0\)"):
        registry.get("demo", "9.9.9")


@pytest.mark.parametrize(("name", "version"), [("Bad Name", None), ("demo", "v1")])
def test_rejects_bad_names_and_versions(registry, tmp_path, name, version):
    with pytest.raises(RegistryError):
        registry.publish(name, _artifacts(tmp_path / "a", "one"), version=version)


def test_content_named_versions_are_named_by_digest_and_deduplicated(registry, tmp_path):
    first = registry.publish("idx", _artifacts(tmp_path / "a", "one"), content_named=True, make_latest=False)
    assert first.version == first.digest.removeprefix("sha256:")[:12]
    assert registry.latest("idx") is None
    again = registry.publish("idx", _artifacts(tmp_path / "b", "one"), content_named=True)
    assert again.version == first.version and len(registry.versions("idx")) == 1
    other = registry.publish("idx", _artifacts(tmp_path / "c", "two"), content_named=True)
    assert [v.version for v in registry.versions("idx")] == [first.version, other.version]


def test_rollback_walks_back_through_published_versions(registry, tmp_path):
    versions = [
        registry.publish("idx", _artifacts(tmp_path / str(i), str(i)), content_named=True, make_latest=False)
        for i in range(3)
    ]
    a, b, c = (v.version for v in versions)
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback("idx")
    for version in (a, b, c):
        registry.set_latest("idx", version)
    assert registry.history("idx") == [a, b, c]
    assert registry.rollback("idx").version == b and registry.latest("idx").version == b
    assert registry.rollback("idx").version == a  # not back to c
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback("idx")
    assert registry.latest("idx").version == a
