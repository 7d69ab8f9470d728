"""The response cache against a real valkey-server: keys, the version book, announcements."""

import asyncio
import json
import uuid

import grpc
import pytest
import redis.asyncio as aioredis

from services.gateway.cache import ResponseCache, VersionBook, normalise
from services.gateway.flow import resolve
from services.gateway.tests.test_flow import ScriptedTiers, advisor, answer, failure
from tiermesh.gateway.v1 import gateway_pb2 as g
from tiermesh.kit.hotswap import channel

QUESTION = "Can I afford a $25,000 car loan on $4,000 a month?"


@pytest.fixture
async def cache(store_url):
    client = aioredis.Redis.from_url(store_url)
    cache = ResponseCache(client, ttl_s=60, prefix=f"test:{uuid.uuid4().hex}:")
    await cache.start()
    yield cache
    await cache.stop()
    await client.aclose()


def test_normalising_ignores_case_spacing_and_trailing_punctuation():
    assert (
        normalise("  Can I   afford A loan?? ") == normalise("can i afford a loan") == "can i afford a loan"
    )
    assert normalise("Can I afford a loan") != normalise("Can I afford a lease")


def test_announced_versions_win_over_the_versions_seen_in_answers():
    book = VersionBook()
    assert book.current() == {}  # nothing to key on before the first answer
    advice = g.Advice()
    advice.versions.add(model={"name": "loan-kb", "version": "1"})
    book.announced("smollm2", "9")  # a model the flow never used does not join the key
    book.saw(advice)
    assert book.current() == {"loan-kb": "1"}
    book.announced("loan-kb", "2")
    book.saw(advice)  # a late answer from the old version does not undo the announcement
    assert book.current() == {"loan-kb": "2"}


async def test_a_repeated_question_is_answered_from_the_cache_without_calling_any_tier(cache):
    tiers = ScriptedTiers()
    flow = advisor(tiers)
    flow.cache = cache
    first = await answer(flow, resolve(flow.config, QUESTION, seed=1), flow.deadline(None))
    other_options = await answer(flow, resolve(flow.config, QUESTION, seed=2), flow.deadline(None))
    assert not first.cached and not other_options.cached
    calls = len(tiers.calls)
    repeat = await answer(flow, resolve(flow.config, "  " + QUESTION.upper(), seed=1), flow.deadline(None))
    assert repeat.cached and len(tiers.calls) == calls  # no tier was called
    assert repeat.text == first.text and repeat.response_id != first.response_id
    assert [v.model.version for v in repeat.versions] == [v.model.version for v in first.versions]
    assert repeat.usage.completion_tokens == 0  # nothing was generated for it


async def test_a_new_version_announced_for_any_model_used_is_never_served_an_old_answer(cache, store_url):
    tiers = ScriptedTiers()
    flow = advisor(tiers)
    flow.cache = cache
    question = resolve(flow.config, QUESTION)
    await answer(flow, question, flow.deadline(None))
    assert (await answer(flow, question, flow.deadline(None))).cached

    publisher = aioredis.Redis.from_url(store_url)
    await publisher.publish(
        channel("loan-kb"), json.dumps({"name": "loan-kb", "version": "2.0.0", "digest": "x"})
    )
    await publisher.aclose()
    for _ in range(100):
        if cache.book.current().get("loan-kb") == "2.0.0":
            break
        await asyncio.sleep(0.02)
    assert not (await answer(flow, question, flow.deadline(None))).cached  # the index moved on


async def test_degraded_answers_are_not_cached(cache):
    tiers = ScriptedTiers(ScoreText=failure(grpc.StatusCode.UNAVAILABLE))
    flow = advisor(tiers)
    flow.cache = cache
    question = resolve(flow.config, QUESTION)
    first = await answer(flow, question, flow.deadline(None))
    assert list(first.degraded_modes) == [g.DEGRADED_MODE_BIAS_UNCHECKED]
    assert not (await answer(flow, question, flow.deadline(None))).cached
