"""A/B logic without a mesh: weight parsing, per-arm windows, experiment read-outs, rollout guards."""

import math

import pytest

from tiermesh.control.armstats import ArmCounts, window
from tiermesh.control.experiment import Experiment, Feedback, arm_of_answer, assess, classify_feedback
from tiermesh.control.rollout import Guard, parse_duration, parse_steps
from tiermesh.control.traffic import TrafficError, parse_assignment

BOUNDS = (1.0, 10.0, 100.0, math.inf)


def counts(requests: int, failures: int = 0, p: tuple[float, ...] = (0.0, 0.5, 1.0, 1.0)) -> ArmCounts:
    """An arm with `requests` calls whose latencies fall into BOUNDS as the cumulative shares `p`."""
    return ArmCounts(
        requests, failures, tuple((b, share * requests) for b, share in zip(BOUNDS, p, strict=True))
    )


@pytest.mark.parametrize(
    ("text", "treatment"), [("treatment=10", 10.0), ("control=80", 20.0), ("TREATMENT = 0.25", 0.25)]
)
def test_a_weight_names_an_arm_and_a_percentage(text, treatment):
    assert parse_assignment(text) == pytest.approx(treatment)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("treatment=150", "from 0 to 100"),
        ("treatment=-1", "from 0 to 100"),
        ("treatment=nan", "from 0 to 100"),
        ("treatment=ten", "expected a percentage"),
        ("treatment=0.001", "steps of 0.01"),
        ("canary=5", "expected treatment=<percent>"),
        ("10", "expected treatment=<percent>"),
    ],
)
def test_bad_weights_are_refused_with_the_reason(text, message):
    with pytest.raises(TrafficError, match=message):
        parse_assignment(text)


def test_a_window_is_the_later_counts_minus_the_earlier():
    earlier = {"control": counts(100, 1), "treatment": counts(10)}
    later = {"control": counts(300, 3), "treatment": counts(50, 5)}
    got = window(later, earlier)
    assert (got["control"].requests, got["control"].failures) == (200, 2)
    assert (got["treatment"].requests, got["treatment"].failures) == (40, 5)
    assert got["control"].envoy_ms[-1] == (math.inf, 200.0)


def test_counters_that_went_down_mean_a_restart_and_the_later_counts_are_the_window():
    got = counts(30, 1).minus(counts(100, 2))
    assert (got.requests, got.failures) == (30, 1)


def test_quantiles_come_from_the_histogram_like_promql():
    arm = counts(100)  # half of the calls under 10 ms, the rest under 100 ms
    assert arm.envoy_quantile(0.5) == pytest.approx(10.0)
    assert arm.envoy_quantile(0.95) == pytest.approx(10.0 + 90.0 * 0.9)
    assert ArmCounts().envoy_quantile(0.5) is None


def test_experiment_records_survive_the_store_round_trip():
    experiment = Experiment("llm", "x", 1.0, "1000-0", {"control": counts(5)}, 10.0)
    assert Experiment.from_json(experiment.to_json()) == experiment


@pytest.mark.parametrize(
    ("entry", "kind"),
    [
        ({"rating": "1.0", "outcome": ""}, "good"),
        ({"rating": "-0.5", "outcome": ""}, "bad"),
        ({"rating": "0.0", "outcome": ""}, "neutral"),
        ({"rating": "", "outcome": "defaulted"}, "bad"),
        ({"rating": "-1.0", "outcome": "repaid"}, "good"),  # what happened beats what was felt
        ({"rating": "", "outcome": "other"}, "neutral"),
    ],
)
def test_feedback_is_good_bad_or_neutral(entry, kind):
    assert classify_feedback(entry) == kind


def test_feedback_is_attributed_to_the_arm_that_answered():
    entry = {"versions": '[{"tier": "llm", "arm": "treatment"}, {"tier": "bias", "arm": "control"}]'}
    assert arm_of_answer(entry, "llm") == "treatment"
    assert arm_of_answer(entry, "bias") == "control"
    assert arm_of_answer(entry, "retriever") is None
    assert arm_of_answer({"versions": "not json"}, "llm") is None


def _assess(arms, feedback, **options):
    experiment = Experiment("llm", "x", 1.0, "1000-0", {}, 10.0)
    settings = {"confidence": 0.95, "min_feedback": 30, "max_p95_ratio": 1.5, **options}
    return assess(experiment, arms, feedback, **settings)


def test_a_clearly_better_treatment_is_promoted():
    report = _assess(
        {"control": counts(1000), "treatment": counts(1000)},
        {"control": Feedback(good=40, bad=60), "treatment": Feedback(good=70, bad=30)},
    )
    assert report.recommendation == "PROMOTE", report.reasons
    assert report.satisfaction.bayes.prob_treatment_better > 0.99
    assert report.satisfaction.frequentist.p_value < 0.001


def test_a_treatment_users_rate_worse_keeps_the_control():
    report = _assess(
        {"control": counts(1000), "treatment": counts(1000)},
        {"control": Feedback(good=70, bad=30), "treatment": Feedback(good=40, bad=60)},
    )
    assert report.recommendation == "KEEP_CONTROL"
    assert "rate treatment worse" in report.reasons[0]


def test_a_failing_treatment_keeps_the_control_whatever_the_feedback():
    report = _assess(
        {"control": counts(1000, 2), "treatment": counts(1000, 80)},
        {"control": Feedback(good=40, bad=60), "treatment": Feedback(good=70, bad=30)},
    )
    assert report.recommendation == "KEEP_CONTROL"
    assert "fails more often" in report.reasons[0]


def test_a_slow_treatment_keeps_the_control():
    fast = counts(1000, p=(0.5, 1.0, 1.0, 1.0))  # p95 9.1 ms
    slow = counts(1000, p=(0.0, 0.5, 1.0, 1.0))  # p95 91 ms
    report = _assess({"control": fast, "treatment": slow}, {})
    assert report.recommendation == "KEEP_CONTROL"
    assert "p95" in report.reasons[0]


def test_too_little_feedback_continues_and_says_what_is_missing():
    report = _assess(
        {"control": counts(1000), "treatment": counts(100)},
        {"control": Feedback(good=8, bad=2), "treatment": Feedback(good=9, bad=1)},
    )
    assert report.recommendation == "CONTINUE"
    assert "30 per arm needed" in report.reasons[0]


@pytest.mark.parametrize(
    ("treatment", "control", "breached"),
    [
        (counts(100, 5), counts(100, 2), "error rate 5.00%"),  # 5% > 2 x 2%
        (counts(100, 3), counts(100, 2), None),  # 3% <= 4%
        (counts(100, 1), counts(100, 0), "error rate 1.00%"),  # any error beats a clean control
        (counts(10, 10), counts(100, 0), None),  # too few treatment calls to judge
        (counts(100, p=(0.0, 0.5, 1.0, 1.0)), counts(100, p=(0.5, 1.0, 1.0, 1.0)), "p95 91.0 ms"),
    ],
)
def test_the_rollout_guard(treatment, control, breached):
    reason = Guard(max_error_ratio=2.0, max_p95_ratio=1.5, min_requests=20).breach(treatment, control)
    assert (reason is None) if breached is None else (breached in reason)


def test_rollout_steps_and_holds_are_checked():
    assert parse_steps("5, 20,50,100") == [5, 20, 50, 100]
    assert parse_duration("90") == 90 and parse_duration("2m") == 120 and parse_duration("1h") == 3600
    for bad in ("", "20,5", "0,50", "5,150", "5,x"):
        with pytest.raises(TrafficError, match="--steps"):
            parse_steps(bad)
    for bad in ("soon", "-5s", "30d"):
        with pytest.raises(TrafficError, match="--hold"):
            parse_duration(bad)
