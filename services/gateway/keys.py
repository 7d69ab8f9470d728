"""API keys of the REST gateway and their per-key rate limits, kept in the Redis-compatible store so
every gateway replica sees the same keys and the same counts.

A key's secret is `tm_<key id>_<43 url-safe characters>`: the public key id travels inside it, so
verifying a presented secret is one hash read, and the store keeps only the secret's SHA-256 digest.

Store layout (default prefixes):

    tiermesh:keys:<key id>          hash: name, created_at, requests_per_minute, tokens_per_minute,
                                    sha256 (hex digest of the full secret), revoked_at (once revoked)
    tiermesh:keys:index             sorted set: key id scored by created_at (for `list`)
    tiermesh:ratelimit:<key id>:<n> hash: requests, tokens counted in fixed window n (= now // window);
                                    expires two windows after its last write

Rate limits use the sliding-window approximation over two fixed windows: the count of the last
minute is estimated as previous * (1 - elapsed fraction of the current window) + current.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping

import redis.asyncio as redis

from services.gateway.durability import execute_durably, wait_for_disk

SECRET_PREFIX = "tm_"
# Revoked key ids are announced here, so gateways forget them at once (see rest/auth.py).
REVOKED_CHANNEL = "tiermesh:keys:revoked"
KEY_ID_PATTERN = re.compile(r"k_[0-9a-f]{10}")
# token_urlsafe(32): 32 random bytes, base64url without padding, always 43 characters.
_SECRET_BYTES = 32
_SECRET_PATTERN = re.compile(r"tm_(k_[0-9a-f]{10})_[A-Za-z0-9_-]{43}")
_SECRET_LENGTH = len("tm_k_0123456789_") + 43
MAX_NAME_LENGTH = 64
REQUESTS = "requests_per_minute"
TOKENS = "tokens_per_minute"
# Added to a computed wait: at exactly that instant the weighted count equals the limit, which
# still refuses; a client that sleeps retry_after_s must find the count strictly below it.
_RETRY_MARGIN_S = 0.001

# KEYS: the key's hash, the index. ARGV: name, created_at, rpm, tpm, digest, key id.
# Refuses to overwrite an existing key id (40 random bits: collisions are rare, not impossible).
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'created_at', ARGV[2], 'requests_per_minute', ARGV[3],
           'tokens_per_minute', ARGV[4], 'sha256', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[6])
return 1
"""

# KEYS: the key's hash. ARGV: revoked_at. HSETNX keeps the first revocation time (idempotent);
# the EXISTS check stops it from creating a hash for an unknown key id.
_REVOKE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSETNX', KEYS[1], 'revoked_at', ARGV[1])
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: current window's hash, previous window's hash. ARGV: elapsed fraction of the current
# window, requests limit, tokens limit, expiry in ms. Returns {refused bits (1: requests,
# 2: tokens), previous requests, current requests (after counting this one), previous tokens,
# current tokens}; the caller derives remaining counts and the wait from these with the same
# arithmetic. Counts are returned rather than the weighted estimates because Redis truncates Lua
# numbers to integers.
_ACQUIRE = """
local weight = 1 - tonumber(ARGV[1])
local current = redis.call('HMGET', KEYS[1], 'requests', 'tokens')
local previous = redis.call('HMGET', KEYS[2], 'requests', 'tokens')
local cr, ct = tonumber(current[1]) or 0, tonumber(current[2]) or 0
local pr, pt = tonumber(previous[1]) or 0, tonumber(previous[2]) or 0
local refused = 0
if pr * weight + cr >= tonumber(ARGV[2]) then refused = refused + 1 end
if pt * weight + ct >= tonumber(ARGV[3]) then refused = refused + 2 end
if refused == 0 then
  cr = redis.call('HINCRBY', KEYS[1], 'requests', 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return {refused, pr, cr, pt, ct}
"""

# KEYS: current window's hash. ARGV: tokens, expiry in ms.
_CHARGE = """
local tokens = redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return tokens
"""


@dataclasses.dataclass(frozen=True)
class ApiKey:
    """A key's record: everything but its secret, safe to log and show."""

    key_id: str
    name: str
    created_at: float
    requests_per_minute: int
    tokens_per_minute: int
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _text(value: bytes | str) -> str:
    # The client may or may not have been made with decode_responses=True.
    return value.decode() if isinstance(value, bytes) else value


def _fields(found: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in found.items()}


def _record(key_id: str, values: Mapping[str, str]) -> ApiKey:
    revoked = values.get("revoked_at")
    return ApiKey(
        key_id=key_id,
        name=values["name"],
        created_at=float(values["created_at"]),
        requests_per_minute=int(values[REQUESTS]),
        tokens_per_minute=int(values[TOKENS]),
        revoked_at=float(revoked) if revoked else None,
    )


def _digest(secret: str) -> str:
    # Plain SHA-256, no slow KDF: the secrets are 256 random bits, not guessable passwords, so
    # there is no dictionary to slow down, and verify stays cheap on every request.
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_limit(parameter: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{parameter} must be a whole number >= 1, got {value!r}")


class KeyStore:
    """Create, list, revoke and verify API keys."""

    def __init__(self, client: redis.Redis, *, prefix: str = "tiermesh:keys:") -> None:
        self.client = client
        self.prefix = prefix
        self._index = prefix + "index"
        self._create = client.register_script(_CREATE)
        self._revoke = client.register_script(_REVOKE)

    def _key(self, key_id: str) -> str:
        return self.prefix + key_id

    async def create(
        self, name: str, *, requests_per_minute: int, tokens_per_minute: int
    ) -> tuple[str, ApiKey]:
        """A new active key: (its secret, to be shown once and never again; its record)."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError("name must not be empty")
        if len(name) > MAX_NAME_LENGTH:
            raise ValueError(f"name must be at most {MAX_NAME_LENGTH} characters, got {len(name)}")
        if not name.isprintable():
            # Names are printed in tables and logs: no newlines or control characters.
            raise ValueError("name must not contain control characters")
        _check_limit(REQUESTS, requests_per_minute)
        _check_limit(TOKENS, tokens_per_minute)
        for _ in range(5):
            key_id = f"k_{secrets.token_hex(5)}"
            secret = f"{SECRET_PREFIX}{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
            created_at = time.time()
            fields = [name, repr(created_at), requests_per_minute, tokens_per_minute, _digest(secret)]
            async with self.client.pipeline(transaction=False) as pipe:
                await self._create(keys=[self._key(key_id), self._index], args=[*fields, key_id], client=pipe)
                wait_for_disk(pipe)
                (created,) = await execute_durably(pipe, "a new API key")
            if created:
                return secret, ApiKey(key_id, name, created_at, requests_per_minute, tokens_per_minute)
        raise RuntimeError("could not find an unused key id in 5 tries")

    async def list(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        ids = [_text(member) for member in await self.client.zrange(self._index, 0, -1)]
        async with self.client.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(self._key(key_id))
            found = await pipe.execute()
        records = [
            _record(key_id, _fields(fields)) for key_id, fields in zip(ids, found, strict=True) if fields
        ]
        return sorted(records, key=lambda r: (r.created_at, r.key_id))

    async def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key (KeyError if unknown); revoking it again keeps the first revocation time."""
        # Check the form first: an arbitrary string must never address another key, e.g. the index.
        if not isinstance(key_id, str) or not KEY_ID_PATTERN.fullmatch(key_id):
            raise KeyError(key_id)
        async with self.client.pipeline(transaction=False) as pipe:
            await self._revoke(keys=[self._key(key_id)], args=[repr(time.time())], client=pipe)
            pipe.publish(REVOKED_CHANNEL, key_id)  # gateways drop it from their verified-key caches
            wait_for_disk(pipe)
            found, _ = await execute_durably(pipe, "a revocation")
        if not found:
            raise KeyError(key_id)
        return _record(key_id, _fields(dict(zip(found[::2], found[1::2], strict=True))))

    async def verify(self, presented: str) -> ApiKey | None:
        """The active key whose secret this is; None for anything else. Store errors propagate (an
        unreachable store is not an invalid key)."""
        # The length and pattern checks run before anything else touches the string, so huge,
        # non-ASCII or non-str inputs are refused without encoding or a store round trip.
        if not isinstance(presented, str) or len(presented) != _SECRET_LENGTH:
            return None
        match = _SECRET_PATTERN.fullmatch(presented)
        if match is None:
            return None
        key_id = match.group(1)
        fields = _fields(await self.client.hgetall(self._key(key_id)))
        stored = fields.get("sha256")
        if stored is None or not hmac.compare_digest(stored.encode(), _digest(presented).encode()):
            return None
        record = _record(key_id, fields)
        return record if record.active else None


@dataclasses.dataclass(frozen=True)
class Decision:
    """The outcome of `RateLimiter.acquire`."""

    allowed: bool
    limit: str  # REQUESTS or TOKENS when refused; "" when allowed
    retry_after_s: float  # > 0 when refused; 0 when allowed
    remaining_requests: int
    remaining_tokens: int


def wait_s(previous: int, current: int, limit: int, fraction: float, window_s: float) -> float:
    """Seconds from now until previous * (1 - fraction') + current drops strictly below `limit`
    with no further traffic, where fraction is how far into the current window now is.

    While the previous window still weighs, the estimate falls at previous / window_s per second;
    that alone suffices when current < limit. Otherwise the next window starts at `current` (the
    current window becoming the previous one, weight 1) and falls at current / window_s, reaching
    the limit (1 - limit / current) of a window later. For requests current <= limit, so the wait
    is at most one window; tokens can overshoot (a single long answer), so up to two windows.
    """
    estimate = previous * (1 - fraction) + current
    if estimate < limit:
        return 0.0
    if current < limit:  # previous > 0 here, since the estimate reached the limit
        wait = window_s * (estimate - limit) / previous
    else:
        wait = (1 - fraction) * window_s + window_s * (1 - limit / current)
    return wait + _RETRY_MARGIN_S


class RateLimiter:
    """Per-key request and token limits over a sliding minute, shared by every gateway replica."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "tiermesh:ratelimit:",
        window_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        self.client = client
        self.prefix = prefix
        self.window_s = window_s
        self.clock = clock
        # Two windows: a window is read while current and while previous, then never again. Relative
        # expiry (not PEXPIREAT from the clock) so an injected clock cannot expire keys at once.
        self._expiry_ms = max(1, math.ceil(2 * window_s * 1000))
        self._acquire = client.register_script(_ACQUIRE)
        self._charge = client.register_script(_CHARGE)

    def _window(self) -> tuple[int, float]:
        """(index of the current fixed window, elapsed fraction of it), from the injected clock. The
        time comes from the gateway, not Redis TIME, so tests can move it; replicas' clocks should
        agree to well under a window."""
        now = self.clock()
        index = math.floor(now / self.window_s)
        fraction = min(max((now - index * self.window_s) / self.window_s, 0.0), 1.0 - 1e-12)
        return index, fraction

    def _key(self, key_id: str, index: int) -> str:
        return f"{self.prefix}{key_id}:{index}"

    async def acquire(self, key: ApiKey) -> Decision:
        """Count this request and allow it, unless the key's requests or charged tokens over the last
        minute already reach its limits (both checked in one atomic script)."""
        index, fraction = self._window()
        refused, prev_requests, requests, prev_tokens, tokens = await self._acquire(
            keys=[self._key(key.key_id, index), self._key(key.key_id, index - 1)],
            args=[repr(fraction), key.requests_per_minute, key.tokens_per_minute, self._expiry_ms],
        )
        # The same arithmetic as the script, on the same doubles: the estimates agree with its decision.
        used_requests = prev_requests * (1 - fraction) + requests
        used_tokens = prev_tokens * (1 - fraction) + tokens
        remaining_requests = max(0, math.ceil(key.requests_per_minute - used_requests))
        remaining_tokens = max(0, math.floor(key.tokens_per_minute - used_tokens))
        if not refused:
            return Decision(True, "", 0.0, remaining_requests, remaining_tokens)
        waits: dict[str, float] = {}
        if refused & 1:
            waits[REQUESTS] = wait_s(
                prev_requests, requests, key.requests_per_minute, fraction, self.window_s
            )
        if refused & 2:
            waits[TOKENS] = wait_s(prev_tokens, tokens, key.tokens_per_minute, fraction, self.window_s)
        # Both limits must clear before a request is allowed: the longer wait decides, and names the limit.
        limit = max(waits, key=lambda name: waits[name])
        return Decision(False, limit, waits[limit], remaining_requests, remaining_tokens)

    async def charge(self, key: ApiKey, tokens: int) -> None:
        """Count tokens actually used (prompt + completion) by a request that was allowed."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be a whole number >= 0, got {tokens!r}")
        if tokens == 0:
            return
        index, _ = self._window()
        await self._charge(keys=[self._key(key.key_id, index)], args=[tokens, self._expiry_ms])
