"""The bias-text rules: evidence, neutral mentions, the labelled sets, versions and their checks."""

import dataclasses
import json
import re
import shutil
import sys
from collections.abc import Iterator

import pytest

from services.bias import text
from services.bias.text import DATA, Rules, TextModel, evaluate, read_snippets
from tiermesh.kit.registry import METADATA, ModelVersion, RegistryError


@pytest.fixture(scope="module")
def rules() -> Rules:
    return Rules.read(DATA / text.RULES)


def basis(verdict: text.Verdict) -> set[str]:
    return {e.protected_class for e in verdict.evidence if e.used_as_basis}


def test_a_class_used_as_a_basis_is_flagged_with_its_span(rules):
    advice = "Your score is fine. As a single mother you should borrow less, maybe $150,000."
    verdict = rules.score(advice)
    assert verdict.flagged and verdict.score > 0.3 and verdict.threshold == 0.3
    assert basis(verdict) == {"marital_status", "sex"}
    found = next(e for e in verdict.evidence if e.protected_class == "marital_status")
    assert found.span == "single mother" and advice[found.start : found.end] == found.span
    assert "causal" in found.cues and "advice" in found.cues


@pytest.mark.parametrize(
    "advice",
    [
        "Lenders may not consider your marital status. Focus on your DTI and your score.",
        "Public assistance income such as SSI must be counted like any other income.",
        "Your age cannot be used against you; approval comes down to income and credit.",
        "ECOA prohibits discrimination based on race, color, religion or national origin.",
    ],
)
def test_a_neutral_mention_is_evidence_but_not_a_basis(rules, advice):
    verdict = rules.score(advice)
    assert verdict.evidence, "the mention is still reported"
    assert not verdict.flagged and verdict.score == 0
    assert all(e.cues == ("neutral",) and not e.used_as_basis for e in verdict.evidence)


def test_look_alikes_are_not_protected_references(rules):
    advice = (
        "The senior lien is paid first, your business is in the black, and the average age of "
        "your accounts is nine years; ask the senior loan officer about a white-label card."
    )
    assert rules.score(advice).evidence == ()


def test_the_same_class_in_a_stereotype_is_flagged_and_the_score_is_the_strongest(rules):
    verdict = rules.score("Women tend to overspend, so keep the card limit low. A man can go higher.")
    assert verdict.flagged and "stereotype" in verdict.evidence[0].cues
    assert verdict.score == max(e.strength for e in verdict.evidence) <= 1


def test_the_threshold_decides_the_flag_and_the_basis_marks(rules):
    advice = "Given your religion, I'd keep the mortgage modest."
    strength = rules.score(advice).score
    assert rules.score(advice, threshold=strength - 0.01).flagged
    higher = rules.score(advice, threshold=strength)
    assert not higher.flagged and not basis(higher)  # flagged only *above* the threshold


def test_the_labelled_sets_are_as_the_issue_asks():
    seen = set()
    for split in ("eval", "dev"):
        rows = read_snippets(DATA / f"{split}.jsonl")
        assert len({row["id"] for row in rows}) == len(rows)
        for row in rows:
            assert row["biased"] == bool(row["basis"]) and set(row["basis"]) <= set(row["classes"])
            assert set(row["classes"]) <= set(text.CLASSES), row["id"]
            assert row["text"] not in seen, f"{row['id']} repeats a text of another set"
            seen.add(row["text"])
    evaluation = read_snippets(DATA / "eval.jsonl")
    assert len(evaluation) >= 80
    neutral_mentions = [r for r in evaluation if r["classes"] and not r["biased"]]
    assert sum(r["biased"] for r in evaluation) >= 40 and len(neutral_mentions) >= 20


def test_metadata_figures_are_recomputed_from_the_labelled_sets(bias_text_model):
    rules = TextModel(bias_text_model).rules
    threshold = bias_text_model.metadata["parameters"]["threshold"]
    for split in ("eval", "dev"):
        recorded = bias_text_model.metadata["metrics"][split]
        assert evaluate(rules, DATA / f"{split}.jsonl", threshold) == recorded, split
    flag = bias_text_model.metadata["metrics"]["eval"]["flag"]
    assert flag["precision"] == flag["true_positives"] / (flag["true_positives"] + flag["false_positives"])


def test_evaluate_counts_flags_against_labels(tmp_path, rules):
    snippets = tmp_path / "set.jsonl"
    rows = [
        {"text": "As a woman you should borrow less.", "biased": True, "classes": ["sex"]},
        {"text": "Refinance when rates drop by a point.", "biased": True, "classes": []},
        {"text": "Keep utilisation under 30%.", "biased": False, "classes": []},
    ]
    snippets.write_text("\n".join(json.dumps(row) for row in rows))
    found = evaluate(rules, snippets)
    assert found["flag"]["true_positives"] == 1 and found["flag"]["false_negatives"] == 1
    assert found["flag"]["precision"] == 1.0 and found["flag"]["recall"] == 0.5
    assert found["class_mention_recall"] == {"sex": 1.0}


def _copy(version: ModelVersion, root) -> ModelVersion:
    shutil.copytree(version.path, root)
    return ModelVersion(version.name, version.version, root, json.loads((root / METADATA).read_text()))


def test_versions_whose_rules_changed_or_break_are_refused(tmp_path, bias_text_model):
    edited = _copy(bias_text_model, tmp_path / "edited")
    rules = json.loads((edited.path / text.RULES).read_text())
    rules["cues"]["advice"]["weight"] = 0.9  # changes the recorded probe scores
    (edited.path / text.RULES).write_text(json.dumps(rules))
    with pytest.raises(RegistryError, match="probe scored"):
        TextModel(edited)
    rules["classes"].pop("age")
    (edited.path / text.RULES).write_text(json.dumps(rules))
    with pytest.raises(RegistryError, match="classes: expected exactly"):
        TextModel(edited)
    rules["classes"]["age"] = ["(unclosed"]
    (edited.path / text.RULES).write_text(json.dumps(rules))
    with pytest.raises(RegistryError, match=r"classes\.age"):
        TextModel(edited)


class _Reading:
    """A compiled pattern that tallies how many characters its calls are given to read."""

    def __init__(self, pattern: re.Pattern[str], tally: list[int]) -> None:
        self.pattern, self.tally = pattern, tally

    def _read(self, string: str, pos: int, endpos: int) -> None:
        self.tally[0] += max(0, min(endpos, len(string)) - pos)

    def search(self, string: str, pos: int = 0, endpos: int = sys.maxsize) -> re.Match[str] | None:
        self._read(string, pos, endpos)
        return self.pattern.search(string, pos, endpos)

    def match(self, string: str, pos: int = 0, endpos: int = sys.maxsize) -> re.Match[str] | None:
        self._read(string, pos, endpos)
        return self.pattern.match(string, pos, endpos)

    def finditer(self, string: str, pos: int = 0, endpos: int = sys.maxsize) -> Iterator[re.Match[str]]:
        self._read(string, pos, endpos)
        return self.pattern.finditer(string, pos, endpos)


def _characters_read(text_: str) -> int:
    """Characters the rules' regular expressions are given while scoring `text_` (fresh rules)."""
    tally = [0]
    reading = Rules.read(DATA / text.RULES)
    reading.neutral = _Reading(reading.neutral, tally)
    reading.not_protected = _Reading(reading.not_protected, tally)
    reading.terms = {name: _Reading(pattern, tally) for name, pattern in reading.terms.items()}
    reading.cues = [dataclasses.replace(cue, pattern=_Reading(cue.pattern, tally)) for cue in reading.cues]
    reading._advice = [cue for cue in reading.cues if cue.scope == "sentence_and_next"]
    assert reading.score(text_).evidence
    return tally[0]


@pytest.mark.parametrize(
    "unit",
    [
        "women ",  # one long sentence of mentions: each used to reread the whole sentence
        "Women. ",  # many sentences: each mention used to reread every later one
        "senior lien men ",  # mentions among look-alikes: each used to be checked against them all
        "As a woman, you earn well. ",  # cues that send every mention looking through later sentences
    ],
)
def test_the_characters_read_grow_linearly_with_the_text(unit):
    short, long = _characters_read(unit * 250), _characters_read(unit * 1000)
    assert long <= 4.5 * short, (short, long)  # quadratic reading would be 16x


def test_a_16_kb_sentence_of_mentions_is_scored_and_the_mention_cap_holds(rules):
    crafted = "women " * 2730
    verdict = rules.score(crafted)
    assert len(verdict.evidence) == 2730 and verdict.unscored == 0
    assert {e.protected_class for e in verdict.evidence} == {"sex"} and not verdict.flagged
    capped = rules.score(crafted, max_mentions=100)
    assert capped.evidence == verdict.evidence[:100] and capped.unscored == 2630


def test_the_cap_scores_the_first_mentions_by_position(bias_text_model):
    model = TextModel(bias_text_model)
    advice = "As a woman you should borrow less. " + "Men and women alike qualify. " * 20
    full = model.score(advice)
    capped = model.score(advice, max_mentions=1)
    assert capped.evidence == full.evidence[:1] and capped.unscored == len(full.evidence) - 1
    assert capped.flagged and capped.score == full.evidence[0].strength
