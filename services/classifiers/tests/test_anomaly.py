"""The anomaly engine: the NumPy forest scores exactly as scikit-learn, and its published metrics."""

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from services.classifiers import anomaly
from services.classifiers.anomaly import AnomalyModel, Forest
from tiermesh.kit.registry import ModelVersion, RegistryError


@pytest.mark.parametrize("max_features", [1.0, 0.5])
def test_the_exported_forest_scores_exactly_as_scikit_learn(max_features):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(2_000, 6))
    fitted = IsolationForest(n_estimators=50, max_samples=128, max_features=max_features, random_state=1)
    fitted.fit(train)
    queries = np.vstack([rng.normal(size=(300, 6)), rng.normal(loc=4, size=(20, 6))])
    expected = -fitted.score_samples(queries)  # scikit-learn returns the paper's score negated
    np.testing.assert_allclose(Forest.from_sklearn(fitted).score(queries), expected, rtol=1e-12)


def test_features_encode_hour_on_a_circle_and_category_one_hot():
    categories = ("groceries", "travel")
    rows = anomaly.features(
        np.array([10.0, 10.0]), np.array([23, 0]), np.array(["travel", "groceries"]),
        np.array([10.0, 10.0]), np.array([0, 3]), categories,
    )  # fmt: skip
    assert rows.shape == (2, len(anomaly.NUMERIC_FEATURES) + 2)
    assert np.linalg.norm(rows[0, 1:3] - rows[1, 1:3]) < 0.3  # 23:00 is next to midnight
    assert rows[0, 3] == 0.0  # the usual amount
    assert list(rows[:, 5:].argmax(axis=1)) == [1, 0]


@pytest.fixture(scope="module")
def model(classifier_models):
    return AnomalyModel(classifier_models["anomaly"])


def test_published_metrics_are_recomputed_from_the_held_out_file(model, classifier_models):
    version = classifier_models["anomaly"]
    holdout = anomaly.read_holdout(version.artifact(anomaly.HOLDOUT_FILE))
    recomputed = anomaly.evaluate(model, holdout)
    published = version.metadata["metrics"]
    assert {key: published[key] for key in recomputed} == recomputed
    assert published["calibration_false_positive_rate"] <= anomaly.MAX_FALSE_POSITIVE_RATE
    assert recomputed["anomalies"] > 0 and recomputed["detection_rate"] > 0.5


def test_an_extreme_transaction_is_an_anomaly_and_an_ordinary_one_is_not(model):
    assert (
        model.score(
            amount=42.0, hour=13, category="groceries", usual_amount=45.0, transactions_24h=2
        ).is_anomaly
        is False
    )
    wild = model.score(amount=9_000.0, hour=3, category="electronics", usual_amount=40.0, transactions_24h=35)
    assert wild.is_anomaly and wild.score > model.threshold


def test_a_corrupt_forest_is_refused(classifier_models, tmp_path):
    version = classifier_models["anomaly"]
    copy = tmp_path / "copy"
    copy.mkdir()
    stored = dict(np.load(version.artifact(anomaly.FOREST_FILE)))
    stored["threshold"] = stored["threshold"] + 0.5
    np.savez(copy / anomaly.FOREST_FILE, **stored)
    with pytest.raises(RegistryError, match="probe"):
        AnomalyModel(ModelVersion(version.name, "9.9.9", copy, version.metadata))
