"""`tiermesh keys ...`: create, list and revoke the REST gateway's API keys in the store."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

KEYS_EPILOG = """examples:
  tiermesh keys create --name mobile-app                  60 requests, 40,000 tokens a minute
  tiermesh keys create --name batch-jobs --requests-per-minute 600 --tokens-per-minute 200000
  tiermesh keys list                                      every key, revoked ones included
  tiermesh keys revoke k_3f9a1c2b7d                       the key stops working at once

The secret is printed once, by `create`; the store keeps only its SHA-256 digest. Keys live in
the store at --store-url (default: REDIS_URL, else the running mesh's store, else STORE_PORT)."""

T = TypeVar("T")


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def add_commands(sub: Any) -> None:
    """Register `keys` on the top-level parser's subparsers."""
    keys = sub.add_parser(
        "keys",
        help="API keys of the REST gateway: create (secret shown once), list, revoke",
        epilog=KEYS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    def action(name: str, help: str, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help, description=help)
        parser.add_argument("--store-url", help="redis:// URL of the store (default: the mesh's store)")
        parser.set_defaults(run=run)
        return parser

    create = action("create", "create a key and print its secret (shown this once only)", run_create)
    create.add_argument("--name", required=True, help="a label for whoever uses the key, e.g. mobile-app")
    create.add_argument(
        "--requests-per-minute", type=_positive_int, default=60, metavar="N", help="request limit (60)"
    )
    create.add_argument(
        "--tokens-per-minute", type=_positive_int, default=40000, metavar="N", help="token limit (40000)"
    )

    action("list", "every key: id, name, creation time, limits, status (never a secret)", run_list)

    revoke = action("revoke", "revoke a key: requests with it are refused from now on", run_revoke)
    revoke.add_argument("key_id", metavar="KEY_ID", help="the key's id, e.g. k_3f9a1c2b7d")


def _redacted(url: str) -> str:
    """The URL without its password, fit to print in an error."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _with_store(args: argparse.Namespace, use: Callable[[Any], Awaitable[T]]) -> T:
    """Run `use(KeyStore)` against the store; an unreachable store is one line on stderr, exit 1."""
    import redis
    import redis.asyncio as aioredis

    from services.gateway.keys import KeyStore

    url = args.store_url or args.mesh.store()
    try:
        aioredis.connection.parse_url(url)
    except ValueError as error:
        print(f"tiermesh keys: bad store URL {_redacted(url)!r}: {error}", file=sys.stderr)
        raise SystemExit(2) from None

    async def call() -> T:
        client = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        try:
            return await use(KeyStore(client))
        finally:
            await client.aclose()

    try:
        return asyncio.run(call())
    except (redis.RedisError, OSError) as error:
        print(f"tiermesh keys: cannot use the store at {_redacted(url)}: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def run_create(args: argparse.Namespace) -> int:
    try:
        secret, key = _with_store(
            args,
            lambda store: store.create(
                args.name,
                requests_per_minute=args.requests_per_minute,
                tokens_per_minute=args.tokens_per_minute,
            ),
        )
    except ValueError as error:
        print(f"tiermesh keys create: {error}", file=sys.stderr)
        return 2
    print(f"created key {key.key_id} ({key.name}): {key.requests_per_minute} requests, "
          f"{key.tokens_per_minute} tokens a minute")  # fmt: skip
    print(f"secret: {secret}")
    print("This secret cannot be shown again: store it now. Send it as `Authorization: Bearer <secret>`.")
    return 0


def run_list(args: argparse.Namespace) -> int:
    found = _with_store(args, lambda store: store.list())
    if not found:
        print("no API keys (tiermesh keys create --name NAME makes one)")
        return 0
    rows = [
        (
            key.key_id,
            key.name,
            _utc(key.created_at),
            str(key.requests_per_minute),
            str(key.tokens_per_minute),
            "active" if key.active else f"revoked {_utc(key.revoked_at or 0.0)}",
        )
        for key in found
    ]
    header = ("ID", "NAME", "CREATED (UTC)", "RPM", "TPM", "STATUS")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    numeric = {3, 4}
    for row in [header, *rows]:
        cells = [
            cell.rjust(w) if i in numeric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    async def revoke(store: Any) -> Any:
        return await store.revoke(args.key_id)

    try:
        key = _with_store(args, revoke)
    except KeyError:
        print(
            f"tiermesh keys revoke: no key {args.key_id!r} (tiermesh keys list shows them)", file=sys.stderr
        )
        return 1
    print(f"revoked {key.key_id} ({key.name}) at {_utc(key.revoked_at or 0.0)} UTC")
    return 0
