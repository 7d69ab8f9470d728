"""Large synthetic lending corpora for benchmarks and scale tests, generated without a model hub.

Passages are short, varied English about consumer lending, composed from topic-specific
sentence templates filled with products, lenders, amounts, rates and terms, so a million of them
embed into a realistic, clustered vector distribution (unlike random vectors, where IVF recall
tells nothing). The same seed always gives the same corpus; queries come from a different
stream, so they are held out from the passages.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tiermesh.kit.registry import ModelVersion, home

_PRODUCTS = (
    "personal loan",
    "auto loan",
    "used car loan",
    "mortgage",
    "home equity line of credit",
    "student loan",
    "credit card",
    "debt consolidation loan",
    "small business loan",
    "payday loan",
    "credit-builder loan",
    "refinance loan",
    "motorcycle loan",
    "boat loan",
    "medical loan",
    "home improvement loan",
    "bridge loan",
    "secured credit card",
)
_LENDERS = (
    "a credit union",
    "a community bank",
    "an online lender",
    "a national bank",
    "the dealer",
    "a peer-to-peer platform",
    "a mortgage broker",
    "the servicer",
    "a finance company",
)
_PEOPLE = (
    "a nurse",
    "a teacher",
    "a first-time buyer",
    "a retiree",
    "a freelancer",
    "a student",
    "a couple",
    "a small-business owner",
    "a veteran",
    "a contractor",
    "a new graduate",
    "a single parent",
    "a warehouse worker",
    "a software engineer",
    "a farmer",
)
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "apr-interest": (
        "A {product} from {lender} at {rate}% APR over {term} months costs about ${interest:,} "
        "in interest on ${amount:,}.",
        "The APR on a {product} includes the {fee_pct}% origination fee, so it is higher than "
        "the {rate}% note rate.",
        "{person} compared a fixed {rate}% offer with a variable rate that starts lower but can "
        "rise after {years} years.",
    ),
    "amortisation": (
        "On a {term}-month {product} of ${amount:,}, early payments are mostly interest; by month "
        "{half} about half of each ${payment:,} payment goes to principal.",
        "An extra ${extra} a month on a {product} shortens the schedule by roughly {saved} months.",
        "{person} asked for an amortisation table for a ${amount:,} {product} at {rate}%.",
    ),
    "credit-scores": (
        "{person} with a score of {score} was offered {rate}% on a {product} by {lender}.",
        "Paying the {product} on time for {years} years helped {person} raise a score from "
        "{score} to {score2}.",
        "A hard inquiry for a {product} can lower a score of {score} by a few points for a year.",
    ),
    "debt-to-income": (
        "{person} earns ${income:,} a month and pays ${debts:,} in debts, a DTI of {dti}%, which "
        "{lender} reviews before approving a {product}.",
        "Lenders often cap debt-to-income near {cap}% for a {product}; {person} is at {dti}%.",
    ),
    "refinancing": (
        "Refinancing a {product} from {rate}% to {rate2}% saves {person} about ${monthly} a month "
        "but adds ${fee:,} in closing costs.",
        "The break-even point for refinancing the {product} is about {breakeven} months.",
    ),
    "fees-prepayment": (
        "{lender} charges a {fee_pct}% prepayment penalty if the {product} is paid off within {years} years.",
        "A late fee of ${late} applies when a {product} payment is more than {grace} days late.",
        "{person} paid a ${fee:,} origination fee on a ${amount:,} {product}.",
    ),
    "hardship": (
        "{person} lost hours at work and asked {lender} for a {months}-month forbearance on a {product}.",
        "A hardship plan lowered the {product} payment from ${payment:,} to ${reduced:,} for "
        "{months} months.",
    ),
    "documents": (
        "For a {product}, {lender} asked {person} for {years} years of tax returns, recent pay "
        "stubs and {months} months of bank statements.",
        "Self-employed borrowers like {person} usually show profit-and-loss statements for a {product}.",
    ),
    "fair-lending": (
        "{lender} must judge a {product} application on income and credit, not on the applicant's "
        "age, sex, marital status or national origin.",
        "After a {product} denial, {person} received an adverse action notice listing the reasons "
        "within {days} days.",
    ),
    "budgeting": (
        "{person} budgets ${income:,} a month and sets aside ${extra} toward the {product}.",
        "A ${amount:,} emergency fund would cover {months} months of {person}'s {product} payments.",
    ),
}
_SECTIONS = {
    "apr-interest": "APR and interest",
    "amortisation": "Amortisation",
    "credit-scores": "Credit scores",
    "debt-to-income": "Debt-to-income",
    "refinancing": "Refinancing",
    "fees-prepayment": "Fees and penalties",
    "hardship": "Hardship options",
    "documents": "Required documents",
    "fair-lending": "Fair lending",
    "budgeting": "Budgeting",
}
_QUESTIONS = (
    "How much interest will I pay on a ${amount:,} {product} at {rate}% over {term} months?",
    "Can {lender} charge a prepayment penalty on my {product}?",
    "What credit score do I need for a {product} at around {rate}%?",
    "Is a {dti}% debt-to-income ratio too high for a {product}?",
    "Should I refinance my {product} from {rate}% to {rate2}%?",
    "What documents does {lender} need for a {product}?",
    "My hours were cut, can I pause payments on my {product}?",
    "Why was my {product} application denied and what notice should I get?",
    "How does an extra ${extra} a month change my {product} payoff?",
    "How should {person} budget for a ${payment:,} monthly {product} payment?",
)


def _values(rng: random.Random) -> dict[str, object]:
    amount = rng.randrange(1_000, 400_000, 500)
    rate = round(rng.uniform(2.5, 29.9), 1)
    term = rng.choice((12, 24, 36, 48, 60, 72, 84, 120, 180, 360))
    payment = max(25, round(amount * (rate / 1200) / (1 - (1 + rate / 1200) ** -term)))
    income = rng.randrange(1_800, 20_000, 50)
    debts = rng.randrange(100, income // 2, 25)
    return {
        "product": rng.choice(_PRODUCTS), "lender": rng.choice(_LENDERS),
        "person": rng.choice(_PEOPLE), "amount": amount, "rate": rate,
        "rate2": round(max(1.9, rate - rng.uniform(0.5, 6)), 1), "term": term, "half": term // 2,
        "payment": payment, "reduced": payment // 2, "interest": max(0, payment * term - amount),
        "income": income, "debts": debts, "dti": round(100 * debts / income),
        "cap": rng.choice((36, 43, 45, 50)), "score": rng.randrange(520, 820),
        "score2": rng.randrange(620, 850), "years": rng.randrange(1, 8), "months": rng.randrange(2, 13),
        "extra": rng.randrange(25, 600, 25), "saved": rng.randrange(2, 60),
        "fee_pct": rng.choice((1, 2, 3, 5)), "fee": rng.randrange(200, 6_000, 50),
        "monthly": rng.randrange(15, 900), "breakeven": rng.randrange(6, 60),
        "late": rng.choice((15, 25, 29, 39, 40)), "grace": rng.choice((10, 15)), "days": rng.choice((30, 60)),
    }  # fmt: skip


def _fill(template: str, values: dict[str, object]) -> str:
    text = template.format(**values)
    return text[0].upper() + text[1:]


def passages(count: int, *, seed: int = 0) -> Iterator[dict]:
    """`count` passages in the knowledge-base format (id, title, section, text, metadata)."""
    rng = random.Random(seed)
    topics = sorted(_TEMPLATES)
    for number in range(count):
        topic = rng.choice(topics)
        values = _values(rng)
        text = _fill(rng.choice(_TEMPLATES[topic]), values)
        yield {
            "id": f"syn-{number:07d}",
            "title": f"{_SECTIONS[topic]}: {values['product']} example {number}",
            "section": _SECTIONS[topic],
            "text": text,
            "metadata": {"topic": topic, "source": "synthetic", "product": str(values["product"])},
        }


def queries(count: int, *, seed: int = 0) -> list[str]:
    """`count` consumer questions drawn from a stream independent of `passages(seed=seed)`."""
    rng = random.Random(f"queries-{seed}")
    return [_fill(rng.choice(_QUESTIONS), _values(rng)) for _ in range(count)]


def embedded(
    texts: Callable[[], Iterator[str]],
    count: int,
    *,
    model: ModelVersion,
    cache: Path,
    chunk: int = 4096,
) -> np.ndarray:
    """Embeddings of `count` texts from `texts()`, computed once with `model` and cached in `cache`.

    Embedding a million passages takes most of an hour on two cores, so the work is written to
    a memory-mapped .npy in chunks and an interrupted run resumes where it stopped; the finished
    file is renamed into place, so a present `cache` is always complete.
    """
    if cache.is_file():
        vectors = np.load(cache, mmap_mode="r")
        if vectors.shape[0] == count:
            return vectors
        raise ValueError(f"{cache}: holds {vectors.shape[0]} vectors, expected {count}")
    from tiermesh.kit.minilm import OnnxEngine

    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(cache.name + ".partial")
    progress_file = cache.with_name(cache.name + ".done")
    engine = OnnxEngine(model, token_budget=512, spin_wait="on")
    done = int(progress_file.read_text()) if partial.is_file() and progress_file.is_file() else 0
    mode = "r+" if done else "w+"
    vectors = np.lib.format.open_memmap(partial, mode=mode, dtype=np.float32, shape=(count, engine.dimension))
    stream = itertools.islice(texts(), done, count)
    with tqdm(total=count, initial=done, unit="text", desc=f"embedding {cache.name}") as bar:
        while done < count:
            batch = list(itertools.islice(stream, chunk))
            vectors[done : done + len(batch)] = np.stack([e.vector for e in engine.embed(batch)])
            vectors.flush()
            done += len(batch)
            progress_file.write_text(str(done))
            bar.update(len(batch))
    del vectors
    os.replace(partial, cache)
    progress_file.unlink(missing_ok=True)
    return np.load(cache, mmap_mode="r")


def cache_path(kind: str, count: int, seed: int, model: ModelVersion) -> Path:
    """Where `embedded` keeps the vectors of a synthetic corpus (or its queries) for a model.

    The name carries a fingerprint of the generator's output, so changing the templates never
    reuses vectors of other texts.
    """
    sample = [p["text"] for p in passages(64, seed=seed)] if kind == "passages" else queries(64, seed=seed)
    generator = hashlib.sha256("\n".join(sample).encode()).hexdigest()[:8]
    name = f"{kind}-{count}-seed{seed}-gen{generator}-{model.name}-{model.digest[7:19]}.npy"
    return home() / "synthetic" / name
