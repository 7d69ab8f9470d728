"""The advisor's versioned prompt template: what the llm is told, and how passages are ranked.

A template is a JSON file `prompts/advisor-<version>.json`; its content digest is reported as the
gateway's model version in every answer, so a wording change is as visible (and as cache-busting)
as a new model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from tiermesh.classifiers.v1 import classifiers_pb2
from tiermesh.common.v1 import common_pb2
from tiermesh.retriever.v1 import retriever_pb2

PROMPTS = Path(__file__).parent / "prompts"
# The user's figures worth repeating to the model: amounts, rates and periods.
FIGURE_LABELS = (
    classifiers_pb2.ENTITY_LABEL_MONEY,
    classifiers_pb2.ENTITY_LABEL_PERCENT,
    classifiers_pb2.ENTITY_LABEL_DATE,
)


@dataclasses.dataclass(frozen=True)
class Template:
    """One version of the advisor prompt, with its retrieval re-ranking rule."""

    version: str
    digest: str
    system: str
    context_header: str
    passage: str
    no_context: str
    figures_header: str
    refusal: str
    candidates_per_passage: int
    topic_boost: float
    repetition_penalty: float
    intent_topics: dict[str, tuple[str, ...]]

    @property
    def model(self) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(name="advisor-prompt", version=self.version, digest=self.digest)

    def rank(
        self, passages: Sequence[retriever_pb2.Passage], intent: str, top_k: int
    ) -> list[retriever_pb2.Passage]:
        """The `top_k` best passages, those on the intent's topics lifted by `topic_boost`."""
        topics = set(self.intent_topics.get(intent, ()))

        def boosted(passage: retriever_pb2.Passage) -> float:
            return passage.score + (self.topic_boost if passage.metadata.get("topic") in topics else 0.0)

        return sorted(passages, key=boosted, reverse=True)[:top_k]

    def messages(
        self,
        question: str,
        passages: Sequence[retriever_pb2.Passage],
        entities: Sequence[classifiers_pb2.Entity],
    ) -> list[tuple[str, str]]:
        """(role, content) turns for the llm: instructions and context, then the question."""
        parts = [self.system, ""]
        if passages:
            parts.append(self.context_header)
            parts += [
                self.passage.format(
                    number=number, title=p.title, section=p.section or "general", text=p.text.strip()
                )
                for number, p in enumerate(passages, 1)
            ]
        else:
            parts.append(self.no_context)
        figures = [e.text for e in entities if e.label in FIGURE_LABELS]
        if figures:
            parts += ["", self.figures_header.format(figures="; ".join(dict.fromkeys(figures)))]
        return [("system", "\n".join(parts)), ("user", question)]


def load(version: str, folder: Path = PROMPTS) -> Template:
    """Template `version`; raises ValueError naming the file and the problem."""
    path = folder / f"advisor-{version}.json"
    try:
        raw = path.read_bytes()
        spec = json.loads(raw)
        return Template(
            version=str(spec["version"]),
            digest="sha256:" + hashlib.sha256(raw).hexdigest(),
            system=spec["system"],
            context_header=spec["context_header"],
            passage=spec["passage"],
            no_context=spec["no_context"],
            figures_header=spec["figures_header"],
            refusal=spec["refusal"],
            candidates_per_passage=int(spec["candidates_per_passage"]),
            topic_boost=float(spec["topic_boost"]),
            repetition_penalty=float(spec.get("repetition_penalty", 1.0)),
            intent_topics={intent: tuple(topics) for intent, topics in spec["intent_topics"].items()},
        )
    except FileNotFoundError:
        known = sorted(p.stem.removeprefix("advisor-") for p in folder.glob("advisor-*.json"))
        raise ValueError(f"{path}: no such prompt version (known: {', '.join(known)})") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a valid prompt template: {error!r}") from None
