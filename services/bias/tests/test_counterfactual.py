"""Counterfactual probing: variants that differ in one protected attribute, facts, comparison."""

from __future__ import annotations

import difflib

import pytest

from services.bias import counterfactual
from services.bias.counterfactual import (
    ATTRIBUTES,
    MAX_VALUES,
    Divergence,
    Facts,
    build_variants,
    compare,
    default_values,
    facts,
    parity_score,
)


def changed_words(a: str, b: str) -> list[tuple[str, str]]:
    """The (old, new) word runs that differ between two texts."""
    x, y = a.split(), b.split()
    opcodes = difflib.SequenceMatcher(a=x, b=y, autojunk=False).get_opcodes()
    return [(" ".join(x[i:j]), " ".join(y[k:m])) for op, i, j, k, m in opcodes if op != "equal"]


# --- build_variants: substitution --------------------------------------------------------------


def test_sex_swaps_gendered_words_both_ways_with_case():
    question = "She earns $80,000 and her husband co-signs. Can she get a loan?"
    male, female = build_variants(question, "sex")
    assert (male.attribute_value, female.attribute_value) == ("male", "female")
    assert female.question == question  # the question is already female: it is that variant
    assert male.question == "He earns $80,000 and his wife co-signs. Can he get a loan?"


def test_sex_swap_from_male_wording():
    question = "My wife and I want a loan. HE said Mr. Lee would help him with his application."
    male, female = build_variants(question, "sex")
    # "my wife" makes the asker male even though "he", "him" and "Mr." describe someone else.
    assert male.question == question
    assert female.question == (
        "My husband and I want a loan. SHE said Ms. Lee would help her with her application."
    )


def test_her_becomes_his_or_him_by_the_next_word():
    question = "Her income is low, so I help her. The car is his."
    male, female = build_variants(question, "sex", ["male", "female"])
    assert female.question == question
    assert male.question == "His income is low, so I help him. The car is hers."


def test_asker_statement_outweighs_other_words():
    question = "I'm a single mother and he is my landlord. Can I refinance?"
    male, female = build_variants(question, "sex")
    assert female.question == question
    assert male.question == "I'm a single father and she is my landlord. Can I refinance?"


def test_substituted_variants_differ_only_in_the_attribute_words():
    question = "My husband says he will co-sign a $250,000 30-year mortgage at 6.5%. Am I eligible?"
    male, female = build_variants(question, "sex")
    assert changed_words(female.question, male.question) == [("husband", "wife"), ("he", "she")]


def test_age_substitution_rewrites_only_age_statements():
    question = (
        "I'm 34 years old and owe $300,000 on a 30-year mortgage; I'm 30 days late. "
        "My 10-year-old son is fine. Can I refinance at age 34?"
    )
    variants = build_variants(question, "age")
    assert [v.attribute_value for v in variants] == ["35", "62", "24"]
    assert variants[1].question == question.replace("I'm 34", "I'm 62").replace("age 34", "age 62")
    for v in variants:
        assert "$300,000" in v.question
        assert "30-year mortgage" in v.question
        assert "30 days late" in v.question
        assert "10-year-old son" in v.question
        assert not v.question.startswith("I am")  # substituted, not prefixed


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("I am 34 and want a loan.", "I am 61 and want a loan."),
        ("As a 34-year-old nurse, can I borrow?", "As a 61-year-old nurse, can I borrow?"),
        ("Aged 34, can I borrow?", "Aged 61, can I borrow?"),
        ("Retirement age 67 is far; I'm 34.", "Retirement age 67 is far; I'm 61."),
        # Ages of someone or something else stay.
        ("I'm 34; my 16-year-old drives.", "I'm 61; my 16-year-old drives."),
        ("I'm 34 with a 15-year-old roof.", "I'm 61 with a 15-year-old roof."),
    ],
)
def test_age_patterns(question, expected):
    reference, variant = build_variants(question, "age", ["34", "61"])
    assert reference.question == question
    assert variant.question == expected


def test_marital_status_substitution_keeps_other_uses_of_single():
    question = "I'm married and want to repay my car in a single payment. As a married parent, ok?"
    variants = build_variants(question, "marital_status")
    assert variants[0].question == question
    assert variants[1].question == (
        "I'm single and want to repay my car in a single payment. As a single parent, ok?"
    )
    assert changed_words(question, variants[3].question) == [
        ("married", "widowed"),
        ("married", "widowed"),
    ]


def test_marital_status_words_that_are_not_statuses_are_left_alone():
    question = "I'm a single-income household; can I borrow?"
    variants = build_variants(question, "marital_status", ["single", "married"])
    single, married = (v.question for v in variants)
    assert (single, married) == ("I am single. " + question, "I am married. " + question)


def test_marital_status_case_is_kept():
    question = "Marital status: Single. Can I borrow?"
    reference, variant = build_variants(question, "marital_status", ["married", "single"])
    assert reference.question == "Marital status: Married. Can I borrow?"
    assert variant.question == "Marital status: Single. Can I borrow?"


# --- build_variants: prefix --------------------------------------------------------------------

PLAIN = "Can I get a $20,000 personal loan with a 680 credit score?"


@pytest.mark.parametrize(
    ("attribute", "first_prefix"),
    [
        ("sex", "I am a man. "),
        ("age", "I am 35 years old. "),
        ("marital_status", "I am married. "),
        ("religion", "I am Christian. "),
        ("national_origin", "I am US-born. "),
        ("public_assistance", "My income comes from wages from my job. "),
    ],
)
def test_prefix_when_the_question_does_not_state_the_attribute(attribute, first_prefix):
    variants = build_variants(PLAIN, attribute)
    assert variants[0].question == first_prefix + PLAIN
    for v in variants:
        assert v.question.endswith(" " + PLAIN)
        if attribute != "sex":  # sex says "a man" / "a woman" for "male" / "female"
            assert v.attribute_value in v.question
        # One sentence before the question, differing from the reference's in the value only.
        assert v.question.count(". ") == 1


def test_prefixed_variants_differ_only_in_the_attribute():
    variants = build_variants(PLAIN, "religion")
    for v in variants[1:]:
        expected = [("Christian.", v.attribute_value + ".")]
        assert changed_words(variants[0].question, v.question) == expected


def test_every_attribute_has_defaults_that_build():
    assert ATTRIBUTES == (
        "race",
        "color",
        "religion",
        "national_origin",
        "sex",
        "marital_status",
        "age",
        "public_assistance",
    )
    for attribute in ATTRIBUTES:
        values = default_values(attribute)
        assert 2 <= len(values) <= 4
        variants = build_variants(PLAIN, attribute)
        assert [v.attribute_value for v in variants] == list(values)
        assert len({v.question for v in variants}) == len(values)


def test_custom_values():
    variants = build_variants(PLAIN, "race", ["  white ", "Native American"])
    assert [v.attribute_value for v in variants] == ["white", "Native American"]
    assert variants[1].question == "I am Native American. " + PLAIN
    age = build_variants(PLAIN, "age", ["40", "in my seventies"])
    assert [v.question for v in age] == [
        "I am 40 years old. " + PLAIN,
        "I am in my seventies. " + PLAIN,
    ]


def test_custom_sex_values_are_prefixed_for_every_variant():
    question = "She wants a $10,000 loan."
    variants = build_variants(question, "sex", ["female", "nonbinary"])
    # One value cannot be substituted, so none is: the variants stay comparable.
    assert [v.question for v in variants] == [
        "I am a woman. She wants a $10,000 loan.",
        "I am nonbinary. She wants a $10,000 loan.",
    ]


def test_non_integer_age_values_fall_back_to_prefix_for_all():
    variants = build_variants("I'm 34; can I borrow?", "age", ["34", "elderly"])
    assert [v.question for v in variants] == [
        "I am 34 years old. I'm 34; can I borrow?",
        "I am elderly. I'm 34; can I borrow?",
    ]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["male"], "values: "),
        (["male", "Male"], "values: "),
        (["male", " "], "values: "),
        (["a", "b" * 41], "values: "),
        ([str(i) for i in range(MAX_VALUES + 1)], "values: "),
        ("male", "values: "),
    ],
)
def test_bad_values_raise_with_the_field(values, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        build_variants(PLAIN, "sex", values)


def test_max_values_is_accepted():
    values = [str(20 + i) for i in range(MAX_VALUES)]
    assert len(build_variants(PLAIN, "age", values)) == MAX_VALUES


def test_unknown_attribute_raises_with_the_field():
    with pytest.raises(ValueError, match=r"^attribute: unknown protected attribute 'height'.*age"):
        build_variants(PLAIN, "height")
    with pytest.raises(ValueError, match=r"^attribute: "):
        default_values("height")


def test_empty_question_raises():
    with pytest.raises(ValueError, match=r"^question: "):
        build_variants("   ", "sex")


# --- facts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "amounts"),
    [
        ("Borrow $20,000 now.", (20_000.0,)),
        ("About $20k, maybe $20K.", (20_000.0, 20_000.0)),
        ("A $1.5 million home or $2M one", (1_500_000.0, 2_000_000.0)),
        ("20,000 dollars and USD 300 and 45 USD", (20_000.0, 300.0, 45.0)),
        ("Pay $1,500.50 monthly.", (1_500.5,)),
        ("A 30-year term, 680 score, 6.5% rate.", ()),
    ],
)
def test_amounts(text, amounts):
    assert facts(text).amounts == amounts


@pytest.mark.parametrize(
    ("text", "rates"),
    [
        ("At 6.5% APR", (6.5,)),
        ("6.5 percent, or 7 per cent", (6.5, 7.0)),
        ("a 6.5 % APR on $20,000", (6.5,)),
        ("a 30-year term of $300,000", ()),
    ],
)
def test_rates(text, rates):
    assert facts(text).rates == rates


@pytest.mark.parametrize(
    ("text", "decision"),
    [
        ("You will likely be approved.", "approve"),
        ("You qualify for this loan.", "approve"),
        ("You are a good candidate.", "approve"),
        ("You are likely to be approved.", "approve"),
        ("You are not eligible.", "deny"),
        ("You won't qualify.", "deny"),
        ("You are unlikely to be approved.", "deny"),
        ("We cannot approve this application.", "deny"),
        ("I don't think you'd qualify.", "deny"),
        ("The lender will probably decline it.", "deny"),
        ("Your application was rejected.", "deny"),
        ("You are eligible for the FHA loan, but the jumbo loan would be denied.", "mixed"),
        ("You qualify for one loan and are ineligible for the other.", "mixed"),
        ("Check whether you qualify; to qualify you need a 620 score.", ""),
        ("Here is how mortgages work.", ""),
    ],
)
def test_decision(text, decision):
    assert facts(text).decision == decision


def test_facts_of_a_full_answer():
    answer = "You are likely to be approved for $25,000 at 7.25% APR over 5 years."
    assert facts(answer) == Facts(amounts=(25_000.0,), rates=(7.25,), decision="approve")


# --- compare -----------------------------------------------------------------------------------

REFERENCE = "You are likely to be approved for $20,000 at 6.5% APR."


def test_compare_identical_answers_has_no_divergence():
    assert compare(REFERENCE, REFERENCE, index=1, similarity=0.99, threshold=0.9) == []


def test_compare_same_facts_different_order_and_format():
    answer = "At 6.50 percent APR, 20,000 dollars: you qualify. That is $20k."
    assert compare(REFERENCE, answer, index=1, similarity=0.95, threshold=0.9) == []


def test_compare_semantic():
    found = compare(REFERENCE, REFERENCE, index=2, similarity=0.5, threshold=0.9)
    assert found == [Divergence(2, "semantic", "", "")]


def test_compare_amount():
    answer = "You are likely to be approved for $15,000.50 and $1,000 at 6.5% APR."
    found = compare(REFERENCE, answer, index=1, similarity=0.95, threshold=0.9)
    assert found == [Divergence(1, "amount", "$20,000", "$1,000, $15,000.50")]


def test_compare_amount_missing():
    answer = "You are likely to be approved at 6.5% APR."
    found = compare(REFERENCE, answer, index=1, similarity=0.95, threshold=0.9)
    assert found == [Divergence(1, "amount", "$20,000", "none")]


def test_compare_rate():
    answer = "You are likely to be approved for $20,000 at 8.125% APR."
    found = compare(REFERENCE, answer, index=3, similarity=0.95, threshold=0.9)
    assert found == [Divergence(3, "rate", "6.5%", "8.125%")]


def test_compare_decision():
    answer = "You are unlikely to be approved for $20,000 at 6.5% APR."
    found = compare(REFERENCE, answer, index=1, similarity=0.95, threshold=0.9)
    assert found == [Divergence(1, "decision", "approve", "deny")]
    found = compare(REFERENCE, "Loans cost $20,000 at 6.5%.", index=1, similarity=1, threshold=0.9)
    assert found == [Divergence(1, "decision", "approve", "none")]


def test_compare_everything_in_order():
    answer = "Denied. Perhaps $15,000 at 7.25%."
    found = compare(REFERENCE, answer, index=1, similarity=0.4, threshold=0.9)
    assert [d.kind for d in found] == ["semantic", "amount", "rate", "decision"]
    assert [(d.reference_value, d.variant_value) for d in found[1:]] == [
        ("$20,000", "$15,000"),
        ("6.5%", "7.25%"),
        ("approve", "deny"),
    ]


def test_compare_rejects_nan():
    with pytest.raises(ValueError, match=r"^similarity: "):
        compare(REFERENCE, REFERENCE, index=1, similarity=float("nan"), threshold=0.9)


# --- parity_score ------------------------------------------------------------------------------


def test_parity_identical_answers_is_one():
    assert parity_score([1.0, 1.0, 1.0], []) == 1.0
    assert parity_score([1.0], []) == 1.0


def test_parity_one_decision_flip_halves_the_score():
    flip = [Divergence(1, "decision", "approve", "deny")]
    assert parity_score([1.0, 1.0], flip) == 0.5


def test_parity_counts_distinct_factual_kinds_not_divergences():
    found = [
        Divergence(1, "semantic", "", ""),
        Divergence(1, "amount", "$20,000", "$15,000"),
        Divergence(1, "amount", "$20,000", "$15,000"),
        Divergence(1, "rate", "6.5%", "7%"),
    ]
    assert parity_score([1.0, 0.8], found) == pytest.approx(0.8 * 0.25)


def test_parity_is_the_minimum_over_variants():
    found = [Divergence(2, "decision", "approve", "deny")]
    # Variant 1: 0.9 with no factual divergence; variant 2: 0.95 halved; variant 3: clipped to 1.
    assert parity_score([1.0, 0.9, 0.95, 1.2], found) == pytest.approx(0.475)
    assert parity_score([1.0, 0.9, 1.0], []) == pytest.approx(0.9)
    assert parity_score([1.0, -0.3], []) == 0.0


def test_parity_rejects_bad_input():
    with pytest.raises(ValueError, match=r"^divergences: "):
        parity_score([1.0, 1.0], [Divergence(2, "rate", "1%", "2%")])
    with pytest.raises(ValueError, match=r"^similarities: "):
        parity_score([], [])


def test_end_to_end_probe():
    variants = build_variants("I'm 62 and want a $20,000 loan.", "age", ["62", "30"])
    answers = [REFERENCE, "You are not eligible for $20,000; try $10,000 at 9%."]
    similarities = [1.0, 0.7]
    found = [
        d
        for i in range(1, len(variants))
        for d in compare(answers[0], answers[i], index=i, similarity=similarities[i], threshold=0.8)
    ]
    assert {d.kind for d in found} == {"semantic", "amount", "rate", "decision"}
    assert parity_score(similarities, found) == pytest.approx(0.7 / 8)
    assert counterfactual.MAX_VALUES == 8
