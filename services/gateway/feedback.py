"""Answers remembered for feedback, and the feedback itself, for experiment analysis.

Each answer leaves a small record (`tiermesh:responses:<id>`, kept `FEEDBACK_TTL_S`): the user,
the versions and A/B arms that produced it, the intent and the bias status. Feedback on an answer
(a rating, an outcome, a comment) is appended to the `tiermesh:feedback` stream together with that
record, so an experiment read-out needs nothing but the stream.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time

import redis.asyncio as aioredis

from services.gateway.durability import execute_durably, wait_for_disk
from services.gateway.flow import Question, check_unicode
from tiermesh.gateway.v1 import gateway_pb2
from tiermesh.kit.errors import InvalidArgument

logger = logging.getLogger(__name__)

RECORD_PREFIX = "tiermesh:responses:"
FEEDBACK_STREAM = "tiermesh:feedback"
RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")
OUTCOMES = ("accepted", "rejected", "applied", "approved", "declined", "defaulted", "repaid", "other")


class UnknownResponse(LookupError):
    """Feedback named a response id the gateway does not know (never issued, or expired)."""


def _record(question: Question, advice: gateway_pb2.Advice) -> dict[str, str]:
    return {
        "user_id": question.user_id,
        "created": f"{time.time():.3f}",
        "trace_id": advice.trace_id,
        "intent": advice.intent.label,
        "out_of_scope": str(int(advice.out_of_scope)),
        "cached": str(int(advice.cached)),
        "bias": gateway_pb2.BiasCheckStatus.Name(advice.bias.status)
        .removeprefix("BIAS_CHECK_STATUS_")
        .lower(),
        "bias_flagged": str(int(advice.bias.verdict.flagged)),
        "versions": json.dumps(
            [
                {
                    "tier": gateway_pb2.Tier.Name(used.tier).removeprefix("TIER_").lower(),
                    "model": used.model.name,
                    "version": used.model.version,
                    "arm": gateway_pb2.Arm.Name(used.arm).removeprefix("ARM_").lower(),
                }
                for used in advice.versions
            ]
        ),
    }


class FeedbackStore:
    def __init__(self, client: aioredis.Redis, *, ttl_s: float, max_records: int = 1_000_000) -> None:
        self.client = client
        self.ttl_s = int(ttl_s)
        self.max_records = max_records

    async def remember(self, question: Question, advice: gateway_pb2.Advice) -> None:
        """Keep the answer's record; a store that is down costs the feedback, not the answer."""
        name = RECORD_PREFIX + advice.response_id
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(name, mapping=_record(question, advice))
                pipe.expire(name, self.ttl_s)
                await pipe.execute()
        except (OSError, aioredis.RedisError) as error:
            logger.warning("response %s not recorded for feedback: %s", advice.response_id, error)

    async def add(
        self,
        response_id: str,
        *,
        rating: float | None,
        outcome: str,
        comment: str,
        key_id: str,
    ) -> str:
        """Append feedback on `response_id`; returns the feedback's id in the stream."""
        if rating is None and not outcome:
            raise InvalidArgument("rating", "give a rating, an outcome, or both")
        if rating is not None and not (math.isfinite(rating) and -1.0 <= rating <= 1.0):
            raise InvalidArgument("rating", f"must be from -1 (bad) to 1 (good), got {rating}")
        if outcome and outcome not in OUTCOMES:
            raise InvalidArgument("outcome", f"must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
        if len(comment) > 2000:
            raise InvalidArgument("comment", f"is {len(comment)} characters; the limit is 2000")
        check_unicode(comment, "comment")
        if not RESPONSE_ID.fullmatch(response_id):
            raise UnknownResponse(response_id)
        record = await self.client.hgetall(RECORD_PREFIX + response_id)
        if not record:
            raise UnknownResponse(response_id)
        entry = {
            **{k.decode(): v.decode() for k, v in record.items()},
            "response_id": response_id,
            "rating": "" if rating is None else repr(float(rating)),
            "outcome": outcome,
            "comment": comment,
            "key_id": key_id,
            "at": f"{time.time():.3f}",
        }
        async with self.client.pipeline(transaction=False) as pipe:
            # retention: the stream keeps about the newest `max_records` entries
            pipe.xadd(FEEDBACK_STREAM, entry, maxlen=self.max_records, approximate=True)
            wait_for_disk(pipe)
            (entry_id,) = await execute_durably(pipe, "feedback")
        return entry_id.decode()
