"""API keys and per-key rate limits, against a real valkey-server: secrets, verification,
revocation, the sliding-window limits and their waits, atomicity, and the `tiermesh keys` CLI."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import subprocess
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from services.gateway.keys import REQUESTS, TOKENS, ApiKey, KeyStore, RateLimiter
from tiermesh.kit.testing import free_port, run_cli

WINDOW = 60.0
START = 100_000 * WINDOW  # the start of a fixed window, so clock offsets are window fractions


class Clock:
    """An injectable clock the test moves by hand."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def client(store_url: str) -> AsyncIterator[aioredis.Redis]:
    connection = aioredis.Redis.from_url(store_url)
    yield connection
    await connection.aclose()


@pytest.fixture
def prefix() -> str:
    """A prefix of this test's own, so tests sharing the session's store never see each other."""
    return f"test:{uuid.uuid4().hex}:"


@pytest.fixture
def store(client: aioredis.Redis, prefix: str) -> KeyStore:
    return KeyStore(client, prefix=prefix + "keys:")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(client: aioredis.Redis, prefix: str, clock: Clock) -> RateLimiter:
    return RateLimiter(client, prefix=prefix + "ratelimit:", window_s=WINDOW, clock=clock)


def limits(requests_per_minute: int = 1000, tokens_per_minute: int = 1_000_000) -> ApiKey:
    """A record to rate-limit, with an id of its own (the limiter needs no stored key)."""
    return ApiKey(f"k_{secrets.token_hex(5)}", "test", 0.0, requests_per_minute, tokens_per_minute)


# --- KeyStore -----------------------------------------------------------------------------------


async def test_create_returns_a_secret_that_verifies_to_its_record(store: KeyStore) -> None:
    secret, key = await store.create("mobile-app", requests_per_minute=7, tokens_per_minute=900)

    assert re.fullmatch(r"tm_k_[0-9a-f]{10}_[A-Za-z0-9_-]{43}", secret)
    assert secret.startswith(f"tm_{key.key_id}_")
    assert (key.name, key.requests_per_minute, key.tokens_per_minute) == ("mobile-app", 7, 900)
    assert key.active and key.revoked_at is None
    assert await store.verify(secret) == key


async def test_every_key_gets_its_own_id_and_secret(store: KeyStore) -> None:
    made = [await store.create("app", requests_per_minute=1, tokens_per_minute=1) for _ in range(20)]

    assert len({key.key_id for _, key in made}) == 20
    assert len({secret for secret, _ in made}) == 20
    for secret, key in made:
        assert await store.verify(secret) == key


async def test_a_wrong_secret_with_a_real_key_id_is_refused(store: KeyStore) -> None:
    secret, key = await store.create("app", requests_per_minute=1, tokens_per_minute=1)
    last = secret[-1]

    assert await store.verify(f"tm_{key.key_id}_{secrets.token_urlsafe(32)}") is None
    assert await store.verify(secret[:-1] + ("A" if last != "A" else "B")) is None
    assert await store.verify(secret) == key  # the real one still works


async def test_another_keys_secret_does_not_verify_under_this_id(store: KeyStore) -> None:
    first, one = await store.create("one", requests_per_minute=1, tokens_per_minute=1)
    _, other = await store.create("other", requests_per_minute=1, tokens_per_minute=1)
    swapped = first.replace(one.key_id, other.key_id)

    assert swapped != first
    assert await store.verify(swapped) is None


MALFORMED = [
    "",
    "tm_",
    "tm_k_",
    "tm_k_0123456789_",
    "junk",
    "Bearer tm_k_0123456789_" + "a" * 43,
    "tm_k_0123456789" + "_" * 44,
    "tm_index_" + "a" * 50,
    "x" * 1_000_000,
    "tm_k_é123456789_" + "a" * 43,
    "tm_k_\u0663123456789_" + "a" * 43,  # an Arabic-Indic digit: a digit, but not an ASCII one
    "\ud800" * 59,  # a lone surrogate: cannot even be encoded to UTF-8
    "\x00" * 59,
    "🔑" * 59,
]


@pytest.mark.parametrize("presented", MALFORMED, ids=range(len(MALFORMED)))
async def test_malformed_strings_are_refused_without_raising(store: KeyStore, presented: str) -> None:
    assert await store.verify(presented) is None


async def test_near_misses_of_a_real_secret_are_refused(store: KeyStore) -> None:
    secret, key = await store.create("app", requests_per_minute=1, tokens_per_minute=1)
    near = [
        secret + "\n",
        " " + secret,
        secret + "A",
        secret[:-1],
        secret.upper(),
        secret[:-1] + "é",
        secret.replace("tm_", "TM_", 1),
        f"tm_{key.key_id}",
        key.key_id,
        hashlib.sha256(secret.encode()).hexdigest(),  # what the store holds is not a credential
    ]
    for presented in near:
        assert await store.verify(presented) is None, presented
    assert await store.verify(secret) == key


async def test_a_revoked_key_stops_verifying_and_revoking_again_changes_nothing(store: KeyStore) -> None:
    secret, key = await store.create("app", requests_per_minute=1, tokens_per_minute=1)

    revoked = await store.revoke(key.key_id)
    assert revoked.key_id == key.key_id and revoked.name == "app"
    assert revoked.revoked_at is not None and revoked.revoked_at >= key.created_at
    assert not revoked.active
    assert await store.verify(secret) is None

    assert await store.revoke(key.key_id) == revoked  # idempotent: the first revocation time stays
    assert await store.verify(secret) is None


@pytest.mark.parametrize("key_id", ["k_0123456789", "index", "", "k_", "K_0123456789", "k_0123456789\n"])
async def test_revoking_an_unknown_key_raises_key_error(store: KeyStore, key_id: str) -> None:
    await store.create("app", requests_per_minute=1, tokens_per_minute=1)

    with pytest.raises(KeyError):
        await store.revoke(key_id)
    assert len(await store.list()) == 1  # nothing was created or damaged (e.g. the index)


async def test_list_has_every_key_oldest_first_with_its_status(store: KeyStore) -> None:
    assert await store.list() == []
    made = [
        (await store.create(name, requests_per_minute=rpm, tokens_per_minute=10 * rpm))[1]
        for name, rpm in (("first", 1), ("second", 2), ("third", 3))
    ]
    revoked = await store.revoke(made[1].key_id)

    listed = await store.list()

    assert listed == [made[0], revoked, made[2]]
    assert [key.created_at for key in listed] == sorted(key.created_at for key in listed)
    assert [key.active for key in listed] == [True, False, True]


async def test_the_secret_is_stored_nowhere_only_its_digest(store: KeyStore, client: aioredis.Redis) -> None:
    secret, key = await store.create("app", requests_per_minute=1, tokens_per_minute=1)
    random_part = secret[len(f"tm_{key.key_id}_") :]

    stored: list[bytes] = []
    keys = [name async for name in client.scan_iter(match=store.prefix + "*")]
    assert keys  # the test would pass vacuously on an empty store
    for name in keys:
        stored.append(name)
        kind = (await client.type(name)).decode()
        if kind == "hash":
            for field, value in (await client.hgetall(name)).items():
                stored += [field, value]
        elif kind == "zset":
            stored += await client.zrange(name, 0, -1)
        elif kind == "string":
            stored.append(await client.get(name))
        else:
            pytest.fail(f"unexpected {kind} {name!r} under the prefix")

    for value in stored:
        assert secret.encode() not in value
        assert random_part.encode() not in value
    digest = hashlib.sha256(secret.encode()).hexdigest().encode()
    assert digest in stored


@pytest.mark.parametrize(
    ("name", "requests_per_minute", "tokens_per_minute", "parameter"),
    [
        ("", 1, 1, "name"),
        ("   ", 1, 1, "name"),
        ("x" * 65, 1, 1, "name"),
        ("two\nlines", 1, 1, "name"),
        ("app", 0, 1, "requests_per_minute"),
        ("app", -5, 1, "requests_per_minute"),
        ("app", True, 1, "requests_per_minute"),
        ("app", 1.5, 1, "requests_per_minute"),
        ("app", 1, 0, "tokens_per_minute"),
        ("app", 1, -1, "tokens_per_minute"),
    ],
)
async def test_create_validates_and_names_the_parameter(
    store: KeyStore, name: str, requests_per_minute: int, tokens_per_minute: int, parameter: str
) -> None:
    with pytest.raises(ValueError, match=parameter):
        await store.create(name, requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute)
    assert await store.list() == []


async def test_a_64_character_name_is_accepted(store: KeyStore) -> None:
    _, key = await store.create("x" * 64, requests_per_minute=1, tokens_per_minute=1)
    assert key.name == "x" * 64


# --- RateLimiter --------------------------------------------------------------------------------


async def test_requests_beyond_the_limit_are_refused_until_the_window_passes(
    limiter: RateLimiter, clock: Clock
) -> None:
    key = limits(requests_per_minute=3)
    clock.now = START + 10  # a sixth into the window

    allowed = [await limiter.acquire(key) for _ in range(3)]
    assert [d.allowed for d in allowed] == [True, True, True]
    assert [d.remaining_requests for d in allowed] == [2, 1, 0]
    assert all(d.limit == "" and d.retry_after_s == 0 for d in allowed)

    refused = await limiter.acquire(key)
    assert not refused.allowed
    assert refused.limit == REQUESTS
    assert 0 < refused.retry_after_s <= WINDOW
    # All three are in the current window: they weigh fully until it ends, 50 s from now.
    assert refused.retry_after_s == pytest.approx(50, abs=0.01)
    assert refused.remaining_requests == 0

    clock.now += refused.retry_after_s - 0.05
    assert not (await limiter.acquire(key)).allowed
    clock.now = START + 10 + WINDOW + WINDOW  # past both windows: nothing counts
    assert (await limiter.acquire(key)).allowed


async def test_waiting_retry_after_is_enough_for_requests(limiter: RateLimiter, clock: Clock) -> None:
    key = limits(requests_per_minute=3)
    clock.now = START + 10
    for _ in range(3):
        assert (await limiter.acquire(key)).allowed
    refused = await limiter.acquire(key)

    clock.now += refused.retry_after_s
    assert (await limiter.acquire(key)).allowed


async def test_the_previous_window_weighs_by_the_share_of_it_still_in_the_last_minute(
    limiter: RateLimiter, clock: Clock
) -> None:
    key = limits(requests_per_minute=10)
    clock.now = START
    for _ in range(10):
        assert (await limiter.acquire(key)).allowed
    assert not (await limiter.acquire(key)).allowed

    clock.now = START + WINDOW + WINDOW / 2  # half into the next window: 10 * 0.5 = 5 still count
    decisions = [await limiter.acquire(key) for _ in range(6)]

    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert decisions[0].remaining_requests == 4
    assert decisions[-1].limit == REQUESTS


async def test_a_quarter_into_the_next_window_three_quarters_still_count(
    limiter: RateLimiter, clock: Clock
) -> None:
    key = limits(requests_per_minute=8)
    clock.now = START + 30
    for _ in range(8):
        assert (await limiter.acquire(key)).allowed

    clock.now = START + WINDOW + WINDOW / 4  # 8 * 0.75 = 6 still count: 2 more fit
    assert [(await limiter.acquire(key)).allowed for _ in range(3)] == [True, True, False]


async def test_tokens_charged_beyond_the_limit_refuse_the_next_request(
    limiter: RateLimiter, clock: Clock
) -> None:
    key = limits(requests_per_minute=100, tokens_per_minute=1000)
    clock.now = START + 10

    first = await limiter.acquire(key)
    assert first.allowed and first.remaining_tokens == 1000
    await limiter.charge(key, 400)
    second = await limiter.acquire(key)
    assert second.allowed and second.remaining_tokens == 600
    await limiter.charge(key, 800)  # now 1200 of 1000

    refused = await limiter.acquire(key)
    assert not refused.allowed
    assert refused.limit == TOKENS
    assert refused.remaining_tokens == 0
    assert refused.remaining_requests == 98
    # 1200 in the current window: the rest of it (50 s), then 1200 * (1 - g) < 1000 at g = 1/6 (10 s).
    assert refused.retry_after_s == pytest.approx(60, abs=0.01)

    clock.now += refused.retry_after_s - 0.05
    assert not (await limiter.acquire(key)).allowed
    clock.now += 0.05
    assert (await limiter.acquire(key)).allowed


async def test_refused_requests_are_not_counted(limiter: RateLimiter, clock: Clock) -> None:
    key = limits(requests_per_minute=2)
    for _ in range(2):
        assert (await limiter.acquire(key)).allowed
    for _ in range(20):
        assert not (await limiter.acquire(key)).allowed

    clock.now = START + WINDOW + WINDOW / 2  # 2 * 0.5 = 1: one more fits, as if the 20 never came
    assert [(await limiter.acquire(key)).allowed for _ in range(2)] == [True, False]


async def test_keys_are_limited_separately(limiter: RateLimiter) -> None:
    one, other = limits(requests_per_minute=1), limits(requests_per_minute=1)

    assert (await limiter.acquire(one)).allowed
    assert not (await limiter.acquire(one)).allowed
    assert (await limiter.acquire(other)).allowed


# (tokens charged in window w at its start, tokens charged in window w + 1, fraction of w + 1 at
# the probe, expected wait): both phases of the approximation, and an overshoot needing > 1 window.
WAITS = [
    (200, 0, 0.25, 15.0),  # 150 in all; the previous window's 200 lose 10 per 3 s: 15 s
    (120, 50, 0.5, 5.0),  # 110 in all; 120 / 60 s: 10 over takes 5 s
    (100, 50, 0.5, 0.0),  # exactly at the limit: any moment later is below it
    (0, 100, 0.5, 30.0),  # the current window alone is at the limit: until it ends
    (50, 300, 0.1, 54.0 + 40.0),  # 54 s left in this window, then 300 * (1 - g) < 100 at g = 2/3
]


@pytest.mark.parametrize(("previous", "current", "fraction", "expected"), WAITS)
async def test_retry_after_is_when_the_weighted_count_drops_below_the_limit(
    limiter: RateLimiter, clock: Clock, previous: int, current: int, fraction: float, expected: float
) -> None:
    key = limits(requests_per_minute=1000, tokens_per_minute=100)
    clock.now = START
    await limiter.charge(key, previous)
    clock.now = START + WINDOW
    await limiter.charge(key, current)
    clock.now = START + WINDOW + fraction * WINDOW

    refused = await limiter.acquire(key)

    assert not refused.allowed and refused.limit == TOKENS
    assert refused.retry_after_s > 0
    assert refused.retry_after_s == pytest.approx(expected, abs=0.01)
    assert refused.retry_after_s < 2 * WINDOW
    probe = clock.now
    if refused.retry_after_s > 0.02:
        clock.now = probe + refused.retry_after_s - 0.01
        assert not (await limiter.acquire(key)).allowed
    clock.now = probe + refused.retry_after_s
    assert (await limiter.acquire(key)).allowed


async def test_when_both_limits_refuse_the_longer_wait_is_given(limiter: RateLimiter, clock: Clock) -> None:
    key = limits(requests_per_minute=1, tokens_per_minute=100)
    clock.now = START + 30
    assert (await limiter.acquire(key)).allowed
    await limiter.charge(key, 500)

    refused = await limiter.acquire(key)

    # Requests clear when this window ends (30 s); the 500 tokens only 4/5 into the next (78 s).
    assert refused.limit == TOKENS
    assert refused.retry_after_s == pytest.approx(30 + 48, abs=0.01)
    assert refused.remaining_requests == 0


async def test_concurrent_acquires_never_exceed_the_limit(limiter: RateLimiter) -> None:
    key = limits(requests_per_minute=10)

    decisions = await asyncio.gather(*(limiter.acquire(key) for _ in range(30)))

    assert sum(d.allowed for d in decisions) == 10
    assert all(d.limit == REQUESTS and d.retry_after_s > 0 for d in decisions if not d.allowed)


async def test_window_counters_expire_after_two_windows(
    limiter: RateLimiter, client: aioredis.Redis, prefix: str
) -> None:
    key = limits()
    await limiter.acquire(key)
    await limiter.charge(key, 5)

    names = [name async for name in client.scan_iter(match=prefix + "ratelimit:*")]

    assert len(names) == 1
    assert await client.hgetall(names[0]) == {b"requests": b"1", b"tokens": b"5"}
    assert 0 < await client.pttl(names[0]) <= 2 * WINDOW * 1000


async def test_charge_refuses_negative_tokens(limiter: RateLimiter) -> None:
    with pytest.raises(ValueError, match="tokens"):
        await limiter.charge(limits(), -1)


# --- tiermesh keys ------------------------------------------------------------------------------


def keys_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`tiermesh keys ARGS...` in a subprocess."""
    return run_cli(env, "keys", *args, timeout=60)


@pytest.fixture
def env(store_url: str) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": store_url}


async def test_cli_create_list_revoke(env: dict[str, str], client: aioredis.Redis) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    created = keys_cli(env, "create", "--name", name, "--requests-per-minute", "5")
    assert created.returncode == 0, created.stderr
    secret = re.search(r"tm_k_[0-9a-f]{10}_[A-Za-z0-9_-]{43}", created.stdout)
    assert secret, created.stdout
    assert "cannot be shown again" in created.stdout
    key = await KeyStore(client).verify(secret.group())
    assert key is not None
    assert (key.name, key.requests_per_minute, key.tokens_per_minute) == (name, 5, 40000)
    assert key.key_id in created.stdout

    listed = keys_cli(env, "list")
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if key.key_id in line)
    assert name in line and "active" in line and " 5 " in line and "40000" in line
    assert secret.group() not in listed.stdout
    assert secret.group()[len(f"tm_{key.key_id}_") :] not in listed.stdout
    assert hashlib.sha256(secret.group().encode()).hexdigest() not in listed.stdout

    revoked = keys_cli(env, "revoke", key.key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert key.key_id in revoked.stdout
    assert await KeyStore(client).verify(secret.group()) is None
    listed = keys_cli(env, "list")
    line = next(line for line in listed.stdout.splitlines() if key.key_id in line)
    assert "revoked" in line and "active" not in line


@pytest.mark.parametrize("key_id", ["k_0000000000", "not-a-key"])
def test_cli_revoke_of_an_unknown_key_fails_clearly(env: dict[str, str], key_id: str) -> None:
    found = keys_cli(env, "revoke", key_id)

    assert found.returncode == 1
    assert f"no key {key_id!r}" in found.stderr
    assert "Traceback" not in found.stderr


@pytest.mark.parametrize("flag", ["--requests-per-minute", "--tokens-per-minute"])
@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_cli_create_refuses_a_bad_limit(env: dict[str, str], flag: str, value: str) -> None:
    found = keys_cli(env, "create", "--name", "app", flag, value)

    assert found.returncode == 2
    assert f"argument {flag}: must be a whole number >= 1" in found.stderr
    assert "Traceback" not in found.stderr


def test_cli_create_refuses_a_bad_name(env: dict[str, str]) -> None:
    found = keys_cli(env, "create", "--name", "x" * 65)

    assert found.returncode == 2
    assert found.stderr.strip().splitlines() == [
        "tiermesh keys create: name must be at most 64 characters, got 65"
    ]


def test_cli_reports_an_unreachable_store_in_one_line(env: dict[str, str]) -> None:
    found = keys_cli({**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, "list")

    assert found.returncode == 1
    assert len(found.stderr.strip().splitlines()) == 1
    assert "cannot use the store at redis://127.0.0.1:" in found.stderr
    assert found.stdout == ""
