"""Across two tiers: the credit model's exported hold-out decisions, measured by the bias tier's
fairness metrics, equal AIF360's own figures (tiers never import each other; this test sits above
both)."""

import pytest

from services.bias import fairness
from services.bias.fairness import decisions, evaluate
from services.bias.tests.test_fairness import aif360_metrics
from services.classifiers import credit


def test_the_credit_tiers_exported_decisions_equal_aif360(classifier_models):
    holdout = credit.read_holdout(classifier_models["credit"].artifact(credit.HOLDOUT_FILE))
    # Favourable = approved (prediction) and repaid (truth); men are the privileged group here.
    d = decisions(1 - holdout["defaulted"], holdout["approved"], (holdout["sex"] == "male").astype(int))
    expected = aif360_metrics(d)
    results = {r.name: r for r in evaluate(d, bootstrap_samples=200, seed=5)}
    for name in fairness.METRICS:
        assert results[name].value == pytest.approx(expected[name], abs=1e-9), name
    # The generator's income gap reaches the decisions through income: the metrics must see it.
    assert results["statistical_parity_difference"].value < 0
    assert results["statistical_parity_difference"].interval.upper < 0
