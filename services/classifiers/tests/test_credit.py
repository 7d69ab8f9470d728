"""The credit-risk engine: contributions that add up, bands, the audit export, published metrics."""

import math

import numpy as np
import pytest

from services.classifiers import credit, synthetic
from services.classifiers.credit import CreditModel
from tiermesh.kit.registry import ModelVersion, RegistryError


@pytest.fixture(scope="module")
def model(classifier_models):
    return CreditModel(classifier_models["credit"])


def application(**changes):
    values = {
        "annual_income": 72_000.0, "loan_amount": 15_000.0, "term_months": 36, "debt_to_income": 0.22,
        "credit_score": 720, "employment_years": 6.0, "delinquencies_2y": 0, "credit_utilization": 0.25,
        "open_accounts": 7,
    }  # fmt: skip
    values.update(changes)
    return np.array([[float(values[name]) for name in credit.FEATURES]])


def test_contributions_and_base_value_add_up_to_the_log_odds(model):
    (score,) = model.score(application())
    log_odds = score.base_value + sum(c.contribution for c in score.contributions)
    assert math.isclose(1 / (1 + math.exp(-log_odds)), score.default_probability, rel_tol=1e-5)
    magnitudes = [abs(c.contribution) for c in score.contributions]
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert {c.feature for c in score.contributions} == set(credit.FEATURES)


def test_a_riskier_applicant_scores_higher(model):
    (safe,) = model.score(application())
    (risky,) = model.score(
        application(credit_score=560, debt_to_income=0.55, delinquencies_2y=4, credit_utilization=0.95)
    )
    assert risky.default_probability > safe.default_probability
    assert credit.BANDS.index(risky.band) > credit.BANDS.index(safe.band)


def test_bands_follow_the_version_cut_offs(model):
    assert [model.band(p) for p in (0.0, 0.079, 0.08, 0.3, 0.5, 1.0)] == [
        "LOW", "LOW", "MEDIUM", "HIGH", "VERY_HIGH", "VERY_HIGH",
    ]  # fmt: skip


def test_the_protected_attribute_is_exported_for_audit_but_never_a_feature(model, classifier_models):
    version = classifier_models["credit"]
    assert synthetic.PROTECTED_ATTRIBUTE not in model.features
    assert synthetic.PROTECTED_ATTRIBUTE not in model.booster.feature_names
    holdout = credit.read_holdout(version.artifact(credit.HOLDOUT_FILE))
    assert set(holdout[synthetic.PROTECTED_ATTRIBUTE]) == {"female", "male"}
    assert set(holdout["approved"]) == {0, 1}


def test_published_metrics_are_recomputed_from_the_held_out_file(model, classifier_models):
    version = classifier_models["credit"]
    holdout = credit.read_holdout(version.artifact(credit.HOLDOUT_FILE))
    recomputed = credit.evaluate(model, holdout)
    assert recomputed == version.metadata["metrics"]
    assert recomputed["roc_auc"] >= 0.80


def test_a_corrupt_model_file_is_refused(classifier_models, tmp_path):
    version = classifier_models["credit"]
    (tmp_path / credit.MODEL_FILE).write_text('{"learner": "truncated')
    with pytest.raises(RegistryError, match="unreadable"):
        CreditModel(ModelVersion(version.name, "9.9.9", tmp_path, version.metadata))
