"""Group fairness metrics over binary decisions, with AIF360's definitions, plus what AIF360 lacks:
explicit "undefined" results with a reason, seeded bootstrap confidence intervals and the
four-fifths rule.

Decisions are 0/1 arrays where 1 is the favourable outcome (e.g. "approved", "repaid"): `truth`
is what happened, `predicted` what the model decided, `privileged` marks the privileged group.
For a privileged group p and an unprivileged group u (AIF360's `ClassificationMetric`):

    statistical parity difference  P(ŷ=1 | u) - P(ŷ=1 | p)
    disparate impact               P(ŷ=1 | u) / P(ŷ=1 | p)
    equal opportunity difference   TPR(u) - TPR(p)
    average odds difference        ((FPR(u) - FPR(p)) + (TPR(u) - TPR(p))) / 2
    Theil index                    mean((b/μ) ln(b/μ)) over all rows, b = ŷ - y + 1 (0 ln 0 = 0)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import numpy as np

METRICS = (
    "statistical_parity_difference",
    "disparate_impact",
    "equal_opportunity_difference",
    "average_odds_difference",
    "theil_index",
)
FOUR_FIFTHS = 0.8


class Undefined(ValueError):
    """The metric has no value on this data; the message says why."""


@dataclasses.dataclass(frozen=True)
class Interval:
    lower: float
    upper: float
    level: float
    samples: int  # resamples in which the metric was defined


@dataclasses.dataclass(frozen=True)
class MetricValue:
    name: str
    value: float | None  # None when undefined
    undefined_reason: str = ""
    interval: Interval | None = None


@dataclasses.dataclass(frozen=True)
class Decisions:
    """Validated 0/1 arrays of equal length (see `decisions`)."""

    truth: np.ndarray
    predicted: np.ndarray
    privileged: np.ndarray

    def take(self, rows: np.ndarray) -> Decisions:
        return Decisions(self.truth[rows], self.predicted[rows], self.privileged[rows])


def decisions(truth: object, predicted: object, privileged: object) -> Decisions:
    """Check and convert; ValueError names the offending argument."""
    arrays = {}
    for name, values in (("truth", truth), ("predicted", predicted), ("privileged", privileged)):
        array = np.asarray(values)
        if array.ndim != 1:
            raise ValueError(f"{name}: expected a flat list, got shape {array.shape}")
        if array.size and not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name}: values must be 0 or 1")
        arrays[name] = array.astype(np.int8)
    lengths = {name: array.size for name, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"lengths differ: {lengths}")
    if not lengths["truth"]:
        raise ValueError("no decisions")
    if np.unique(arrays["privileged"]).size < 2:
        raise ValueError("privileged: the protected attribute has one group only; metrics compare two")
    return Decisions(**arrays)


def _rate(numerator: np.ndarray, within: np.ndarray, what: str) -> float:
    if not within.any():
        raise Undefined(f"no {what}")
    return float(numerator[within].mean())


def _selection_rates(d: Decisions) -> tuple[float, float]:
    priv, unpriv = d.privileged == 1, d.privileged == 0
    return (
        _rate(d.predicted == 1, unpriv, "unprivileged rows"),
        _rate(d.predicted == 1, priv, "privileged rows"),
    )


def _rates(d: Decisions, truth_value: int) -> tuple[float, float]:
    """(unprivileged, privileged) rate of favourable predictions among rows with this truth."""
    kind = "favourable" if truth_value == 1 else "unfavourable"
    group = d.truth == truth_value
    return (
        _rate(d.predicted == 1, group & (d.privileged == 0), f"unprivileged rows with a {kind} true label"),
        _rate(d.predicted == 1, group & (d.privileged == 1), f"privileged rows with a {kind} true label"),
    )


def statistical_parity_difference(d: Decisions) -> float:
    unprivileged, privileged = _selection_rates(d)
    return unprivileged - privileged


def disparate_impact(d: Decisions) -> float:
    unprivileged, privileged = _selection_rates(d)
    if privileged == 0:
        raise Undefined("the privileged group has no favourable predictions")
    return unprivileged / privileged


def equal_opportunity_difference(d: Decisions) -> float:
    unprivileged, privileged = _rates(d, 1)
    return unprivileged - privileged


def average_odds_difference(d: Decisions) -> float:
    tpr_u, tpr_p = _rates(d, 1)
    fpr_u, fpr_p = _rates(d, 0)
    return 0.5 * ((fpr_u - fpr_p) + (tpr_u - tpr_p))


def theil_index(d: Decisions) -> float:
    benefit = d.predicted.astype(np.float64) - d.truth + 1.0
    mean = benefit.mean()
    if mean == 0:
        raise Undefined("every row has zero benefit (all predictions unfavourable, all labels favourable)")
    ratio = benefit / mean
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(ratio > 0, ratio * np.log(ratio), 0.0)
    return float(terms.mean())


FUNCTIONS: dict[str, Callable[[Decisions], float]] = {
    "statistical_parity_difference": statistical_parity_difference,
    "disparate_impact": disparate_impact,
    "equal_opportunity_difference": equal_opportunity_difference,
    "average_odds_difference": average_odds_difference,
    "theil_index": theil_index,
}


def evaluate(
    d: Decisions, *, bootstrap_samples: int = 1000, confidence_level: float = 0.95, seed: int = 0
) -> list[MetricValue]:
    """Every metric with its percentile bootstrap interval (resampling rows with replacement)."""
    if bootstrap_samples < 0 or not 0 < confidence_level < 1:
        raise ValueError("bootstrap_samples must be >= 0 and confidence_level in (0, 1)")
    resampled: dict[str, list[float]] = {name: [] for name in METRICS}
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap_samples):
        sample = d.take(rng.integers(0, d.truth.size, d.truth.size))
        for name in METRICS:
            with contextlib.suppress(Undefined):  # undefined resamples: counted in `samples`
                resampled[name].append(FUNCTIONS[name](sample))
    results = []
    tail = (1 - confidence_level) / 2
    for name in METRICS:
        try:
            value = FUNCTIONS[name](d)
        except Undefined as reason:
            results.append(MetricValue(name, None, str(reason)))
            continue
        values = resampled[name]
        interval = None
        if values:
            lower, upper = np.quantile(values, [tail, 1 - tail])
            interval = Interval(float(lower), float(upper), confidence_level, len(values))
        results.append(MetricValue(name, value, "", interval))
    return results


def four_fifths(results: list[MetricValue]) -> str:
    """PASS, FAIL (disparate impact below 0.8: adverse impact) or UNDEFINED."""
    impact = next(r for r in results if r.name == "disparate_impact")
    if impact.value is None:
        return "UNDEFINED"
    return "PASS" if impact.value >= FOUR_FIFTHS else "FAIL"
