import asyncio
import threading

import pytest

from tiermesh.kit.batching import MicroBatcher


class Recorder:
    """A model stand-in that records the batches it was called with."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list[int]) -> list[int]:
        self.gate.wait()
        self.batches.append(list(items))
        if self.fail:
            raise ValueError("model exploded")
        return [item * 10 for item in items]


async def test_concurrent_callers_share_batches_and_get_their_own_results():
    model = Recorder()
    batcher = MicroBatcher(model, max_batch=8, max_wait_s=0.05, label="test")
    batcher.start()
    results = await asyncio.gather(*(batcher.submit([i]) for i in range(6)))
    await batcher.close()
    assert results == [[i * 10] for i in range(6)]
    assert model.batches == [[0, 1, 2, 3, 4, 5]]


async def test_batches_never_exceed_max_batch_and_keep_order():
    model = Recorder()
    batcher = MicroBatcher(model, max_batch=4, max_wait_s=0.01, label="test")
    batcher.start()
    assert await batcher.submit(list(range(10))) == [i * 10 for i in range(10)]
    await batcher.close()
    assert [len(b) for b in model.batches] == [4, 4, 2]
    assert [item for batch in model.batches for item in batch] == list(range(10))


async def test_next_batch_fills_while_one_runs():
    model = Recorder()
    model.gate.clear()  # hold the first batch inside the model
    batcher = MicroBatcher(model, max_batch=16, max_wait_s=0.0, label="test")
    batcher.start()
    first = asyncio.create_task(batcher.submit([1]))
    await asyncio.sleep(0.05)
    rest = [asyncio.create_task(batcher.submit([n])) for n in (2, 3, 4)]
    await asyncio.sleep(0.05)
    model.gate.set()
    await asyncio.gather(first, *rest)
    await batcher.close()
    assert model.batches == [[1], [2, 3, 4]]


async def test_cancelled_callers_items_are_skipped():
    model = Recorder()
    model.gate.clear()
    batcher = MicroBatcher(model, max_batch=16, max_wait_s=0.0, label="test")
    batcher.start()
    blocker = asyncio.create_task(batcher.submit([0]))
    await asyncio.sleep(0.05)
    doomed = asyncio.create_task(batcher.submit([1, 2]))
    kept = asyncio.create_task(batcher.submit([3]))
    await asyncio.sleep(0.01)
    doomed.cancel()
    model.gate.set()
    assert await kept == [30]
    await blocker
    await batcher.close()
    assert model.batches == [[0], [3]]


async def test_a_failing_batch_fails_its_callers_and_the_batcher_keeps_working():
    model = Recorder(fail=True)
    batcher = MicroBatcher(model, max_batch=4, max_wait_s=0.0, label="test")
    batcher.start()
    with pytest.raises(ValueError, match="model exploded"):
        await batcher.submit([1, 2])
    model.fail = False
    assert await batcher.submit([5]) == [50]
    await batcher.close()


async def test_submit_before_start_is_an_error():
    with pytest.raises(RuntimeError, match="start"):
        await MicroBatcher(Recorder(), max_batch=1, max_wait_s=0, label="test").submit([1])
