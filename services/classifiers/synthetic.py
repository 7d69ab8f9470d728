"""Seeded synthetic data for the classifiers tier: credit applications and card transactions.

Credit world. Each applicant has a hidden age-like latent that lengthens their employment history.
Income is lognormal (median about $60k) and rises with employment; women's incomes are drawn about
12% lower (a real-world pay gap). The credit score follows income and employment, and the rest of
the file follows the score: lower scores bring higher debt-to-income, higher card utilisation and
sharply more recent delinquencies. Loans are a share of income, and larger loans get longer terms.
Default is Bernoulli(sigmoid(...)) of the standardised features, with penalties past the usual
underwriting cliffs (debt-to-income above 0.43, utilisation above 0.9) and an unobserved shock, so
a model can learn it but not perfectly. Sex has NO direct effect on default: any disparity a model
shows between the sexes arrives through proxies (income and what income drives), which is what a
fairness audit should be able to surface.

Transaction world. A population of customers, each with a usual ticket size (lognormal, median
about $45) and a few home categories. Normal transactions pick a category (mostly from home, else
from a realistic mix), an amount around the customer's usual scaled by the category (rent and
travel cost more than coffee), a category-dependent hour (dining in the evening, few purchases at
1-5 am) and a modest 24-hour velocity. Anomalies, a fixed share of rows, come in several kinds:
amounts many times the usual, night-time purchases in risky categories, velocity bursts,
combinations of these, and subtler versions of each that sit close to normal behaviour.

Everything is drawn from ``numpy.random.default_rng(seed)``, so a seed fixes the data exactly.
"""

from __future__ import annotations

import numpy as np

CREDIT_FEATURES: tuple[str, ...] = (
    "annual_income",
    "loan_amount",
    "term_months",
    "debt_to_income",
    "credit_score",
    "employment_years",
    "delinquencies_2y",
    "credit_utilization",
    "open_accounts",
)
PROTECTED_ATTRIBUTE = "sex"
CATEGORIES: tuple[str, ...] = (
    "groceries",
    "dining",
    "fuel",
    "travel",
    "utilities",
    "rent",
    "entertainment",
    "shopping",
    "healthcare",
    "electronics",
    "education",
    "insurance",
    "subscriptions",
    "cash_withdrawal",
    "gambling",
    "money_transfer",
)

TERMS_MONTHS: tuple[int, ...] = (12, 24, 36, 48, 60, 72, 84)

# --- credit ------------------------------------------------------------------------------------

_MEDIAN_INCOME = 60_000.0
_PAY_GAP = 0.12  # women's median income ~12% below men's, applied to the lognormal's location
_INCOME_SIGMA = 0.5
_DEFAULT_INTERCEPT = -2.65  # puts the overall default rate near 16%


def _standardise(values: np.ndarray, mean: float, sd: float) -> np.ndarray:
    # Fixed population moments, not the batch's, so a row's risk does not depend on its neighbours.
    return (values - mean) / sd


def _check_count(count: int) -> None:
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")


def _applicants(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    """Who applies: sex, tenure, income, score and credit history, drawn in a fixed order (the
    seed decides every row)."""
    female = rng.random(count) < 0.5
    sex = np.where(female, "female", "male")

    # Age is never published; it only makes employment length (and a little income) hang together.
    age = np.clip(rng.normal(41.0, 12.0, count), 21.0, 72.0)
    employment_years = rng.exponential(1.5 + 0.28 * (age - 21.0))
    employment_years = np.round(np.clip(employment_years, 0.0, np.minimum(40.0, age - 18.0)), 1)

    # Income: lognormal around $60k; experience pays (with diminishing returns), and the pay gap.
    log_income = (
        np.log(_MEDIAN_INCOME)
        + _PAY_GAP / 2
        - _PAY_GAP * female
        + 0.09 * (np.log1p(employment_years) - 1.8)
        + rng.normal(0.0, _INCOME_SIGMA, count)
    )
    annual_income = np.round(np.clip(np.exp(log_income), 12_000.0, 600_000.0), -2)
    z_income = (np.log(annual_income) - np.log(_MEDIAN_INCOME)) / _INCOME_SIGMA
    z_employment = (np.log1p(employment_years) - 1.8) / 0.9

    # Credit score: around 690 (sd ~70), following income and tenure plus personal history.
    score_latent = 0.35 * z_income + 0.25 * z_employment + 0.9 * rng.standard_normal(count)
    credit_score = np.clip(np.round(690.0 + 70.0 * score_latent), 300, 850).astype(np.int64)
    z_score = (credit_score - 690.0) / 70.0

    # Debt-to-income: heavier for lower incomes and scores; lenders rarely see above 0.65.
    debt_to_income = 0.22 - 0.045 * z_income - 0.05 * z_score + rng.normal(0.0, 0.09, count)
    debt_to_income = np.round(np.clip(debt_to_income, 0.0, 0.65), 3)

    # Utilisation: the score's mirror image; over-limit balances (> 1) happen, rarely.
    credit_utilization = 0.36 - 0.17 * z_score + rng.normal(0.0, 0.2, count)
    credit_utilization = np.round(np.clip(credit_utilization, 0.0, 1.2), 3)

    # Recent delinquencies: rare for good scores, climbing steeply below ~640.
    delinquency_rate = 0.12 * np.exp(-(credit_score - 690.0) / 45.0)
    delinquencies_2y = rng.poisson(np.minimum(delinquency_rate, 8.0)).astype(np.int64)

    open_accounts = rng.poisson(np.clip(6.5 + 0.05 * (age - 21.0) + 0.8 * z_income, 1.0, None))
    open_accounts = open_accounts.astype(np.int64)
    return {
        "sex": sex,
        "employment_years": employment_years,
        "annual_income": annual_income,
        "z_income": z_income,
        "z_employment": z_employment,
        "credit_score": credit_score,
        "debt_to_income": debt_to_income,
        "credit_utilization": credit_utilization,
        "delinquencies_2y": delinquencies_2y,
        "open_accounts": open_accounts,
    }


def credit_applications(count: int, *, seed: int) -> dict[str, np.ndarray]:
    """Columns: every CREDIT_FEATURES name (float64 except term_months, credit_score, delinquencies_2y,
    open_accounts which are int64), "sex" (numpy str array), "defaulted" (int64 0/1)."""
    _check_count(count)
    rng = np.random.default_rng(seed)
    applicant = _applicants(rng, count)
    annual_income, credit_score = applicant["annual_income"], applicant["credit_score"]
    z_income, z_employment = applicant["z_income"], applicant["z_employment"]
    z_score = (credit_score - 690.0) / 70.0
    debt_to_income, credit_utilization = applicant["debt_to_income"], applicant["credit_utilization"]
    delinquencies_2y = applicant["delinquencies_2y"]

    # Loan: 5%-60% of income (skewed small), in $500 steps within the product's $1k-$100k.
    loan_share = 0.05 + 0.55 * rng.beta(2.0, 4.5, count)
    loan_amount = np.clip(np.round(loan_share * annual_income / 500.0) * 500.0, 1_000.0, 100_000.0)
    # Term: larger loans are spread over more months.
    term_index = 1.8 + 1.1 * (np.log(loan_amount) - np.log(12_000.0)) + rng.normal(0.0, 1.0, count)
    term_months = np.asarray(TERMS_MONTHS, dtype=np.int64)[np.clip(np.round(term_index), 0, 6).astype(int)]

    # Default: the features (never sex), cliffs past common underwriting limits, and a shock the
    # file does not show, which keeps the problem learnable but not trivial.
    payment_burden = loan_amount / annual_income * (36.0 / term_months) ** 0.3
    logit = (
        _DEFAULT_INTERCEPT
        - 0.75 * z_score
        + 0.35 * _standardise(debt_to_income, 0.225, 0.117)
        + 0.3 * _standardise(credit_utilization, 0.377, 0.245)
        + 0.3 * np.minimum(delinquencies_2y, 5)
        - 0.25 * z_income
        - 0.15 * z_employment
        + 0.25 * _standardise(payment_burden, 0.228, 0.091)
        + 0.1 * (term_months - 48) / 24
        + 0.8 * (debt_to_income > 0.43)
        + 0.6 * (credit_utilization > 0.9)
        + 0.4 * (debt_to_income > 0.43) * (credit_utilization > 0.9)
        + rng.normal(0.0, 0.8, count)
    )
    defaulted = (rng.random(count) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)

    return {
        "annual_income": annual_income.astype(np.float64),
        "loan_amount": loan_amount.astype(np.float64),
        "term_months": term_months,
        "debt_to_income": debt_to_income.astype(np.float64),
        "credit_score": credit_score,
        "employment_years": applicant["employment_years"].astype(np.float64),
        "delinquencies_2y": delinquencies_2y,
        "credit_utilization": credit_utilization.astype(np.float64),
        "open_accounts": applicant["open_accounts"],
        PROTECTED_ATTRIBUTE: applicant["sex"],
        "defaulted": defaulted,
    }


# --- transactions ------------------------------------------------------------------------------

# Share of everyday card spend by category (normal behaviour); the last three are rare on a card.
_CATEGORY_MIX: dict[str, float] = {
    "groceries": 0.20,
    "dining": 0.15,
    "fuel": 0.10,
    "shopping": 0.13,
    "subscriptions": 0.08,
    "entertainment": 0.06,
    "utilities": 0.05,
    "healthcare": 0.04,
    "travel": 0.035,
    "electronics": 0.03,
    "insurance": 0.025,
    "rent": 0.03,
    "education": 0.015,
    "cash_withdrawal": 0.025,
    "money_transfer": 0.015,
    "gambling": 0.01,
}

# Typical ticket relative to the customer's usual amount (a month's rent is not a coffee).
_CATEGORY_SCALE: dict[str, float] = {
    "groceries": 1.4,
    "dining": 0.8,
    "fuel": 1.0,
    "travel": 6.0,
    "utilities": 2.5,
    "rent": 12.0,
    "entertainment": 1.0,
    "shopping": 1.5,
    "healthcare": 2.0,
    "electronics": 5.0,
    "education": 4.0,
    "insurance": 3.0,
    "subscriptions": 0.3,
    "cash_withdrawal": 2.0,
    "gambling": 1.5,
    "money_transfer": 4.0,
}

# Bills are near-fixed amounts; discretionary spend varies more.
_CATEGORY_SPREAD: dict[str, float] = {
    "rent": 0.15,
    "insurance": 0.2,
    "subscriptions": 0.3,
    "utilities": 0.3,
}

_MERCHANTS: dict[str, tuple[str, ...]] = {
    "groceries": ("Kroger", "Safeway", "Whole Foods", "Trader Joe's", "Aldi", "Publix"),
    "dining": ("Starbucks", "Chipotle", "McDonald's", "Olive Garden", "Panera Bread", "Local Bistro"),
    "fuel": ("Shell", "Chevron", "ExxonMobil", "BP", "Costco Gas"),
    "travel": ("Delta Air Lines", "United Airlines", "Marriott", "Hilton", "Expedia", "Airbnb"),
    "utilities": ("PG&E", "Con Edison", "Comcast Xfinity", "AT&T", "Verizon"),
    "rent": ("Greystar Residential", "Equity Residential", "AvalonBay", "Property Mgmt LLC"),
    "entertainment": ("AMC Theatres", "Ticketmaster", "Dave & Buster's", "Regal Cinemas"),
    "shopping": ("Amazon", "Target", "Walmart", "Macy's", "Costco", "Etsy"),
    "healthcare": ("CVS Pharmacy", "Walgreens", "Kaiser Permanente", "LabCorp"),
    "electronics": ("Best Buy", "Apple Store", "Newegg", "B&H Photo"),
    "education": ("Coursera", "Pearson", "University Bookstore", "Udemy"),
    "insurance": ("GEICO", "State Farm", "Progressive", "Allstate"),
    "subscriptions": ("Netflix", "Spotify", "Disney+", "YouTube Premium", "iCloud"),
    "cash_withdrawal": ("ATM Chase", "ATM Bank of America", "ATM Wells Fargo", "ATM Non-Network"),
    "gambling": ("DraftKings", "FanDuel", "BetMGM", "Caesars Sportsbook"),
    "money_transfer": ("Western Union", "MoneyGram", "Wise", "Remitly"),
}

# Categories fraudsters favour: resalable goods and ways to move cash.
_RISKY_CATEGORIES: tuple[str, ...] = (
    "electronics",
    "travel",
    "gambling",
    "cash_withdrawal",
    "money_transfer",
)

_NIGHT_HOURS = np.array([1, 2, 3, 4, 5])

# Shares of the anomaly kinds below: the obvious ones (0-3) and the subtle ones (4-5).
_ANOMALY_KIND_SHARES = np.array([0.25, 0.22, 0.18, 0.14, 0.12, 0.09])


def _hour_profile(peaks: list[tuple[float, float, float]], night_floor: float) -> np.ndarray:
    """A 24-hour weight profile: Gaussian bumps (centre, width, weight) over a small base."""
    hours = np.arange(24, dtype=np.float64)
    weights = np.full(24, 0.02)
    for centre, width, weight in peaks:
        # Circular distance so a 23:00 peak spills into 00:00-01:00.
        distance = np.minimum(np.abs(hours - centre), 24.0 - np.abs(hours - centre))
        weights += weight * np.exp(-0.5 * (distance / width) ** 2)
    weights[1:6] = np.minimum(weights[1:6], night_floor)  # few legitimate purchases at 1-5 am
    return weights / weights.sum()


# Hours are UTC; this world's customers all live on UTC, so the hour is also their local clock.
_HOUR_PROFILES: dict[str, np.ndarray] = {
    "groceries": _hour_profile([(11.0, 3.0, 0.8), (17.5, 2.0, 1.0)], 0.005),
    "dining": _hour_profile([(8.0, 1.2, 0.5), (12.5, 1.2, 0.9), (19.5, 1.8, 1.2)], 0.01),
    "fuel": _hour_profile([(8.0, 1.5, 0.8), (17.5, 2.0, 0.9)], 0.01),
    "travel": _hour_profile([(11.0, 4.0, 1.0), (20.0, 2.0, 0.5)], 0.01),
    "utilities": _hour_profile([(10.0, 3.0, 1.0)], 0.003),
    "rent": _hour_profile([(10.0, 3.0, 1.0)], 0.003),
    "entertainment": _hour_profile([(20.0, 2.0, 1.0), (15.0, 3.0, 0.3)], 0.01),
    "shopping": _hour_profile([(14.0, 4.0, 1.0), (21.0, 1.5, 0.4)], 0.008),
    "healthcare": _hour_profile([(11.0, 3.0, 1.0)], 0.003),
    "electronics": _hour_profile([(15.0, 3.5, 1.0), (20.5, 1.5, 0.4)], 0.005),
    "education": _hour_profile([(11.0, 4.0, 1.0)], 0.005),
    "insurance": _hour_profile([(10.0, 3.0, 1.0)], 0.003),
    # Renewals are scheduled by the merchant, so subscriptions are the most uniform over the day.
    "subscriptions": _hour_profile([(12.0, 8.0, 0.3)], 0.02),
    "cash_withdrawal": _hour_profile([(12.0, 3.0, 0.8), (19.0, 2.5, 0.7)], 0.008),
    "gambling": _hour_profile([(21.0, 2.5, 1.0)], 0.01),
    "money_transfer": _hour_profile([(13.0, 4.0, 1.0)], 0.005),
}


def _normal_hours(rng: np.random.Generator, categories: np.ndarray) -> np.ndarray:
    hours = np.empty(categories.shape[0], dtype=np.int64)
    for name, profile in _HOUR_PROFILES.items():
        rows = np.flatnonzero(categories == name)
        hours[rows] = rng.choice(24, size=rows.size, p=profile)
    return hours


def _merchants(rng: np.random.Generator, categories: np.ndarray) -> np.ndarray:
    longest = max(len(name) for names in _MERCHANTS.values() for name in names)
    merchants = np.empty(categories.shape[0], dtype=f"<U{longest}")
    for name, names in _MERCHANTS.items():
        rows = np.flatnonzero(categories == name)
        merchants[rows] = np.asarray(names)[rng.integers(0, len(names), rows.size)]
    return merchants


def transactions(count: int, *, seed: int, anomaly_rate: float = 0.02) -> dict[str, np.ndarray]:
    """Columns: "amount" (float64 dollars, >= 0.01), "merchant" (str), "category" (str, one of CATEGORIES),
    "hour" (int64 0-23, UTC), "customer_usual_amount" (float64 > 0), "transactions_last_24h" (int64 >= 0),
    "is_anomaly" (int64 0/1)."""
    columns, _ = _transactions_with_kinds(count, seed=seed, anomaly_rate=anomaly_rate)
    return columns


def _transactions_with_kinds(
    count: int, *, seed: int, anomaly_rate: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """transactions() plus each row's anomaly kind (-1 for normal rows), for checking detectors by kind."""
    _check_count(count)
    if not 0.0 <= anomaly_rate <= 1.0:
        raise ValueError(f"anomaly_rate must lie in [0, 1], got {anomaly_rate}")
    rng = np.random.default_rng(seed)
    spend = _everyday_spend(rng, count)

    # Anomalies: an exact share of rows, at random positions, each of one kind.
    n_anomalies = round(count * anomaly_rate)
    anomalous = rng.choice(count, size=n_anomalies, replace=False)
    is_anomaly = np.zeros(count, dtype=np.int64)
    is_anomaly[anomalous] = 1
    kind = rng.choice(len(_ANOMALY_KIND_SHARES), size=n_anomalies, p=_ANOMALY_KIND_SHARES)
    _inject_anomalies(rng, spend, anomalous, kind)

    names, category = np.asarray(CATEGORIES), spend["category"]
    kinds = np.full(count, -1, dtype=np.int64)
    kinds[anomalous] = kind
    columns = {
        "amount": np.maximum(np.round(spend["amount"], 2), 0.01).astype(np.float64),
        "merchant": _merchants(rng, names[category]),
        "category": names[category],
        "hour": spend["hour"].astype(np.int64),
        "customer_usual_amount": np.maximum(spend["usual_amount"], 0.01).astype(np.float64),
        "transactions_last_24h": spend["velocity"],
        "is_anomaly": is_anomaly,
    }
    return columns, kinds


def _everyday_spend(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    """Normal card spend: each row's category index, amount, hour, 24-hour velocity and the
    customer's usual ticket."""
    mix = np.array([_CATEGORY_MIX[name] for name in CATEGORIES])
    mix /= mix.sum()
    scale = np.array([_CATEGORY_SCALE[name] for name in CATEGORIES])
    spread = np.array([_CATEGORY_SPREAD.get(name, 0.4) for name in CATEGORIES])

    # Customers: a usual ticket size, a habitual pace, and a handful of home categories.
    customers = max(1, count // 25)
    usual = np.round(np.exp(rng.normal(np.log(45.0), 0.6, customers)), 2)
    pace = rng.gamma(12.0, 2.5 / 12.0, customers)  # mean 2.5 transactions a day
    # Five distinct home categories each, drawn by weight (Gumbel top-k: sampling without replacement).
    home = np.argsort(-(np.log(mix) + rng.gumbel(size=(customers, len(CATEGORIES)))), axis=1)[:, :5]

    customer = rng.integers(0, customers, count)
    # Most spend is in a customer's home categories; the rest follows the population's mix.
    from_home = rng.random(count) < 0.7
    category = np.where(
        from_home, home[customer, rng.integers(0, 5, count)], rng.choice(len(CATEGORIES), size=count, p=mix)
    )
    usual_amount = usual[customer]
    amount = usual_amount * scale[category] * np.exp(rng.normal(0.0, spread[category]))
    hour = _normal_hours(rng, np.asarray(CATEGORIES)[category])
    velocity = rng.poisson(pace[customer]).astype(np.int64)
    return {
        "category": category,
        "amount": amount,
        "hour": hour,
        "velocity": velocity,
        "usual_amount": usual_amount,
    }


def _inject_anomalies(
    rng: np.random.Generator, spend: dict[str, np.ndarray], anomalous: np.ndarray, kind: np.ndarray
) -> None:
    """Rewrite the `anomalous` rows of `spend` in place, each as its kind of fraud."""
    category, amount, hour, velocity = (spend[k] for k in ("category", "amount", "hour", "velocity"))
    scale = np.array([_CATEGORY_SCALE[name] for name in CATEGORIES])
    risky = np.array([CATEGORIES.index(name) for name in _RISKY_CATEGORIES])

    def typical(rows: np.ndarray) -> np.ndarray:
        return spend["usual_amount"][rows] * scale[category[rows]]

    def log_uniform(low: float, high: float, size: int) -> np.ndarray:
        return np.exp(rng.uniform(np.log(low), np.log(high), size))

    # 0: a blown-up amount, 5-50x what this category usually costs this customer, at an ordinary hour.
    # Most move to goods or cash that resell or move easily; the rest stay where they were.
    rows = anomalous[kind == 0]
    moved = rng.random(rows.size) < 0.8
    category[rows] = np.where(moved, rng.choice(risky, size=rows.size), category[rows])
    amount[rows] = typical(rows) * log_uniform(5.0, 50.0, rows.size)

    # 1: a night-time (1-5 am) purchase in a risky category, at 3-12x the usual.
    rows = anomalous[kind == 1]
    category[rows] = rng.choice(risky, size=rows.size)
    hour[rows] = rng.choice(_NIGHT_HOURS, size=rows.size)
    amount[rows] = typical(rows) * log_uniform(3.0, 12.0, rows.size)

    # 2: a velocity burst of 10-40 transactions in 24 hours: half card testing (a stolen number tried
    # with $0.50-$5 online charges), half a spree at 1.5-4x the usual in shops and risky categories.
    rows = anomalous[kind == 2]
    velocity[rows] = rng.integers(10, 41, rows.size)
    testing = rng.random(rows.size) < 0.5
    online = np.array([CATEGORIES.index(name) for name in ("shopping", "subscriptions", "entertainment")])
    spree = np.concatenate([risky, [CATEGORIES.index("shopping")]])
    category[rows] = np.where(testing, rng.choice(online, size=rows.size), rng.choice(spree, size=rows.size))
    amount[rows] = np.where(
        testing, rng.uniform(0.5, 5.0, rows.size), typical(rows) * rng.uniform(1.5, 4.0, rows.size)
    )

    # 3: the full takeover: large, at night, in a risky category, and fast.
    rows = anomalous[kind == 3]
    category[rows] = rng.choice(risky, size=rows.size)
    hour[rows] = rng.choice(_NIGHT_HOURS, size=rows.size)
    amount[rows] = typical(rows) * log_uniform(5.0, 30.0, rows.size)
    velocity[rows] = rng.integers(8, 31, rows.size)

    # 4: subtle: 2.5-5x the usual in a risky category, at the edge of the night, a little busier.
    rows = anomalous[kind == 4]
    category[rows] = rng.choice(risky, size=rows.size)
    hour[rows] = rng.choice(np.array([0, 5, 6, 23]), size=rows.size)
    amount[rows] = typical(rows) * rng.uniform(2.5, 5.0, rows.size)
    velocity[rows] = velocity[rows] + rng.integers(1, 4, rows.size)

    # 5: subtle: a modest burst (7-12 in a day) at 2-4x the usual, in any category at any hour.
    rows = anomalous[kind == 5]
    velocity[rows] = rng.integers(7, 13, rows.size)
    amount[rows] = typical(rows) * rng.uniform(2.0, 4.0, rows.size)
