"""Live fairness monitoring: a rolling window of recent decisions per model version and protected
attribute, kept in the Redis-compatible store so every bias replica sees the same window.

A window is one string of one character per decision (which cell of the contingency table: group,
true outcome or "unknown", prediction), oldest first. A Lua script appends a batch and trims the
string to the capacity in one atomic step, and fixes the window's privileged values at its first
batch, so concurrent recorders never interleave half-batches or mix definitions. 10,000 decisions
take 10 kB.

Parity and disparate impact use every decision in the window; the outcome metrics (equal
opportunity, average odds, Theil) and base rates only those whose true outcome is known.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import redis.asyncio as aioredis
from prometheus_client import Gauge

from services.bias import fairness

KEY_PREFIX = "tiermesh:bias:window:"
INDEX_KEY = "tiermesh:bias:windows"
UNKNOWN = -1  # a true outcome not known yet
SELECTION_METRICS = ("statistical_parity_difference", "disparate_impact")
OUTCOME_METRICS = ("equal_opportunity_difference", "average_odds_difference", "theil_index")
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_BASE = ord("a")

FAIRNESS = Gauge(
    "tiermesh_bias_fairness",
    "Group fairness metric over a monitoring window (NaN while undefined)",
    ["model", "model_version", "protected_attribute", "metric"],
)
WINDOW_DECISIONS = Gauge(
    "tiermesh_bias_window_decisions",
    "Decisions in a monitoring window, by whether the true outcome is known",
    ["model", "model_version", "protected_attribute", "outcome"],
)
SELECTION_RATE = Gauge(
    "tiermesh_bias_selection_rate",
    "Share of a group's decisions in a monitoring window that were favourable",
    ["model", "model_version", "protected_attribute", "group"],
)

# KEYS: window, its privileged values, the index. ARGV: cells, privileged JSON, capacity, window id.
_APPEND = """
local fixed = redis.call('GET', KEYS[2])
if fixed and fixed ~= ARGV[2] then return {-1, fixed} end
if not fixed then redis.call('SET', KEYS[2], ARGV[2]) end
redis.call('APPEND', KEYS[1], ARGV[1])
local size = redis.call('STRLEN', KEYS[1])
local capacity = tonumber(ARGV[3])
if size > capacity then
  redis.call('SET', KEYS[1], redis.call('GETRANGE', KEYS[1], size - capacity, -1))
  size = capacity
end
redis.call('SADD', KEYS[3], ARGV[4])
return {size, ARGV[2]}
"""


class WindowConflict(ValueError):
    """The batch's privileged values differ from those the window was started with."""


@dataclasses.dataclass(frozen=True)
class Window:
    model_name: str
    model_version: str
    protected_attribute: str

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not _PART.match(value):
                raise ValueError(
                    f"{field.name}: {value[:70]!r} must be 1-64 letters, digits, '.', '_' or '-'"
                )

    @property
    def id(self) -> str:
        return f"{self.model_name}/{self.model_version}/{self.protected_attribute}"

    @classmethod
    def from_id(cls, text: str) -> Window:
        return cls(*text.split("/"))

    @property
    def labels(self) -> tuple[str, str, str]:
        return (self.model_name, self.model_version, self.protected_attribute)


@dataclasses.dataclass(frozen=True)
class Report:
    window: Window
    metrics: list[fairness.MetricValue]
    four_fifths: str
    groups: dict[str, fairness.Group]
    decisions: int
    with_outcome: int
    privileged_values: list[str]


def encode(truth: np.ndarray, predicted: np.ndarray, privileged: np.ndarray) -> str:
    """One character per decision: group (0/1), truth (-1/0/1) and prediction (0/1)."""
    cells = (privileged.astype(np.int64) * 3 + truth.astype(np.int64) + 1) * 2 + predicted
    return (cells + _BASE).astype(np.uint8).tobytes().decode("ascii")


def decode(cells: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth with -1 for unknown, predicted, privileged) of an encoded window."""
    codes = np.frombuffer(cells, dtype=np.uint8).astype(np.int64) - _BASE
    if codes.size and (codes.min() < 0 or codes.max() > 11):
        raise ValueError("the window holds characters that are not decisions")
    predicted = codes % 2
    privileged, truth = np.divmod(codes // 2, 3)
    return truth - 1, predicted, privileged


def report(
    window: Window,
    truth: np.ndarray,
    predicted: np.ndarray,
    privileged: np.ndarray,
    privileged_values: list[str],
    **bootstrap: float,
) -> Report:
    known = truth != UNKNOWN
    everything = fairness.table(np.zeros_like(predicted), predicted, privileged)
    outcomes = fairness.table(truth[known], predicted[known], privileged[known])
    by_name = {
        m.name: m
        for m in fairness.evaluate_table(everything, metrics=SELECTION_METRICS, **bootstrap)
        + fairness.evaluate_table(outcomes, metrics=OUTCOME_METRICS, **bootstrap)
    }
    metrics = [by_name[name] for name in fairness.METRICS]
    selection, base = fairness.groups(everything), fairness.groups(outcomes)
    groups = {
        name: fairness.Group(selection[name].count, selection[name].selection_rate, base[name].base_rate)
        for name in selection
    }
    return Report(
        window,
        metrics,
        fairness.four_fifths(metrics),
        groups,
        int(truth.size),
        int(known.sum()),
        privileged_values,
    )


class Monitor:
    """The windows in the store, and the Prometheus gauges computed from them."""

    def __init__(self, store_url: str, capacity: int) -> None:
        self.capacity = capacity
        self.client = aioredis.Redis.from_url(store_url, socket_timeout=5, socket_connect_timeout=2)
        self._append = self.client.register_script(_APPEND)

    async def close(self) -> None:
        await self.client.aclose()

    async def record(
        self,
        window: Window,
        truth: np.ndarray,
        predicted: np.ndarray,
        privileged: np.ndarray,
        privileged_values: list[str],
    ) -> int:
        """Append a batch (truth -1 where unknown); returns the window's size afterwards."""
        fixed = json.dumps(sorted(set(privileged_values)))
        size, stored = await self._append(
            keys=[KEY_PREFIX + window.id, KEY_PREFIX + window.id + ":privileged", INDEX_KEY],
            args=[encode(truth, predicted, privileged), fixed, self.capacity, window.id],
        )
        if size < 0:
            stored = stored.decode() if isinstance(stored, bytes) else stored
            raise WindowConflict(
                f"{', '.join(sorted(set(privileged_values)))[:200]!r} differ from the window's "
                f"privileged values {', '.join(json.loads(stored))!r}, fixed by its first batch"
            )
        return int(size)

    async def windows(self) -> list[Window]:
        return sorted(
            (Window.from_id(raw.decode()) for raw in await self.client.smembers(INDEX_KEY)),
            key=lambda w: w.id,
        )

    async def evaluate(self, window: Window, **bootstrap: float) -> Report | None:
        """The window's report; None when the window has never been written."""
        async with self.client.pipeline(transaction=True) as pipe:
            cells, fixed = await (
                pipe.get(KEY_PREFIX + window.id).get(KEY_PREFIX + window.id + ":privileged").execute()
            )
        if cells is None or fixed is None:
            return None
        found = report(window, *decode(cells), json.loads(fixed), **bootstrap)
        export(found)
        return found

    async def refresh(self) -> int:
        """Recompute every window's gauges (no bootstrap); returns how many windows."""
        windows = await self.windows()
        for window in windows:
            await self.evaluate(window, bootstrap_samples=0)
        return len(windows)


def export(found: Report) -> None:
    labels = found.window.labels
    for metric in found.metrics:
        value = metric.value if metric.value is not None else float("nan")
        FAIRNESS.labels(*labels, metric.name).set(value)
    WINDOW_DECISIONS.labels(*labels, "known").set(found.with_outcome)
    WINDOW_DECISIONS.labels(*labels, "unknown").set(found.decisions - found.with_outcome)
    for group, summary in found.groups.items():
        SELECTION_RATE.labels(*labels, group).set(summary.selection_rate)
