"""The intent engine: its data, the low-confidence rule, and its published evaluation."""

import json

import numpy as np
import pytest

from services.classifiers import intent
from services.classifiers.intent import LABELS, IntentModel, predictions, read_examples
from tiermesh.kit.registry import ModelVersion, Registry, RegistryError


def test_the_data_has_every_label_a_fixed_split_and_no_leak():
    train_texts, train_labels = read_examples(intent.DATA / "train.jsonl")
    test_texts, test_labels = read_examples(intent.DATA / "test.jsonl")
    for label in LABELS:
        assert train_labels.count(label) + test_labels.count(label) >= 40, label
        assert test_labels.count(label) >= 10, label
    normalise = lambda text: " ".join(text.lower().split())  # noqa: E731
    assert not {normalise(t) for t in train_texts} & {normalise(t) for t in test_texts}


def test_below_the_threshold_the_answer_is_out_of_scope_with_its_low_confidence_visible():
    labels = ("refinancing", "credit_score", "out_of_scope")
    confident, unsure = predictions(np.array([[0.8, 0.15, 0.05], [0.35, 0.33, 0.32]]), labels, 0.4)
    assert (confident.label, confident.low_confidence) == ("refinancing", False)
    assert (unsure.label, unsure.low_confidence, unsure.probability) == ("out_of_scope", True, 0.35)
    assert [label for label, _ in unsure.candidates] == ["refinancing", "credit_score", "out_of_scope"]


def test_bad_training_lines_are_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "hi", "label": "loan_affordability"}) + "\n" + '{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2"):
        read_examples(path)
    path.write_text(json.dumps({"text": "hi", "label": "mortgages"}) + "\n")
    with pytest.raises(ValueError, match="mortgages"):
        read_examples(path)


@pytest.fixture(scope="module")
def model(classifier_models):
    loaded = IntentModel(classifier_models["intent"], Registry())
    yield loaded
    loaded.close()


def test_published_metrics_are_recomputed_from_the_held_out_split(model, classifier_models):
    recomputed = intent.evaluate(model, intent.DATA / "test.jsonl")
    assert recomputed == classifier_models["intent"].metadata["metrics"]
    assert recomputed["accuracy"] >= 0.90  # the target


@pytest.mark.parametrize(
    ("question", "label"),
    [
        ("Can I afford a $30k car loan if I take home $4,200 a month?", "loan_affordability"),
        ("Somebody took out a personal loan in my name, what do I do?", "fraud_dispute"),
        ("Who won the football game last night?", "out_of_scope"),
    ],
)
def test_clear_questions_get_their_label_and_a_top_three(model, question, label):
    (found,) = model.classify([question])
    assert found.label == label and not found.low_confidence
    assert len(found.candidates) == 3 and found.candidates[0][0] == label
    probabilities = model.probabilities([question])[0]
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_a_head_that_does_not_reproduce_its_probe_is_refused(classifier_models, tmp_path):
    version = classifier_models["intent"]
    parameters = dict(version.metadata["parameters"])
    parameters["probe"] = {**parameters["probe"], "probabilities": np.full((4, 14), 1 / 14).tolist()}
    with pytest.raises(RegistryError, match="probe"):
        IntentModel(ModelVersion(version.name, "9.9.9", version.path, {"parameters": parameters}), Registry())
