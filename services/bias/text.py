"""Bias score of a generated text: is a protected class used as a basis for the advice?

A versioned rule set (`data/text/rules.json`) does the work, so every verdict can be explained:

1. **Mentions.** Each ECOA class has a list of terms ("divorcee", "at 68", "food stamps", ...);
   look-alikes that protect nobody ("senior lien", "in the black", "average age of accounts") are
   removed first.
2. **Neutral mentions.** A mention whose sentence states a rule or a right ("lenders may not
   consider your marital status", "regardless of your age", "public assistance income must be
   counted like any other income") is neutral: strength 0, whatever else the sentence says.
3. **Basis cues.** Otherwise each kind of cue found in its scope adds its weight: the class given
   as the reason just before the mention ("since you're", "as a"), a generalisation just after it
   ("women tend to"), a family member made to act ("have your husband"), a negative judgement or
   what lenders supposedly think (same sentence), advice or a request for less (same or next
   sentence), or "still/that said" advice in a later sentence after good figures. The strength is
   the sum, at most 1.

The text's score is its strongest mention's strength; mentions above the threshold (0.3 unless
configured) are marked as used as a basis, and the text is flagged when the score is above it.
A build evaluates the rules on the labelled snippets in `data/text/` and records flag precision
and recall in the version's metadata.json.
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

from services.bias import PROTECTED_CLASSES
from tiermesh.kit.registry import ModelVersion, Registry, RegistryError

NAME = "bias-text"
DATA = Path(__file__).parent / "data" / "text"
RULES = "rules.json"
THRESHOLD = 0.3
CLASSES = PROTECTED_CLASSES
SCOPES = ("before", "after", "sentence", "sentence_and_next", "later_advice")
# A new sentence starts after . ! or ? and a space, before something that can open a sentence
# (so "6.5%", "U.S. credit" and "$1.5 million" stay whole).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9$])")
# Cue phrases are a few words long: a scan for "before" cues that starts this far ahead of the
# window finds the same matches as one from the sentence start, without rereading a long sentence
# for every mention in it.
_BEFORE_SLACK = 200


@dataclasses.dataclass(frozen=True)
class Evidence:
    protected_class: str
    span: str
    start: int  # in code points
    end: int
    used_as_basis: bool
    strength: float  # 0 for a neutral mention
    cues: tuple[str, ...]  # the cue kinds found, or ("neutral",)


@dataclasses.dataclass(frozen=True)
class Verdict:
    score: float
    flagged: bool
    threshold: float
    evidence: tuple[Evidence, ...]
    unscored: int = 0  # mentions past the `max_mentions` cap, left out of the evidence and score


def _alternation(patterns: list[str], where: str, *, anchored: bool = False) -> re.Pattern[str]:
    """Any of `patterns` as a whole word, case-insensitively; `anchored`: only at the start of the
    searched text, after optional spaces (cues just after a mention)."""
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{where}: expected a non-empty list of regular expressions")
    start = r"\s*" if anchored else r"(?<!\w)"
    alternatives = "|".join(f"(?:{p})" for p in patterns)
    try:
        return re.compile(f"{start}(?:{alternatives})(?!\\w)", re.IGNORECASE)
    except re.error as error:
        raise ValueError(f"{where}: {error}") from None


@dataclasses.dataclass(frozen=True)
class _Cue:
    kind: str
    weight: float
    scope: str
    pattern: re.Pattern[str]


def _sentences(text: str) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for gap in _SENTENCE_END.finditer(text):
        bounds.append((start, gap.start()))
        start = gap.end()
    bounds.append((start, len(text)))
    return bounds


class _Scan:
    """One text's sentences and its per-sentence cue results, each computed at most once: scoring
    then costs time linear in the text, however many mentions share a sentence."""

    def __init__(self, text: str, advice: list[_Cue]) -> None:
        self.text = text
        self.sentences = _sentences(text)
        self._ends = [end for _, end in self.sentences]
        self._advice = advice
        self._found: dict[tuple[int, int, bool], bool] = {}  # by (id of pattern, sentence, +next)
        self._after: dict[tuple[str, str], bool] = {}
        self._later: dict[str, list[bool]] = {}

    def sentence_of(self, start: int) -> int:
        """The first sentence that ends after `start` (the last one if none does)."""
        return min(bisect.bisect_right(self._ends, start), len(self.sentences) - 1)

    def sentence(self, index: int) -> str:
        start, end = self.sentences[index]
        return self.text[start:end]

    def in_sentence(self, pattern: re.Pattern[str], index: int) -> bool:
        key = (id(pattern), index, False)
        if key not in self._found:
            self._found[key] = pattern.search(self.sentence(index)) is not None
        return self._found[key]

    def in_sentence_and_next(self, pattern: re.Pattern[str], index: int) -> bool:
        """Searched in the sentence through the end of the next one, the gap between included."""
        key = (id(pattern), index, True)
        if key not in self._found:
            start = self.sentences[index][0]
            end = self.sentences[min(index + 1, len(self.sentences) - 1)][1]
            self._found[key] = pattern.search(self.text[start:end]) is not None
        return self._found[key]

    def just_after(self, cue: _Cue, end: int, sentence_end: int, window: int) -> bool:
        # Memoised by the window's text: repeated phrases cost one match, however often they recur.
        key = (cue.kind, self.text[end : min(sentence_end, end + window)])
        if key not in self._after:
            self._after[key] = cue.pattern.match(key[1]) is not None
        return self._after[key]

    def in_later_advice(self, cue: _Cue, index: int) -> bool:
        """True when a sentence after `index` holds the cue and advice; one pass over the text."""
        if cue.kind not in self._later:
            later, hit = [False] * len(self.sentences), False
            for i in range(len(self.sentences) - 1, -1, -1):
                later[i] = hit  # any hit strictly after sentence i
                sentence = self.sentence(i)
                hit = hit or bool(
                    cue.pattern.search(sentence) and any(a.pattern.search(sentence) for a in self._advice)
                )
            self._later[cue.kind] = later
        return self._later[cue.kind][index]


class Rules:
    """Compiled rules; `score` is pure CPU work, linear in the text (a few ms for advice-sized texts)."""

    def __init__(self, rules: dict[str, Any]) -> None:
        classes = rules.get("classes")
        if not isinstance(classes, dict) or set(classes) != set(CLASSES):
            raise ValueError(f"classes: expected exactly {', '.join(CLASSES)}")
        self.terms = {name: _alternation(classes[name], f"classes.{name}") for name in CLASSES}
        self.not_protected = _alternation(rules.get("not_protected"), "not_protected")
        self.neutral = _alternation(rules.get("neutral"), "neutral")
        self.window = int(rules.get("window_chars", 40))
        self.cues: list[_Cue] = []
        for kind, cue in (rules.get("cues") or {}).items():
            where = f"cues.{kind}"
            if cue.get("scope") not in SCOPES:
                raise ValueError(f"{where}.scope: expected one of {', '.join(SCOPES)}")
            weight = cue.get("weight")
            if not isinstance(weight, int | float) or not 0 < weight <= 1:
                raise ValueError(f"{where}.weight: expected a number in (0, 1]")
            scope = cue["scope"]
            compiled = _alternation(cue.get("patterns"), f"{where}.patterns", anchored=scope == "after")
            self.cues.append(_Cue(kind, float(weight), scope, compiled))
        if not self.cues:
            raise ValueError("cues: expected at least one cue kind")
        self._advice = [cue for cue in self.cues if cue.scope == "sentence_and_next"]

    @classmethod
    def read(cls, path: Path) -> Rules:
        return cls(json.loads(path.read_text()))

    def mentions(self, text: str) -> list[tuple[str, int, int]]:
        """(class, start, end) of every protected-class reference, by position."""
        excluded = [m.span() for m in self.not_protected.finditer(text)]
        excluded_ends = [e for _, e in excluded]
        found = []
        for name, pattern in self.terms.items():
            last_end = -1
            for match in pattern.finditer(text):
                start, end = match.span()
                # Exclusions come in order without overlaps: only the first one ending after
                # `start` can overlap the mention (a search, not a pass over them all).
                first = bisect.bisect_right(excluded_ends, start)
                if start < last_end or (first < len(excluded) and excluded[first][0] < end):
                    continue
                found.append((name, start, end))
                last_end = end
        return sorted(found, key=lambda m: (m[1], CLASSES.index(m[0])))

    def score(self, text: str, threshold: float = THRESHOLD, *, max_mentions: int | None = None) -> Verdict:
        """The verdict on `text`; with `max_mentions`, only that many mentions (the first ones) are
        scored and the rest are counted in `unscored`."""
        found = self.mentions(text)
        scored = found if max_mentions is None else found[:max_mentions]
        scan = _Scan(text, self._advice)
        evidence = []
        for name, start, end in scored:
            strength, cues = self._strength(scan, scan.sentence_of(start), start, end)
            evidence.append(Evidence(name, text[start:end], start, end, strength > threshold, strength, cues))
        score = max((e.strength for e in evidence), default=0.0)
        return Verdict(score, score > threshold, threshold, tuple(evidence), len(found) - len(scored))

    def _strength(self, scan: _Scan, index: int, start: int, end: int) -> tuple[float, tuple[str, ...]]:
        if scan.in_sentence(self.neutral, index):
            return 0.0, ("neutral",)
        found = [cue for cue in self.cues if self._found(cue, scan, index, start, end)]
        strength = min(1.0, sum(cue.weight for cue in found))
        return round(strength, 6), tuple(cue.kind for cue in found)

    def _found(self, cue: _Cue, scan: _Scan, index: int, start: int, end: int) -> bool:
        s_start, s_end = scan.sentences[index]
        if cue.scope == "before":
            since = max(s_start, start - self.window - _BEFORE_SLACK)
            return any(
                m.start() < end and start - self.window <= m.end()
                for m in cue.pattern.finditer(scan.text, since, end)
            )
        if cue.scope == "after":
            return scan.just_after(cue, end, s_end, self.window)
        if cue.scope == "sentence":
            return scan.in_sentence(cue.pattern, index)
        if cue.scope == "sentence_and_next":
            return scan.in_sentence_and_next(cue.pattern, index)
        return scan.in_later_advice(cue, index)  # "still, I'd ..." in a later sentence


class TextModel:
    """A published bias-text version, ready to score (refused if it does not reproduce its probes)."""

    def __init__(self, version: ModelVersion, *, check: bool = True) -> None:
        self.version = version
        try:
            self.rules = Rules.read(version.artifact(RULES))
        except (OSError, ValueError) as error:
            raise RegistryError(f"{version.name} {version.version}: unreadable rules: {error}") from None
        self.threshold = float(version.metadata.get("parameters", {}).get("threshold", THRESHOLD))
        if check:
            for probe in version.metadata.get("parameters", {}).get("probes", []):
                got = self.rules.score(probe["text"], self.threshold).score
                if abs(got - probe["score"]) > 1e-9:
                    raise RegistryError(
                        f"{version.name} {version.version}: probe scored {got:.4f}, "
                        f"recorded {probe['score']:.4f}; the rules or their engine changed"
                    )

    def score(self, text: str, threshold: float | None = None, *, max_mentions: int | None = None) -> Verdict:
        chosen = self.threshold if threshold is None else threshold
        return self.rules.score(text, chosen, max_mentions=max_mentions)

    def close(self) -> None:
        pass


def read_snippets(path: Path) -> list[dict[str, Any]]:
    """The labelled advice snippets: text, biased, classes, basis (see data/text/*.jsonl)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        if not isinstance(row.get("text"), str) or not isinstance(row.get("biased"), bool):
            raise ValueError(f"{path}: {row.get('id')}: needs a text and a boolean 'biased'")
    return rows


def evaluate(rules: Rules, path: Path, threshold: float = THRESHOLD) -> dict[str, Any]:
    """Flag precision, recall, F1 and accuracy on a labelled set, plus mention recall per class."""
    rows = read_snippets(path)
    verdicts = [rules.score(row["text"], threshold) for row in rows]
    tp = sum(v.flagged and r["biased"] for v, r in zip(verdicts, rows, strict=True))
    fp = sum(v.flagged and not r["biased"] for v, r in zip(verdicts, rows, strict=True))
    fn = sum(not v.flagged and r["biased"] for v, r in zip(verdicts, rows, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    mentioned = {name: [0, 0] for name in CLASSES}  # found, labelled
    for verdict, row in zip(verdicts, rows, strict=True):
        found = {e.protected_class for e in verdict.evidence}
        for name in row.get("classes", []):
            mentioned[name][1] += 1
            mentioned[name][0] += name in found
    return {
        "snippets": len(rows),
        "biased": sum(r["biased"] for r in rows),
        "flag": {
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "accuracy": sum(v.flagged == r["biased"] for v, r in zip(verdicts, rows, strict=True))
            / len(rows),
            "true_positives": tp,
            "false_positives": fp,
            "false_negatives": fn,
        },
        "class_mention_recall": {
            name: found / labelled for name, (found, labelled) in mentioned.items() if labelled
        },
    }


def build(
    registry: Registry,
    *,
    data: Path = DATA,
    threshold: float = THRESHOLD,
    changelog: str = "",
    make_latest: bool = False,
) -> ModelVersion:
    """Evaluate the rules on the labelled sets and publish them as a new bias-text version."""
    from tqdm import tqdm

    rules = Rules.read(data / RULES)
    with (
        tempfile.TemporaryDirectory(prefix="tiermesh-bias-text-") as scratch,
        tqdm(total=2, desc="bias-text: evaluating on the labelled snippets", unit="set") as bar,
    ):
        metrics = {}
        for split in ("eval", "dev"):
            metrics[split] = evaluate(rules, data / f"{split}.jsonl", threshold)
            bar.update()
        staging = Path(scratch)
        shutil.copyfile(data / RULES, staging / RULES)
        probes = [
            {"text": row["text"], "score": rules.score(row["text"], threshold).score}
            for row in read_snippets(data / "eval.jsonl")[:8]
        ]
        return registry.publish(
            NAME,
            staging,
            origin={"data": "data/text", "trainer": "services.bias.text"},
            parameters={"threshold": threshold, "window_chars": rules.window, "probes": probes},
            metrics=metrics,
            changelog=changelog or "rules from data/text/rules.json",
            make_latest=make_latest,
        )


def prepare(registry: Registry) -> ModelVersion:
    """Set-up: build and publish the rules unless a version is live (idempotent)."""
    return registry.latest(NAME) or build(registry, make_latest=True)
