"""Configuration from environment variables only, validated at start-up.

A tier declares its settings as a frozen dataclass whose fields are made with `setting(...)`;
`load(cls, prefix=...)` reads `<prefix><NAME>` for each field, converts it to the field's type and
checks bounds, raising `ConfigError` with a one-line message naming the variable on the first bad
value, so a misconfigured process stops before it binds a port.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_REQUIRED = object()
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A missing or invalid environment variable; the message names it."""


def setting(
    name: str,
    default: Any = _REQUIRED,
    *,
    help: str,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """Declare a dataclass field read from the environment variable `<prefix><name>`."""
    meta = {"env": name, "help": help, "min": min, "max": max, "choices": choices}
    if default is _REQUIRED:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _parse(raw: str, kind: type, env: str) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{env}: expected a boolean (true/false), got {raw!r}")
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise ConfigError(f"{env}: expected {noun}, got {raw!r}") from None
    if kind is Path:
        return Path(raw).expanduser()
    return raw


def _check(value: Any, meta: Mapping[str, Any], env: str) -> None:
    low, high, choices = meta["min"], meta["max"], meta["choices"]
    if choices is not None and value not in choices:
        raise ConfigError(f"{env}: expected one of {', '.join(choices)}, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{env}: must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{env}: must be <= {high}, got {value!r}")


def load(cls: type[T], *, prefix: str = "", environ: Mapping[str, str] | None = None) -> T:
    """Build `cls` from the environment, raising ConfigError on the first bad variable."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        env = prefix + field.metadata["env"]
        raw = environ.get(env)
        if raw is None or raw == "":
            if field.default is dataclasses.MISSING:
                raise ConfigError(f"{env}: required but not set ({field.metadata['help']})")
            continue
        kind = hints[field.name]
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        value = _parse(raw, kind, env)
        _check(value, field.metadata, env)
        values[field.name] = value
    return cls(**values)


def describe(cls: type, *, prefix: str = "") -> list[tuple[str, str, str]]:
    """(variable, default, help with the allowed values) for every setting of `cls`, for --help
    texts and docs."""
    rows = []
    for field in dataclasses.fields(cls):
        default = "(required)" if field.default is dataclasses.MISSING else repr(field.default)
        allowed = _allowed(field.metadata)
        meaning = field.metadata["help"] + (f" ({allowed})" if allowed else "")
        rows.append((prefix + field.metadata["env"], default, meaning))
    return rows


def _allowed(meta: Mapping[str, Any]) -> str:
    """The values `load` accepts, in words: `one of a, b`, `1 to 64`, `>= 0`."""
    low, high, choices = meta["min"], meta["max"], meta["choices"]
    if choices is not None:
        return "one of " + ", ".join(choices)
    if low is not None and high is not None:
        return f"{low:g} to {high:g}"
    if low is not None:
        return f">= {low:g}"
    return f"<= {high:g}" if high is not None else ""


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Settings every tier has, read with the tier's prefix (e.g. `EMBEDDER_GRPC_PORT`)."""

    grpc_port: int = setting("GRPC_PORT", help="gRPC listen port (0 = any free port)", min=0, max=65535)
    metrics_port: int = setting("METRICS_PORT", help="Prometheus /metrics port (0 = any)", min=0, max=65535)
    host: str = setting("HOST", "127.0.0.1", help="address to bind gRPC and metrics to")
    shutdown_grace_s: float = setting(
        "SHUTDOWN_GRACE_S", 10.0, help="seconds in-flight RPCs get to finish on SIGTERM", min=0, max=600
    )
    drain_delay_s: float = setting(
        "DRAIN_DELAY_S",
        3.0,
        help="seconds a stopping tier still serves while reporting NOT_SERVING, so Envoy's health "
        "checks (every 1 s) take it out of the pool before it stops accepting calls",
        min=0,
        max=60,
    )
    max_concurrent_rpcs: int = setting(
        "MAX_CONCURRENT_RPCS",
        256,
        help="calls handled at once; more are refused at once with RESOURCE_EXHAUSTED (bounds every "
        "queue behind them)",
        min=1,
        max=100_000,
    )
    max_message_mb: int = setting(
        "MAX_MESSAGE_MB", 16, help="largest request or response, MiB", min=1, max=512
    )


@dataclasses.dataclass(frozen=True)
class FollowingConfig(ServerConfig):
    """Settings of a tier that follows `latest` of its registry models (`<TIER>_STORE_URL`, ...)."""

    store_url: str = setting(
        "STORE_URL", "", help="redis:// URL for publish announcements; empty: periodic checks only"
    )
    check_interval_s: float = setting(
        "CHECK_INTERVAL_S",
        5.0,
        help="seconds between checks of the registry's latest version (catches missed announcements)",
        min=0.1,
        max=3600,
    )
