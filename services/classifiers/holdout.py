"""Held-out data exported beside a model version (CSV, one column per field): what its published
metrics are computed from, what the tests recompute them from, and what the bias tier audits."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np


def write(path: Path, columns: Mapping[str, Sequence[object]]) -> None:
    """Columns of equal length, in the mapping's order."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(zip(*columns.values(), strict=True))


def read(path: Path, *, floats: Iterable[str] = (), ints: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """The columns back: `floats` as float64, `ints` as int64, the rest as strings."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = {key: np.array([row[key] for row in rows]) for key in rows[0]}
    for key in floats:
        columns[key] = columns[key].astype(np.float64)
    for key in ints:
        columns[key] = columns[key].astype(np.int64)
    return columns
