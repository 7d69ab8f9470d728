"""The synthetic generators: determinism, the documented columns, and the shape of their worlds."""

from __future__ import annotations

import numpy as np
import pytest

from services.classifiers.synthetic import (
    CATEGORIES,
    CREDIT_FEATURES,
    PROTECTED_ATTRIBUTE,
    TERMS_MONTHS,
    credit_applications,
    transactions,
)

ROWS = 20_000
CREDIT_INTS = {"term_months", "credit_score", "delinquencies_2y", "open_accounts"}
TRANSACTION_COLUMNS = {
    "amount": np.float64,
    "merchant": np.str_,
    "category": np.str_,
    "hour": np.int64,
    "customer_usual_amount": np.float64,
    "transactions_last_24h": np.int64,
    "is_anomaly": np.int64,
}


@pytest.fixture(scope="module")
def credit() -> dict[str, np.ndarray]:
    return credit_applications(ROWS, seed=3)


@pytest.fixture(scope="module")
def spend() -> dict[str, np.ndarray]:
    return transactions(ROWS, seed=3)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


def assert_same(left: dict[str, np.ndarray], right: dict[str, np.ndarray]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)


# --- credit ------------------------------------------------------------------------------------


def test_credit_same_seed_same_rows_other_seed_other_rows() -> None:
    assert_same(credit_applications(500, seed=42), credit_applications(500, seed=42))
    other = credit_applications(500, seed=43)
    first = credit_applications(500, seed=42)
    assert all(not np.array_equal(first[name], other[name]) for name in (*CREDIT_FEATURES, "defaulted"))


def test_credit_columns_and_dtypes(credit: dict[str, np.ndarray]) -> None:
    assert set(credit) == {*CREDIT_FEATURES, PROTECTED_ATTRIBUTE, "defaulted"}
    for name in CREDIT_FEATURES:
        expected = np.int64 if name in CREDIT_INTS else np.float64
        assert credit[name].dtype == expected, name
        assert credit[name].shape == (ROWS,), name
    assert credit[PROTECTED_ATTRIBUTE].dtype.kind == "U"
    assert credit["defaulted"].dtype == np.int64


def test_credit_value_ranges(credit: dict[str, np.ndarray]) -> None:
    ranges = {
        "annual_income": (12_000, 600_000),
        "loan_amount": (1_000, 100_000),
        "debt_to_income": (0.0, 0.65),
        "credit_score": (300, 850),
        "employment_years": (0.0, 40.0),
        "credit_utilization": (0.0, 1.2),
    }
    for name, (low, high) in ranges.items():
        assert low <= credit[name].min() and credit[name].max() <= high, name
    assert np.all(credit["loan_amount"] % 500 == 0)
    assert set(np.unique(credit["term_months"])) <= set(TERMS_MONTHS)
    assert credit["delinquencies_2y"].min() >= 0
    assert credit["open_accounts"].min() >= 0
    assert set(np.unique(credit[PROTECTED_ATTRIBUTE])) == {"female", "male"}
    assert set(np.unique(credit["defaulted"])) == {0, 1}


def test_credit_marginals_look_like_the_documented_world(credit: dict[str, np.ndarray]) -> None:
    assert 50_000 <= np.median(credit["annual_income"]) <= 70_000
    assert np.mean(credit["annual_income"]) > np.median(credit["annual_income"])  # long right tail
    assert 660 <= credit["credit_score"].mean() <= 720
    assert 50 <= credit["credit_score"].std() <= 90
    assert 6.0 <= credit["open_accounts"].mean() <= 10.0
    assert 0.10 <= credit["defaulted"].mean() <= 0.20
    female = credit[PROTECTED_ATTRIBUTE] == "female"
    assert 0.47 <= female.mean() <= 0.53


def test_female_incomes_are_modestly_lower(credit: dict[str, np.ndarray]) -> None:
    female = credit[PROTECTED_ATTRIBUTE] == "female"
    gap = 1 - np.median(credit["annual_income"][female]) / np.median(credit["annual_income"][~female])
    assert 0.05 <= gap <= 0.20


@pytest.mark.parametrize(
    ("left", "right", "sign"),
    [
        ("credit_score", "annual_income", +1),
        ("credit_score", "employment_years", +1),
        ("credit_score", "delinquencies_2y", -1),
        ("credit_score", "credit_utilization", -1),
        ("credit_score", "debt_to_income", -1),
        ("annual_income", "debt_to_income", -1),
        ("annual_income", "loan_amount", +1),
        ("loan_amount", "term_months", +1),
        ("debt_to_income", "defaulted", +1),
        ("credit_utilization", "defaulted", +1),
        ("delinquencies_2y", "defaulted", +1),
        ("credit_score", "defaulted", -1),
        ("annual_income", "defaulted", -1),
    ],
)
def test_credit_correlation_signs(credit: dict[str, np.ndarray], left: str, right: str, sign: int) -> None:
    assert sign * corr(credit[left], credit[right]) > 0.05


def test_credit_empty_and_invalid_counts() -> None:
    empty = credit_applications(0, seed=1)
    assert all(column.shape == (0,) for column in empty.values())
    with pytest.raises(ValueError):
        credit_applications(-1, seed=1)


# --- transactions ------------------------------------------------------------------------------


def test_transactions_same_seed_same_rows_other_seed_other_rows() -> None:
    assert_same(transactions(500, seed=42), transactions(500, seed=42))
    first, other = transactions(500, seed=42), transactions(500, seed=43)
    assert all(not np.array_equal(first[name], other[name]) for name in first)


def test_transactions_columns_dtypes_and_ranges(spend: dict[str, np.ndarray]) -> None:
    assert set(spend) == set(TRANSACTION_COLUMNS)
    for name, dtype in TRANSACTION_COLUMNS.items():
        assert spend[name].shape == (ROWS,), name
        if dtype is np.str_:
            assert spend[name].dtype.kind == "U", name
        else:
            assert spend[name].dtype == dtype, name
    assert spend["amount"].min() >= 0.01
    assert spend["customer_usual_amount"].min() > 0
    assert spend["transactions_last_24h"].min() >= 0
    assert set(np.unique(spend["hour"])) <= set(range(24))
    assert set(np.unique(spend["is_anomaly"])) == {0, 1}
    assert np.all(np.char.str_len(spend["merchant"]) > 0)


def test_every_category_appears_and_nothing_else(spend: dict[str, np.ndarray]) -> None:
    assert set(np.unique(spend["category"])) == set(CATEGORIES)


def test_every_hour_appears(spend: dict[str, np.ndarray]) -> None:
    assert set(np.unique(spend["hour"])) == set(range(24))


@pytest.mark.parametrize("rate", [0.0, 0.02, 0.05])
def test_anomaly_fraction_matches_the_rate(rate: float) -> None:
    data = transactions(ROWS, seed=11, anomaly_rate=rate)
    assert abs(data["is_anomaly"].mean() - rate) <= 0.01


def test_normal_behaviour(spend: dict[str, np.ndarray]) -> None:
    normal = spend["is_anomaly"] == 0
    usual = spend["customer_usual_amount"][normal]
    assert 35 <= np.median(usual) <= 55
    # Common categories dominate; gambling is rare.
    categories = spend["category"][normal]
    assert (categories == "groceries").mean() > 0.1
    assert (categories == "gambling").mean() < 0.02
    # Rent costs more than a coffee.
    amount = spend["amount"][normal]
    assert np.median(amount[categories == "rent"]) > 5 * np.median(amount[categories == "dining"])
    # Few purchases at 1-5 am; dining leans to the evening.
    hours = spend["hour"][normal]
    assert np.isin(hours, [1, 2, 3, 4, 5]).mean() < 0.03
    assert np.median(hours[categories == "dining"]) >= 15
    assert 1.5 <= spend["transactions_last_24h"][normal].mean() <= 3.5


def test_anomalies_stand_out_on_average(spend: dict[str, np.ndarray]) -> None:
    anomaly = spend["is_anomaly"] == 1
    ratio = np.log(spend["amount"] / spend["customer_usual_amount"])
    night = np.isin(spend["hour"], [1, 2, 3, 4, 5])
    velocity = spend["transactions_last_24h"]
    assert ratio[anomaly].mean() > ratio[~anomaly].mean() + 0.5
    assert night[anomaly].mean() > 5 * night[~anomaly].mean()
    assert velocity[anomaly].mean() > 2 * velocity[~anomaly].mean()
    # Not every anomaly is extreme: some sit inside normal ranges on every single feature.
    assert (velocity[anomaly] < 10).mean() > 0.3
    assert (~night[anomaly]).mean() > 0.3


def test_merchants_belong_to_their_category(spend: dict[str, np.ndarray]) -> None:
    for category in CATEGORIES:
        merchants = set(np.unique(spend["merchant"][spend["category"] == category]))
        others = set(np.unique(spend["merchant"][spend["category"] != category]))
        assert merchants and not merchants & others, category


def test_transactions_empty_and_invalid_arguments() -> None:
    empty = transactions(0, seed=1)
    assert all(column.shape == (0,) for column in empty.values())
    with pytest.raises(ValueError):
        transactions(-1, seed=1)
    with pytest.raises(ValueError):
        transactions(10, seed=1, anomaly_rate=1.5)
