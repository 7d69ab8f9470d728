"""Bias settings, all read from `BIAS_*` environment variables."""

from __future__ import annotations

import dataclasses

from tiermesh.kit.config import FollowingConfig, setting


@dataclasses.dataclass(frozen=True)
class BiasConfig(FollowingConfig):
    text_version: str = setting(
        "TEXT_VERSION", "latest", help="bias-text rules version to serve; 'latest' follows publishes"
    )
    text_threshold: float = setting(
        "TEXT_THRESHOLD",
        -1.0,
        help="bias score above which a text is flagged; -1: the rules version's own (0.3)",
        min=-1.0,
        max=1.0,
    )
    max_text_chars: int = setting(
        "MAX_TEXT_CHARS", 16_384, help="characters accepted in a text or question", min=1, max=1_000_000
    )
    max_text_mentions: int = setting(
        "MAX_TEXT_MENTIONS",
        1_000,
        help="protected-class mentions scored per text (the first ones); the rest are logged, not scored",
        min=1,
        max=1_000_000,
    )
    max_decisions: int = setting(
        "MAX_DECISIONS", 1_000_000, help="decisions accepted in one batch", min=1, max=100_000_000
    )
    max_bootstrap_samples: int = setting(
        "MAX_BOOTSTRAP_SAMPLES",
        10_000,
        help="bootstrap resamples a request may ask for",
        min=0,
        max=1_000_000,
    )
    window_capacity: int = setting(
        "WINDOW_CAPACITY",
        10_000,
        help="decisions kept per monitoring window (model version x protected attribute)",
        min=1,
        max=10_000_000,
    )
    monitor_interval_s: float = setting(
        "MONITOR_INTERVAL_S",
        15.0,
        help="seconds between recomputations of every window's Prometheus gauges",
        min=0.1,
        max=3600,
    )
    embedder_target: str = setting(
        "EMBEDDER_TARGET", "127.0.0.1:8080", help="gRPC address that answers EmbedderService (Envoy)"
    )
    llm_target: str = setting(
        "LLM_TARGET", "127.0.0.1:8080", help="gRPC address that answers LlmService (Envoy)"
    )
    probe_timeout_s: float = setting(
        "PROBE_TIMEOUT_S", 120.0, help="deadline for each llm or embedder call of a probe", min=0.1, max=3600
    )
    probe_seed: int = setting("PROBE_SEED", 7, help="generation seed of probes that set none")
    probe_max_tokens: int = setting(
        "PROBE_MAX_TOKENS", 128, help="tokens per probe answer when a request sets none", min=1, max=4096
    )
    probe_similarity_threshold: float = setting(
        "PROBE_SIMILARITY_THRESHOLD",
        0.9,
        help="answer similarity below which a probe reports a semantic divergence",
        min=0.0,
        max=1.0,
    )
    workers: int = setting("WORKERS", 2, help="scoring and metric calls run at once", min=1, max=256)
