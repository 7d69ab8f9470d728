"""Classifiers settings, all read from `CLASSIFIERS_*` environment variables."""

from __future__ import annotations

import dataclasses

from tiermesh.kit.config import FollowingConfig, setting

# Registry names of the four models (other tiers and operators use them).
INTENT = "loan-intent"
NER = "financial-ner"
CREDIT = "credit-risk"
ANOMALY = "transaction-anomaly"
MODELS = {"intent": INTENT, "ner": NER, "credit": CREDIT, "anomaly": ANOMALY}


@dataclasses.dataclass(frozen=True)
class ClassifiersConfig(FollowingConfig):
    intent_version: str = setting(
        "INTENT_VERSION", "latest", help=f"{INTENT} version to serve; 'latest' follows publishes"
    )
    ner_version: str = setting(
        "NER_VERSION", "latest", help=f"{NER} version to serve; 'latest' follows publishes"
    )
    credit_version: str = setting(
        "CREDIT_VERSION", "latest", help=f"{CREDIT} version to serve; 'latest' follows publishes"
    )
    anomaly_version: str = setting(
        "ANOMALY_VERSION", "latest", help=f"{ANOMALY} version to serve; 'latest' follows publishes"
    )
    intent_threshold: float = setting(
        "INTENT_THRESHOLD",
        -1.0,
        help="intent probability below which the answer is out_of_scope; -1: the model version's own",
        min=-1.0,
        max=1.0,
    )
    currency: str = setting("CURRENCY", "USD", help="currency of amounts whose text names none (ISO 4217)")
    max_text_chars: int = setting(
        "MAX_TEXT_CHARS", 2048, help="characters accepted in a text", min=1, max=1_000_000
    )
    threads: int = setting(
        "THREADS",
        1,
        help="ONNX Runtime threads per intent call (1 suits many small requests)",
        min=0,
        max=256,
    )
    workers: int = setting("WORKERS", 2, help="model calls run at once, off the event loop", min=1, max=256)

    def version_of(self, kind: str) -> str:
        return getattr(self, f"{kind}_version")
