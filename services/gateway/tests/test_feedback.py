"""Answers remembered for feedback, and feedback appended with them, on a real valkey-server."""

import uuid

import pytest
import redis.asyncio as aioredis

from services.gateway.feedback import FEEDBACK_STREAM, FeedbackStore, UnknownResponse
from services.gateway.flow import resolve
from services.gateway.tests.test_flow import ScriptedTiers, advisor, answer
from tiermesh.kit.errors import InvalidArgument


@pytest.fixture
async def answered(store_url):
    client = aioredis.Redis.from_url(store_url)
    store = FeedbackStore(client, ttl_s=3600)
    flow = advisor(ScriptedTiers())
    flow.records = store
    advice = await answer(flow, resolve(flow.config, "Is 6% APR good?", user_id="u-7"), flow.deadline(None))
    yield store, advice
    await client.aclose()


async def test_feedback_is_appended_with_the_versions_and_arms_that_produced_the_answer(answered):
    store, advice = answered
    ident = await store.add(advice.response_id, rating=1.0, outcome="applied", comment="clear", key_id="k_1")
    entries = await store.client.xrange(FEEDBACK_STREAM, ident, ident)
    entry = {k.decode(): v.decode() for k, v in entries[0][1].items()}
    assert entry["response_id"] == advice.response_id and entry["user_id"] == "u-7"
    assert (entry["rating"], entry["outcome"], entry["key_id"]) == ("1.0", "applied", "k_1")
    assert '"model": "smollm2"' in entry["versions"] and '"arm": "control"' in entry["versions"]
    assert entry["bias"] == "checked"
    assert 0 < await store.client.ttl("tiermesh:responses:" + advice.response_id) <= 3600


async def test_feedback_without_a_rating_or_outcome_is_refused_before_the_store():
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0")  # never reached: validation comes first
    store = FeedbackStore(client, ttl_s=60)
    with pytest.raises(InvalidArgument, match=r"^rating: give a rating, an outcome, or both"):
        await store.add("resp_x", rating=None, outcome="", comment="", key_id="")


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"rating": 5.0}, "rating"),
        ({"rating": float("nan")}, "rating"),
        ({"rating": None, "outcome": "won-the-lottery"}, "outcome"),
        ({"rating": 1.0, "comment": "x" * 2001}, "comment"),
    ],
)
async def test_bad_feedback_names_the_field(answered, values, field):
    store, advice = answered
    values = {"rating": None, "outcome": "", "comment": "", **values}
    with pytest.raises(InvalidArgument) as raised:
        await store.add(advice.response_id, key_id="", **values)
    assert raised.value.field == field


async def test_an_unknown_response_id_is_its_own_error(answered):
    store, _ = answered
    with pytest.raises(UnknownResponse):
        await store.add("resp_" + uuid.uuid4().hex, rating=0.5, outcome="", comment="", key_id="")
