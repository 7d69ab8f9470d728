"""A/B read-out statistics, checked against closed forms, scipy and published values."""

from __future__ import annotations

import dataclasses
import math

import pytest
from scipy import integrate, optimize, stats

from tiermesh.control.abstats import (
    BayesReadout,
    bayes_binomial,
    frequentist_binomial,
    histogram_quantile,
    subtract_cumulative,
)

INF = math.inf


def _exact_prob_better(readout: BayesReadout) -> float:
    """P(p_t > p_c) by numerical integration: the integral of f_t(x) * F_c(x) over [0, 1]."""
    t, c = readout.treatment, readout.control
    value, _ = integrate.quad(
        lambda x: stats.beta.pdf(x, t.alpha, t.beta) * stats.beta.cdf(x, c.alpha, c.beta), 0, 1, limit=200
    )
    return value


def _exact_lift_quantile(readout: BayesReadout, level: float) -> float:
    """Quantile of p_t - p_c from its CDF P(p_t - p_c <= d) = integral of f_c(x) * F_t(x + d)."""
    t, c = readout.treatment, readout.control

    def cdf(d: float) -> float:
        value, _ = integrate.quad(
            lambda x: stats.beta.pdf(x, c.alpha, c.beta) * stats.beta.cdf(x + d, t.alpha, t.beta),
            0,
            1,
            limit=200,
        )
        return value - level

    return optimize.brentq(cdf, -1.0, 1.0, xtol=1e-6)


# --- bayes_binomial ---------------------------------------------------------------------------


def test_posteriors_are_the_conjugate_update_with_scipy_credible_intervals() -> None:
    readout = bayes_binomial(40, 100, 60, 100)
    assert (readout.control.alpha, readout.control.beta) == (41.0, 61.0)
    assert (readout.treatment.alpha, readout.treatment.beta) == (61.0, 41.0)
    assert readout.control.mean == pytest.approx(41 / 102)
    assert readout.treatment.mean == pytest.approx(61 / 102)
    assert readout.control.low == pytest.approx(stats.beta.ppf(0.025, 41, 61))
    assert readout.control.high == pytest.approx(stats.beta.ppf(0.975, 41, 61))
    assert readout.treatment.low == pytest.approx(stats.beta.ppf(0.025, 61, 41))
    assert readout.treatment.high == pytest.approx(stats.beta.ppf(0.975, 61, 41))


def test_custom_prior_is_added_to_the_counts() -> None:
    readout = bayes_binomial(3, 10, 0, 0, prior=(2.0, 5.0))
    assert (readout.control.alpha, readout.control.beta) == (5.0, 12.0)
    # No trials: the posterior is the prior.
    assert (readout.treatment.alpha, readout.treatment.beta) == (2.0, 5.0)
    assert readout.treatment.mean == pytest.approx(2 / 7)


def test_equal_arms_are_a_coin_flip() -> None:
    readout = bayes_binomial(50, 100, 50, 100)
    assert readout.prob_treatment_better == pytest.approx(0.5, abs=0.005)
    assert readout.lift_mean == pytest.approx(0.0, abs=0.001)
    assert readout.lift_low < 0 < readout.lift_high
    assert readout.lift_low == pytest.approx(-readout.lift_high, abs=0.003)


def test_clear_winner_and_its_mirror_images() -> None:
    winner = bayes_binomial(40, 100, 60, 100)
    assert winner.prob_treatment_better > 0.99
    assert winner.lift_low > 0

    swapped = bayes_binomial(60, 100, 40, 100)
    assert swapped.prob_treatment_better < 0.01
    assert swapped.lift_high < 0

    # For an error rate the same counts mean the treatment is worse.
    lower_is_better = bayes_binomial(40, 100, 60, 100, higher_is_better=False)
    assert lower_is_better.prob_treatment_better < 0.01
    # Same draws, so the two directions are complementary; the lift keeps its sign.
    assert lower_is_better.prob_treatment_better == pytest.approx(1 - winner.prob_treatment_better, abs=1e-12)
    assert lower_is_better.lift_mean == winner.lift_mean


@pytest.mark.parametrize(
    ("counts", "higher_is_better"),
    [((40, 100, 60, 100), True), ((12, 200, 19, 210), True), ((3, 30, 1, 25), False), ((0, 5, 1, 4), True)],
)
def test_probability_agrees_with_numerical_integration(
    counts: tuple[int, int, int, int], higher_is_better: bool
) -> None:
    readout = bayes_binomial(*counts, higher_is_better=higher_is_better)
    exact = _exact_prob_better(readout)
    expected = exact if higher_is_better else 1 - exact
    assert readout.prob_treatment_better == pytest.approx(expected, abs=0.005)


def test_lift_agrees_with_the_exact_distribution_of_the_difference() -> None:
    readout = bayes_binomial(12, 200, 19, 210)
    assert readout.lift_mean == pytest.approx(readout.treatment.mean - readout.control.mean, abs=0.001)
    assert readout.lift_low == pytest.approx(_exact_lift_quantile(readout, 0.025), abs=0.002)
    assert readout.lift_high == pytest.approx(_exact_lift_quantile(readout, 0.975), abs=0.002)


def test_same_seed_same_readout_other_seed_other_draws() -> None:
    first = bayes_binomial(12, 200, 19, 210, seed=7)
    assert bayes_binomial(12, 200, 19, 210, seed=7) == first
    other = bayes_binomial(12, 200, 19, 210, seed=8)
    assert other.lift_low != first.lift_low
    assert other.prob_treatment_better == pytest.approx(first.prob_treatment_better, abs=0.005)


def test_readouts_are_frozen() -> None:
    readout = bayes_binomial(1, 2, 1, 2, draws=1000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        readout.prob_treatment_better = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((-1, 10, 1, 10), {}, "successes_control"),
        ((1, -10, 1, 10), {}, "trials_control"),
        ((1, 10, -1, 10), {}, "successes_treatment"),
        ((1, 10, 1, -1), {}, "trials_treatment"),
        ((11, 10, 1, 10), {}, "successes_control: 11 exceeds trials_control"),
        ((1, 10, 5, 4), {}, "successes_treatment: 5 exceeds trials_treatment"),
        ((1, 10, 1, 10), {"prior": (0.0, 1.0)}, "prior"),
        ((1, 10, 1, 10), {"prior": (1.0, -2.0)}, "prior"),
        ((1, 10, 1, 10), {"prior": (math.nan, 1.0)}, "prior"),
        ((1, 10, 1, 10), {"draws": 999}, "draws"),
    ],
)
def test_bayes_rejects_bad_input(args: tuple[int, ...], kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bayes_binomial(*args, **kwargs)  # type: ignore[arg-type]


def test_fractional_counts_are_refused() -> None:
    with pytest.raises(TypeError, match="trials_control"):
        bayes_binomial(1, 2.5, 1, 2)  # type: ignore[arg-type]


# --- frequentist_binomial ---------------------------------------------------------------------


def test_z_test_matches_the_textbook_formula() -> None:
    # 60/100 vs 40/100: pooled p = 0.5, SE = sqrt(0.25 * 0.02), z = 0.2 / SE = 2 * sqrt(2),
    # and the two-sided p-value 2 * (1 - Phi(2 * sqrt(2))) = erfc(2).
    readout = frequentist_binomial(40, 100, 60, 100)
    assert readout.test == "two-proportion z-test"
    assert readout.statistic == pytest.approx(2 * math.sqrt(2))
    assert readout.p_value == pytest.approx(math.erfc(2.0))
    assert readout.difference == pytest.approx(0.2)

    swapped = frequentist_binomial(60, 100, 40, 100)
    assert swapped.statistic == pytest.approx(-2 * math.sqrt(2))
    assert swapped.p_value == pytest.approx(readout.p_value)
    assert swapped.difference == pytest.approx(-0.2)


def test_z_squared_is_the_uncorrected_chi_square() -> None:
    readout = frequentist_binomial(130, 1000, 165, 1100)
    chi2 = stats.chi2_contingency([[165, 935], [130, 870]], correction=False)
    assert readout.test == "two-proportion z-test"
    assert readout.statistic**2 == pytest.approx(chi2.statistic)
    assert readout.p_value == pytest.approx(chi2.pvalue)


def test_expected_count_of_exactly_five_still_uses_the_z_test() -> None:
    readout = frequentist_binomial(5, 10, 5, 10)
    assert readout.test == "two-proportion z-test"
    assert readout.statistic == 0.0
    assert readout.p_value == pytest.approx(1.0)


@pytest.mark.parametrize("counts", [(3, 10, 9, 10), (1, 40, 6, 45), (0, 12, 4, 15)])
def test_small_expected_counts_use_fisher(counts: tuple[int, int, int, int]) -> None:
    s_c, n_c, s_t, n_t = counts
    readout = frequentist_binomial(*counts)
    expected = stats.fisher_exact([[s_t, n_t - s_t], [s_c, n_c - s_c]], alternative="two-sided")
    assert readout.test == "Fisher exact test"
    assert readout.statistic == pytest.approx(expected.statistic)
    assert readout.p_value == pytest.approx(expected.pvalue)
    assert readout.difference == pytest.approx(s_t / n_t - s_c / n_c)


def test_fisher_odds_ratio_is_treatment_over_control() -> None:
    # Treatment odds 9/1, control odds 3/7: ratio 21.
    assert frequentist_binomial(3, 10, 9, 10).statistic == pytest.approx(21.0)


@pytest.mark.parametrize("counts", [(0, 10, 0, 20), (10, 10, 20, 20), (0, 1000, 0, 1000), (500, 500, 7, 7)])
def test_degenerate_tables_give_p_one_not_nan(counts: tuple[int, int, int, int]) -> None:
    readout = frequentist_binomial(*counts)
    assert readout.p_value == 1.0
    assert readout.difference == 0.0
    assert readout.low <= 0.0 <= readout.high


# Newcombe (1998), Statistics in Medicine 17:873-890, Table II, method 10. Arms are listed as in
# the paper, p1 - p2 with p1 the treatment here.
@pytest.mark.parametrize(
    ("treatment", "control", "low", "high"),
    [
        ((56, 70), (48, 80), 0.0524, 0.3339),
        ((9, 10), (3, 10), 0.1705, 0.8090),
        ((6, 7), (2, 7), 0.0582, 0.8062),
        ((5, 56), (0, 29), -0.0381, 0.1926),
        ((0, 10), (0, 20), -0.1611, 0.2775),
        ((0, 10), (0, 10), -0.2775, 0.2775),
        ((10, 10), (0, 20), 0.6791, 1.0000),
        ((10, 10), (0, 10), 0.6075, 1.0000),
    ],
)
def test_newcombe_interval_matches_the_published_table(
    treatment: tuple[int, int], control: tuple[int, int], low: float, high: float
) -> None:
    readout = frequentist_binomial(control[0], control[1], treatment[0], treatment[1])
    assert readout.difference == pytest.approx(treatment[0] / treatment[1] - control[0] / control[1])
    assert readout.low == pytest.approx(low, abs=5e-5)
    assert readout.high == pytest.approx(high, abs=5e-5)
    assert -1.0 <= readout.low <= readout.high <= 1.0


def test_newcombe_interval_is_built_from_scipy_wilson_intervals() -> None:
    s_c, n_c, s_t, n_t = 130, 1000, 165, 1100
    wt = stats.binomtest(s_t, n_t).proportion_ci(method="wilson")
    wc = stats.binomtest(s_c, n_c).proportion_ci(method="wilson")
    p_t, p_c = s_t / n_t, s_c / n_c
    readout = frequentist_binomial(s_c, n_c, s_t, n_t)
    assert readout.low == pytest.approx(p_t - p_c - math.hypot(p_t - wt.low, wc.high - p_c))
    assert readout.high == pytest.approx(p_t - p_c + math.hypot(wt.high - p_t, p_c - wc.low))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 0, 1, 10), "trials_control: no trials"),
        ((1, 10, 0, 0), "trials_treatment: no trials"),
        ((0, 0, 0, 0), "trials_control: no trials"),
        ((-1, 10, 1, 10), "successes_control"),
        ((1, 10, 1, -10), "trials_treatment"),
        ((1, 10, 11, 10), "successes_treatment: 11 exceeds"),
    ],
)
def test_frequentist_rejects_bad_input(args: tuple[int, int, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        frequentist_binomial(*args)


# --- histogram_quantile -----------------------------------------------------------------------

BOUNDS = [0.1, 0.5, 1.0, INF]
COUNTS = [10, 30, 45, 50]


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (0.0, 0.0),
        (0.05, 0.025),  # rank 2.5 of 10 in (0, 0.1]
        (0.2, 0.1),  # rank 10: the top of the first bucket
        (0.5, 0.4),  # rank 25, 15 of the 20 in (0.1, 0.5]: 0.1 + 0.4 * 0.75
        (0.75, 0.75),  # rank 37.5, 7.5 of the 15 in (0.5, 1]: 0.5 + 0.5 * 0.5
        (0.9, 1.0),  # rank 45: the top of the last finite bucket
        (0.95, 1.0),  # rank 47.5 falls into +Inf: the largest finite bound
        (1.0, 1.0),
    ],
)
def test_quantile_interpolates_inside_the_bucket(q: float, expected: float) -> None:
    assert histogram_quantile(q, BOUNDS, COUNTS) == pytest.approx(expected)


def test_quantile_with_a_non_positive_first_bound() -> None:
    bounds, counts = (-1.0, 0.0, 1.0, INF), (4, 6, 10, 10)
    # The first bucket has no lower edge: its upper bound is the answer.
    assert histogram_quantile(0.25, bounds, counts) == -1.0
    # rank 5: one of the two in (-1, 0].
    assert histogram_quantile(0.5, bounds, counts) == pytest.approx(-0.5)
    # rank 8: two of the four in (0, 1].
    assert histogram_quantile(0.8, bounds, counts) == pytest.approx(0.5)


def test_quantile_skips_empty_leading_buckets() -> None:
    bounds, counts = [1.0, 2.0, 4.0, INF], [0, 0, 4, 4]
    assert histogram_quantile(0.0, bounds, counts) == 2.0
    assert histogram_quantile(0.5, bounds, counts) == pytest.approx(3.0)


def test_everything_in_the_inf_bucket() -> None:
    assert histogram_quantile(0.5, [0.25, 1.0, INF], [0, 0, 9]) == 1.0


@pytest.mark.parametrize("q", [0.0, 0.5, 1.0])
def test_empty_histogram_has_no_quantile(q: float) -> None:
    assert histogram_quantile(q, BOUNDS, [0, 0, 0, 0]) is None


@pytest.mark.parametrize(
    ("q", "bounds", "counts", "match"),
    [
        (-0.1, BOUNDS, COUNTS, "q:"),
        (1.1, BOUNDS, COUNTS, "q:"),
        (math.nan, BOUNDS, COUNTS, "q:"),
        (0.5, BOUNDS, COUNTS[:-1], "lengths differ"),
        (0.5, [INF], [3], "at least one finite bucket"),
        (0.5, [0.1, 0.5, 1.0, 2.0], COUNTS, "last bound must be math.inf"),
        (0.5, [0.5, 0.1, 1.0, INF], COUNTS, r"bounds: must increase \(bounds\[1\]"),
        (0.5, [0.1, 0.1, 1.0, INF], COUNTS, "bounds: must increase"),
        (0.5, BOUNDS, [10, 30, 20, 50], r"cumulative: counts must not decrease \(cumulative\[2\]"),
        (0.5, BOUNDS, [-1, 30, 45, 50], "cumulative: counts must not be negative"),
    ],
)
def test_quantile_rejects_bad_input(q: float, bounds: list[float], counts: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        histogram_quantile(q, bounds, counts)


# --- subtract_cumulative ----------------------------------------------------------------------


def test_window_is_the_difference_of_two_scrapes() -> None:
    assert subtract_cumulative([15, 40, 60, 70], [5, 10, 15, 20]) == [10, 30, 45, 50]
    assert subtract_cumulative([3, 3], [3, 3]) == [0, 0]


def test_a_counter_reset_keeps_the_later_scrape() -> None:
    assert subtract_cumulative([1, 2, 3], [5, 6, 7]) == [1, 2, 3]
    # One bucket going down is enough to tell the process restarted.
    assert subtract_cumulative([5, 6, 6], [1, 2, 7]) == [5, 6, 6]


def test_window_feeds_the_quantile() -> None:
    window = subtract_cumulative([15, 40, 60, 70], [5, 10, 15, 20])
    assert histogram_quantile(0.5, BOUNDS, window) == pytest.approx(0.4)


def test_subtract_rejects_different_lengths() -> None:
    with pytest.raises(ValueError, match="lengths differ"):
        subtract_cumulative([1, 2, 3], [1, 2])
