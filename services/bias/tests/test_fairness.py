"""Group fairness metrics: equal to AIF360's own implementation, undefined cases, intervals."""

import numpy as np
import pandas as pd
import pytest
from aif360.datasets import BinaryLabelDataset
from aif360.metrics import ClassificationMetric

from services.bias import fairness
from services.bias.fairness import Decisions, decisions, evaluate, four_fifths


def aif360_metrics(d: Decisions) -> dict[str, float]:
    frame = pd.DataFrame({"label": d.truth.astype(float), "group": d.privileged.astype(float)})
    truth = BinaryLabelDataset(df=frame, label_names=["label"], protected_attribute_names=["group"])
    predicted = truth.copy(deepcopy=True)
    predicted.labels = d.predicted.astype(float).reshape(-1, 1)
    metric = ClassificationMetric(
        truth, predicted, unprivileged_groups=[{"group": 0}], privileged_groups=[{"group": 1}]
    )
    return {name: float(getattr(metric, name)()) for name in fairness.METRICS}


def biased(rows: int, seed: int, penalty: float) -> Decisions:
    """Seeded decisions where the unprivileged group is approved `penalty` less often."""
    rng = np.random.default_rng(seed)
    privileged = (rng.random(rows) < 0.6).astype(int)
    truth = (rng.random(rows) < 0.7).astype(int)
    approve = np.clip(0.2 + 0.6 * truth - penalty * (1 - privileged), 0, 1)
    return decisions(truth, (rng.random(rows) < approve).astype(int), privileged)


@pytest.mark.parametrize(
    ("rows", "seed", "penalty"), [(200, 1, 0.0), (1_000, 2, 0.15), (5_000, 3, 0.3), (57, 4, 0.1)]
)
def test_every_metric_equals_aif360(rows, seed, penalty):
    d = biased(rows, seed, penalty)
    expected = aif360_metrics(d)
    got = {r.name: r.value for r in evaluate(d, bootstrap_samples=0)}
    for name in fairness.METRICS:
        assert got[name] == pytest.approx(expected[name], abs=1e-9), name


def test_an_injected_bias_is_detected_and_fails_the_four_fifths_rule():
    fair = evaluate(biased(4_000, 7, 0.0), bootstrap_samples=0)
    unfair = evaluate(biased(4_000, 7, 0.35), bootstrap_samples=0)
    assert four_fifths(fair) == "PASS" and four_fifths(unfair) == "FAIL"
    value = {r.name: r.value for r in unfair}
    assert value["disparate_impact"] < 0.8 and value["statistical_parity_difference"] < -0.2


def test_intervals_cover_the_estimate_shrink_with_more_data_and_repeat_for_a_seed():
    small = {r.name: r for r in evaluate(biased(300, 9, 0.2), bootstrap_samples=400, seed=1)}
    large = {r.name: r for r in evaluate(biased(30_000, 9, 0.2), bootstrap_samples=400, seed=1)}
    again = {r.name: r for r in evaluate(biased(300, 9, 0.2), bootstrap_samples=400, seed=1)}
    for name in fairness.METRICS:
        s, big = small[name], large[name]
        assert s.interval.lower <= s.value <= s.interval.upper, name
        assert (big.interval.upper - big.interval.lower) < (s.interval.upper - s.interval.lower) / 3, name
        assert again[name].interval == s.interval


def test_undefined_metrics_say_why_instead_of_crashing_or_returning_zero():
    # The privileged group is never approved, and the unprivileged group has no favourable truth.
    d = decisions(truth=[0, 0, 1, 1], predicted=[1, 0, 0, 0], privileged=[0, 0, 1, 1])
    results = {r.name: r for r in evaluate(d, bootstrap_samples=50)}
    assert results["disparate_impact"].value is None
    assert "privileged group has no favourable predictions" in results["disparate_impact"].undefined_reason
    assert results["equal_opportunity_difference"].value is None
    assert (
        "unprivileged rows with a favourable true label"
        in results["equal_opportunity_difference"].undefined_reason
    )
    assert results["statistical_parity_difference"].value == pytest.approx(0.5)
    assert four_fifths(list(results.values())) == "UNDEFINED"


@pytest.mark.parametrize(
    ("truth", "predicted", "privileged", "message"),
    [
        ([1, 0], [1], [0, 1], "lengths differ"),
        ([], [], [], "no decisions"),
        ([1, 2], [1, 0], [0, 1], "truth: values must be 0 or 1"),
        ([1, 0], [1, 0], [1, 1], "one group only"),
    ],
)
def test_bad_input_names_the_problem(truth, predicted, privileged, message):
    with pytest.raises(ValueError, match=message):
        decisions(truth, predicted, privileged)
