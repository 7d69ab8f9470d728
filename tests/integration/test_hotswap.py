"""The kit's Follower against a real valkey-server: announcements, failures, missed messages."""

import asyncio

import pytest

from tiermesh.kit import hotswap
from tiermesh.kit.registry import ModelVersion, Registry

pytestmark = pytest.mark.integration


class FakeTier:
    """Records loads; refuses versions listed in `broken`."""

    def __init__(self) -> None:
        self.version: str | None = None
        self.loads: list[str] = []
        self.broken: set[str] = set()

    async def load(self, version: ModelVersion) -> None:
        self.loads.append(version.version)
        if version.version in self.broken:
            raise ValueError(f"{version.version} is corrupt")
        self.version = version.version


def publish(registry: Registry, tmp_path, content: str) -> ModelVersion:
    folder = tmp_path / content
    folder.mkdir()
    (folder / "data.bin").write_text(content)
    return registry.publish("thing", folder, content_named=True)


async def until(condition, timeout=5.0):
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_announcement_swaps_and_failed_load_keeps_serving(tmp_path, store_url):
    registry = Registry(tmp_path / "models")
    first = publish(registry, tmp_path, "one")
    tier = FakeTier()
    follower = hotswap.Follower(
        tier="t", name="thing", registry=registry, store_url=store_url,
        serving=lambda: tier.version, load=tier.load, check_interval_s=3600,
    )  # fmt: skip
    follower.start()
    try:
        await until(lambda: tier.version == first.version)  # converges on start
        await asyncio.wait_for(follower.subscribed.wait(), 5)
        second = publish(registry, tmp_path, "two")
        assert hotswap.announce(store_url, second) == 1
        await until(lambda: tier.version == second.version)

        third = publish(registry, tmp_path, "three")
        tier.broken.add(third.version)
        hotswap.announce(store_url, third)
        await until(lambda: third.version in tier.loads)
        assert tier.version == second.version  # the old version keeps serving
        hotswap.announce(store_url, third)  # the same broken version is not retried at once
        await asyncio.sleep(0.2)
        assert tier.loads.count(third.version) == 1

        registry.set_latest("thing", second.version)  # rollback: nothing to do, already serving
        hotswap.announce(store_url, second)
        await asyncio.sleep(0.1)
        assert tier.version == second.version and tier.loads.count(second.version) == 1
    finally:
        await follower.stop()


async def test_periodic_check_converges_without_a_store(tmp_path):
    registry = Registry(tmp_path / "models")
    first = publish(registry, tmp_path, "one")
    tier = FakeTier()
    tier.version = first.version
    follower = hotswap.Follower(
        tier="t", name="thing", registry=registry, store_url="redis://127.0.0.1:1/0",
        serving=lambda: tier.version, load=tier.load, check_interval_s=0.05,
    )  # fmt: skip
    follower.start()  # the store is unreachable: logged, retried, and checks go on
    try:
        second = publish(registry, tmp_path, "two")  # a missed announcement
        await until(lambda: tier.version == second.version)
        assert not follower.subscribed.is_set()
    finally:
        await follower.stop()
