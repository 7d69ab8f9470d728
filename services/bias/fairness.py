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

import dataclasses

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

    def table(self) -> np.ndarray:
        return table(self.truth, self.predicted, self.privileged)


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


@dataclasses.dataclass(frozen=True)
class Group:
    count: int
    selection_rate: float  # share predicted favourable (NaN for an empty group)
    base_rate: float  # share whose true label is favourable (NaN for an empty group)


def table(truth: np.ndarray, predicted: np.ndarray, privileged: np.ndarray) -> np.ndarray:
    """Counts of decisions by [privileged, truth, predicted]: a (2, 2, 2) contingency table.

    Every metric is a function of these eight counts, which makes the bootstrap cheap (below).
    """
    cells = privileged.astype(np.int64) * 4 + truth.astype(np.int64) * 2 + predicted
    return np.bincount(cells, minlength=8).reshape(2, 2, 2)


def _values(t: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of tables `t` of shape (..., 2, 2, 2); NaN or inf where undefined."""
    t = t.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        selection = t[..., 1].sum(-1) / t.sum((-1, -2))  # (..., group)
        tpr = t[..., 1, 1] / t[..., 1, :].sum(-1)
        fpr = t[..., 0, 1] / t[..., 0, :].sum(-1)
        # Theil: benefit b = predicted - truth + 1 is 1 for agreeing cells, 2 for a false
        # favourable prediction and 0 (contributing 0 ln 0 = 0) for a false unfavourable one.
        cells = t.sum(-3)
        rows = cells.sum((-1, -2))
        one, two = cells[..., 0, 0] + cells[..., 1, 1], cells[..., 0, 1]
        mean = (one + 2 * two) / rows
        theil = (one * np.log(1 / mean) / mean + two * 2 * np.log(2 / mean) / mean) / rows
        return {
            "statistical_parity_difference": selection[..., 0] - selection[..., 1],
            "disparate_impact": selection[..., 0] / selection[..., 1],
            "equal_opportunity_difference": tpr[..., 0] - tpr[..., 1],
            "average_odds_difference": 0.5 * ((fpr[..., 0] - fpr[..., 1]) + (tpr[..., 0] - tpr[..., 1])),
            "theil_index": theil,
        }


def _undefined_reasons(t: np.ndarray) -> dict[str, str]:
    """Why each metric has no value on table `t` ("" when it has one), first missing count first."""
    groups = {0: "unprivileged", 1: "privileged"}
    members = [f"no {groups[g]} rows" for g in (0, 1) if not t[g].sum()]
    favourable = [f"no {groups[g]} rows with a favourable true label" for g in (0, 1) if not t[g, 1].sum()]
    unfavourable = [
        f"no {groups[g]} rows with an unfavourable true label" for g in (0, 1) if not t[g, 0].sum()
    ]
    if not members and not t[1, :, 1].sum():
        impact = ["the privileged group has no favourable predictions"]
    else:
        impact = []
    cells = t.sum(0)
    if not cells.sum():
        theil = ["no rows"]
    elif not (cells[0, 0] + cells[1, 1] + cells[0, 1]):
        theil = ["every row has zero benefit (all predictions unfavourable, all labels favourable)"]
    else:
        theil = []
    reasons = {
        "statistical_parity_difference": members,
        "disparate_impact": members + impact,
        "equal_opportunity_difference": favourable,
        "average_odds_difference": favourable + unfavourable,
        "theil_index": theil,
    }
    return {name: (found[0] if found else "") for name, found in reasons.items()}


def groups(t: np.ndarray) -> dict[str, Group]:
    """Size, selection rate and base rate of the unprivileged and privileged groups."""
    summary = {}
    for index, name in ((0, "unprivileged"), (1, "privileged")):
        count = int(t[index].sum())
        favourable_predictions, favourable_truths = float(t[index, :, 1].sum()), float(t[index, 1].sum())
        if count:
            summary[name] = Group(count, favourable_predictions / count, favourable_truths / count)
        else:
            summary[name] = Group(0, float("nan"), float("nan"))
    return summary


def evaluate(
    d: Decisions, *, bootstrap_samples: int = 1000, confidence_level: float = 0.95, seed: int = 0
) -> list[MetricValue]:
    """Every metric of `d` with its percentile bootstrap interval."""
    return evaluate_table(
        d.table(), bootstrap_samples=bootstrap_samples, confidence_level=confidence_level, seed=seed
    )


def evaluate_table(
    t: np.ndarray,
    *,
    bootstrap_samples: int = 1000,
    confidence_level: float = 0.95,
    seed: int = 0,
    metrics: tuple[str, ...] = METRICS,
) -> list[MetricValue]:
    """`metrics` of a contingency table (see `table`) with percentile bootstrap intervals.

    Resampling n rows with replacement is drawing the eight cell counts from a multinomial with
    the observed cell shares, so each resample costs O(1) instead of O(n): 1,000 resamples of a
    million decisions take milliseconds. Resamples in which a metric is undefined are left out
    of its interval (`Interval.samples` says how many remained).
    """
    if bootstrap_samples < 0 or not 0 < confidence_level < 1:
        raise ValueError("bootstrap_samples must be >= 0 and confidence_level in (0, 1)")
    point = _values(t)
    reasons = _undefined_reasons(t)
    rows = int(t.sum())
    resampled: dict[str, np.ndarray] = {}
    if bootstrap_samples and rows:
        rng = np.random.default_rng(seed)
        draws = rng.multinomial(rows, t.ravel() / rows, size=bootstrap_samples).reshape(-1, 2, 2, 2)
        resampled = _values(draws)
    tail = (1 - confidence_level) / 2
    results = []
    for name in metrics:
        if reasons[name]:
            results.append(MetricValue(name, None, reasons[name]))
            continue
        interval = None
        if name in resampled:
            values = resampled[name][np.isfinite(resampled[name])]
            if values.size:
                lower, upper = np.quantile(values, [tail, 1 - tail])
                interval = Interval(float(lower), float(upper), confidence_level, int(values.size))
        results.append(MetricValue(name, float(point[name]), "", interval))
    return results


def four_fifths(results: list[MetricValue]) -> str:
    """PASS, FAIL (disparate impact below 0.8: adverse impact) or UNDEFINED."""
    impact = next(r for r in results if r.name == "disparate_impact")
    if impact.value is None:
        return "UNDEFINED"
    return "PASS" if impact.value >= FOUR_FIFTHS else "FAIL"
