"""Statistics behind A/B experiment read-outs between a control and a treatment arm.

Two views of the same binomial outcome (success rate, error rate) are offered, so a read-out
can show both: a Bayesian one (`bayes_binomial`: probability that the treatment is better and a
credible interval of the lift) and a frequentist one (`frequentist_binomial`: two-sided p-value
and a confidence interval of the difference). Latency arms are compared through their
Prometheus histograms: `subtract_cumulative` turns two scrapes into the counts of a window and
`histogram_quantile` reads a quantile from them exactly as PromQL would, so the numbers match
the dashboards.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

# Two-sided 95%: every interval in this module is a 95% one.
_LEVEL = 0.95
_TAIL = (1.0 - _LEVEL) / 2.0
_Z = float(stats.norm.ppf(1.0 - _TAIL))
# Below this expected cell count the normal approximation of the z-test is not trusted.
_MIN_EXPECTED = 5.0
_MIN_DRAWS = 1000


@dataclass(frozen=True)
class Posterior:
    """Beta posterior of one arm's success probability, with its 95% equal-tailed credible interval."""

    alpha: float
    beta: float
    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class BayesReadout:
    """Bayesian comparison of the arms.

    `prob_treatment_better` honours `higher_is_better`; the lift is always p_treatment - p_control,
    so its sign reads the same way whatever the metric.
    """

    control: Posterior
    treatment: Posterior
    prob_treatment_better: float
    lift_mean: float
    lift_low: float
    lift_high: float


@dataclass(frozen=True)
class FrequentistReadout:
    """Frequentist comparison of the arms; `difference`, `low` and `high` are p_treatment - p_control."""

    test: str
    statistic: float
    p_value: float
    difference: float
    low: float
    high: float


def _count(name: str, value: int) -> int:
    """The count as an int, so floats such as 3.5 are refused instead of silently truncated."""
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: must be an integer (got {value!r})") from None
    if number < 0:
        raise ValueError(f"{name}: must not be negative (got {number})")
    return number


def _arm(arm: str, successes: int, trials: int) -> tuple[int, int]:
    """Validated (successes, trials) of one arm; errors name the argument as the caller spelled it."""
    s = _count(f"successes_{arm}", successes)
    n = _count(f"trials_{arm}", trials)
    if s > n:
        raise ValueError(f"successes_{arm}: {s} exceeds trials_{arm} ({n})")
    return s, n


def _posterior(successes: int, trials: int, prior: tuple[float, float]) -> Posterior:
    """Conjugate update: Beta(a, b) prior plus binomial data gives Beta(a + s, b + n - s)."""
    alpha = prior[0] + successes
    beta = prior[1] + trials - successes
    low, high = stats.beta.ppf([_TAIL, 1.0 - _TAIL], alpha, beta)
    return Posterior(alpha=alpha, beta=beta, mean=alpha / (alpha + beta), low=float(low), high=float(high))


def bayes_binomial(
    successes_control: int,
    trials_control: int,
    successes_treatment: int,
    trials_treatment: int,
    *,
    higher_is_better: bool = True,
    prior: tuple[float, float] = (1.0, 1.0),
    draws: int = 200_000,
    seed: int = 0,
) -> BayesReadout:
    """Beta-Binomial read-out; the probability and the lift come from one seeded Monte Carlo sample.

    Sampling (rather than a closed form) gives the lift's interval from the same draws as the
    probability, and the fixed seed keeps a dashboard's number from flickering between refreshes.
    Set `higher_is_better=False` for metrics such as error rates.
    """
    s_c, n_c = _arm("control", successes_control, trials_control)
    s_t, n_t = _arm("treatment", successes_treatment, trials_treatment)
    if len(prior) != 2 or not all(math.isfinite(p) and p > 0 for p in prior):
        raise ValueError(f"prior: needs two positive, finite Beta parameters (got {prior!r})")
    if draws < _MIN_DRAWS:
        raise ValueError(f"draws: must be at least {_MIN_DRAWS} (got {draws})")

    control = _posterior(s_c, n_c, prior)
    treatment = _posterior(s_t, n_t, prior)
    rng = np.random.default_rng(seed)
    p_control = rng.beta(control.alpha, control.beta, size=draws)
    p_treatment = rng.beta(treatment.alpha, treatment.beta, size=draws)
    lift = p_treatment - p_control
    better = lift > 0 if higher_is_better else lift < 0
    lift_low, lift_high = np.quantile(lift, [_TAIL, 1.0 - _TAIL])
    return BayesReadout(
        control=control,
        treatment=treatment,
        prob_treatment_better=float(np.mean(better)),
        lift_mean=float(np.mean(lift)),
        lift_low=float(lift_low),
        lift_high=float(lift_high),
    )


def _wilson(successes: int, trials: int) -> tuple[float, float]:
    """Wilson score interval: unlike the Wald one it stays inside [0, 1] and is not empty at 0 or n."""
    z2 = _Z * _Z
    denominator = trials + z2
    centre = (successes + z2 / 2.0) / denominator
    half = _Z * math.sqrt(successes * (trials - successes) / trials + z2 / 4.0) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _newcombe(s_t: int, n_t: int, s_c: int, n_c: int) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10) of p_t - p_c, which keeps its coverage at 0 or n."""
    p_t, p_c = s_t / n_t, s_c / n_c
    low_t, high_t = _wilson(s_t, n_t)
    low_c, high_c = _wilson(s_c, n_c)
    difference = p_t - p_c
    low = difference - math.hypot(p_t - low_t, high_c - p_c)
    high = difference + math.hypot(high_t - p_t, p_c - low_c)
    return max(-1.0, low), min(1.0, high)


def frequentist_binomial(
    successes_control: int, trials_control: int, successes_treatment: int, trials_treatment: int
) -> FrequentistReadout:
    """Two-sided test of equal rates, with a Newcombe confidence interval of the difference.

    The pooled z-test is used while every expected cell of the 2x2 table is at least 5; below
    that its normal approximation is poor and Fisher's exact test is used instead (its
    statistic is the odds ratio of treatment over control). A table whose arms are both all
    failures or both all successes has an expected cell of 0, so it always goes to Fisher,
    which gives p = 1 there.
    """
    s_c, n_c = _arm("control", successes_control, trials_control)
    s_t, n_t = _arm("treatment", successes_treatment, trials_treatment)
    if n_c == 0:
        raise ValueError("trials_control: no trials")
    if n_t == 0:
        raise ValueError("trials_treatment: no trials")

    table = np.array([[s_t, n_t - s_t], [s_c, n_c - s_c]], dtype=float)
    total = n_t + n_c
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / total
    if expected.min() < _MIN_EXPECTED:
        test = "Fisher exact test"
        result = stats.fisher_exact(table.astype(int), alternative="two-sided")
        statistic, p_value = float(result.statistic), float(result.pvalue)
    else:
        test = "two-proportion z-test"
        pooled = (s_t + s_c) / total
        variance = pooled * (1.0 - pooled) * (1.0 / n_t + 1.0 / n_c)
        if variance > 0:
            statistic = (s_t / n_t - s_c / n_c) / math.sqrt(variance)
            p_value = float(2.0 * stats.norm.sf(abs(statistic)))
        else:  # Both arms identical at 0 or 1: nothing to tell apart.
            statistic, p_value = 0.0, 1.0
    # A p-value is never reported as nan, nor (through rounding in scipy) above 1.
    p_value = 1.0 if math.isnan(p_value) else min(p_value, 1.0)
    low, high = _newcombe(s_t, n_t, s_c, n_c)
    return FrequentistReadout(
        test=test, statistic=statistic, p_value=p_value, difference=s_t / n_t - s_c / n_c, low=low, high=high
    )


def histogram_quantile(q: float, bounds: Sequence[float], cumulative: Sequence[float]) -> float | None:
    """The q-quantile of a Prometheus histogram, computed the way PromQL's `histogram_quantile` does.

    `bounds` are the buckets' `le` labels in increasing order, ending with math.inf, and
    `cumulative` their counts. The value is interpolated linearly inside its bucket (the first
    bucket starts at 0, or is returned as its upper bound when that is <= 0); a quantile in the
    +Inf bucket is the largest finite bound. Returns None for an empty histogram, where PromQL
    gives NaN. Unlike PromQL, which would give NaN when q == 0 and the first bucket is empty,
    q == 0 gives the lower edge of the first non-empty bucket.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q: must be within [0, 1] (got {q!r})")
    if len(bounds) != len(cumulative):
        raise ValueError(f"bounds, cumulative: lengths differ ({len(bounds)} and {len(cumulative)})")
    if len(bounds) < 2:
        raise ValueError("bounds: needs at least one finite bucket before the +Inf one")
    if bounds[-1] != math.inf:
        raise ValueError(f"bounds: the last bound must be math.inf (got {bounds[-1]!r})")
    for i in range(1, len(bounds)):
        if not bounds[i] > bounds[i - 1]:
            raise ValueError(f"bounds: must increase (bounds[{i}] = {bounds[i]!r} after {bounds[i - 1]!r})")
    if not cumulative[0] >= 0:
        raise ValueError(f"cumulative: counts must not be negative (got {cumulative[0]!r})")
    for i in range(1, len(cumulative)):
        if not cumulative[i] >= cumulative[i - 1]:
            raise ValueError(
                f"cumulative: counts must not decrease "
                f"(cumulative[{i}] = {cumulative[i]!r} after {cumulative[i - 1]!r})"
            )

    observations = cumulative[-1]
    if observations == 0:
        return None
    rank = q * observations
    # First bucket holding the rank; requiring a count > 0 only matters for q == 0 (see above).
    b = next(i for i, count in enumerate(cumulative) if count >= rank and count > 0)
    if b == len(bounds) - 1:
        return float(bounds[-2])
    if b == 0:
        if bounds[0] <= 0:
            return float(bounds[0])
        start, below = 0.0, 0.0
    else:
        start, below = float(bounds[b - 1]), float(cumulative[b - 1])
    in_bucket = cumulative[b] - below
    return start + (bounds[b] - start) * ((rank - below) / in_bucket)


def subtract_cumulative(later: Sequence[float], earlier: Sequence[float]) -> list[float]:
    """Bucket counts observed between two scrapes of the same histogram.

    Prometheus counters only grow, so a bucket that went down means the process restarted and
    its counters began again from zero: then everything in `later` was counted after the reset,
    and `later` itself is the best estimate of the window (as PromQL's `increase` assumes).
    """
    if len(later) != len(earlier):
        raise ValueError(f"later, earlier: lengths differ ({len(later)} and {len(earlier)})")
    if any(new < old for new, old in zip(later, earlier, strict=True)):
        return list(later)
    return [new - old for new, old in zip(later, earlier, strict=True)]
