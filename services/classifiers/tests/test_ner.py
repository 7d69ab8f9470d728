"""The NER engine: money and account rules, span merging, and its published evaluation."""

import itertools

import pytest

from services.classifiers import ner
from services.classifiers.ner import EntityModel, mask_account, parse_money


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$25k", (25_000.0, "USD")),
        ("$1,200.50", (1_200.5, "USD")),
        ("1.2 million dollars", (1_200_000.0, "USD")),
        ("€300", (300.0, "EUR")),
        ("USD 5,000", (5_000.0, "USD")),
        ("150 bucks", (150.0, "USD")),
        ("£2.5K", (2_500.0, "GBP")),
        ("4,000", (4_000.0, "CAD")),  # no currency in the text: the default
    ],
)
def test_amounts_are_normalised(text, expected):
    assert parse_money(text, "CAD") == expected


def test_unreadable_amounts_are_not_guessed():
    assert parse_money("five hundred dollars", "USD") is None


def test_account_numbers_keep_only_their_last_four_digits():
    assert mask_account("4111 1111 1111 1234") == "**** **** **** 1234"
    assert mask_account("123456789012") == "********9012"
    assert mask_account("4821") == "4821"


def test_amounts_and_account_numbers_found_in_ordinary_text():
    text = (
        "Borrow $1,200.50 or 2.5 million dollars, USD 5,000, 150 bucks, €300, 1,234,567 dollars, "
        "5,10 euros and 25k USD"
    )
    assert [m.group() for m in ner.MONEY_PATTERN.finditer(text)] == [
        "$1,200.50", "2.5 million dollars", "USD 5,000", "150 bucks", "€300", "1,234,567 dollars",
        "10 euros", "25k USD",
    ]  # fmt: skip
    text = "account: #12345, acct no. 7654321, ending in 4821, card 4111 1111 1111 1234 and 123456789012"
    assert [[m.group(p.groups and 1) for m in p.finditer(text)] for p in ner.ACCOUNT_PATTERNS] == [
        ["4111 1111 1111 1234"],
        ["123456789012"],
        ["12345", "7654321"],
        ["4821"],
    ]


# Each of these took from seconds to hours: every digit (or space) of a long run was a start from
# which the rest of the run was read again, and read again after every failure.
LONG_RUNS = [
    ("Can I borrow " + "9" * 2_000 + "?", []),
    ("I owe " + "9" * 100_000 + " dollars", ["9" * 100_000 + " dollars"]),
    ("I owe " + "9" * 100_000 + " and more", []),
    ("Total " + ",".join(["123"] * 25_000) + " dollars", [",".join(["123"] * 25_000) + " dollars"]),
    ("Total " + ",".join(["123"] * 25_000) + " in all", []),
    ("$" + "1" * 100_000 + ".5 million", ["$" + "1" * 100_000 + ".5 million"]),
]


@pytest.mark.parametrize(
    ("text", "amounts"), LONG_RUNS, ids=["2k", "100k", "100k-none", "groups", "groups-none", "$"]
)
def test_money_in_long_digit_runs_is_found_in_one_pass(text, amounts):
    assert [m.group() for m in ner.MONEY_PATTERN.finditer(text)] == amounts


@pytest.mark.parametrize(("tail", "found"), [("12345", ["12345"]), ("is overdrawn", [])])
def test_account_numbers_after_a_long_run_of_spaces_are_found_in_one_pass(tail, found):
    # 2,000 spaces and no number took 50 s (three optional runs of spaces backtracked cubically).
    text = "My account" + " " * 100_000 + tail
    assert [m.group(1) for m in ner.ACCOUNT_PATTERNS[2].finditer(text)] == found


@pytest.fixture(scope="module")
def model(classifier_models):
    loaded = EntityModel(classifier_models["ner"])
    yield loaded
    loaded.close()


def spans(model, text):
    return [(e.label, text[e.start : e.end]) for e in model.extract(text)]


def test_rules_and_spacy_together(model):
    text = (
        "I was charged $89.99 at Walmart on my card ending in 4821 last Tuesday; "
        "John Smith at Chase said 6.5%"
    )
    assert spans(model, text) == [
        ("MONEY", "$89.99"),
        ("MERCHANT", "Walmart"),
        ("ACCOUNT", "4821"),
        ("DATE", "last Tuesday"),
        ("PERSON", "John Smith"),
        ("ORG", "Chase"),
        ("PERCENT", "6.5%"),
    ]


def test_entities_do_not_overlap_and_rules_win(model):
    # spaCy alone reads "4111 1111 1111 1111" as numbers/dates and "$25k" as "25k".
    text = "Move $25k from card 4111 1111 1111 1111 to acct 12345678 and spend less on groceries"
    entities = model.extract(text)
    assert [(e.label, e.text) for e in entities] == [
        ("MONEY", "$25k"),
        ("ACCOUNT", "**** **** **** 1111"),
        ("ACCOUNT", "****5678"),
        ("CATEGORY", "groceries"),
    ]
    assert entities[0].amount == 25_000.0 and entities[0].currency == "USD"
    ends = [(e.start, e.end) for e in entities]
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(ends))


def test_full_account_numbers_never_leave_the_model(model):
    for text in ("card 5521-8830-1147-2290 was declined", "account number 987654321 please"):
        for entity in model.extract(text):
            assert "5521-8830-1147" not in entity.text and "98765" not in entity.text


def test_lending_jargon_is_not_an_organisation(model):
    assert ("ORG", "APR") not in spans(model, "Is the APR on a HELOC fixed?")


def test_published_metrics_are_recomputed_from_the_annotated_set(model, classifier_models):
    recomputed = ner.evaluate(model, ner.DATA / "eval.jsonl")
    assert recomputed == classifier_models["ner"].metadata["metrics"]
    assert recomputed["sentences"] >= 60
    assert all(recomputed["per_label"][label]["support"] > 0 for label in ner.LABELS)


def test_annotations_must_occur_in_their_sentence(tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"text": "Pay $5 now", "entities": [["$6", "MONEY"]]}\n')
    with pytest.raises(ValueError, match=r"eval\.jsonl:1"):
        ner.read_annotations(bad)


def test_another_spacy_model_version_is_refused(classifier_models, tmp_path):
    from tiermesh.kit.registry import ModelVersion, RegistryError

    version = classifier_models["ner"]
    metadata = {
        **version.metadata,
        "parameters": {**version.metadata["parameters"], "spacy_model_version": "0.0.1"},
    }
    with pytest.raises(RegistryError, match=r"0\.0\.1"):
        EntityModel(ModelVersion(version.name, version.version, version.path, metadata))
