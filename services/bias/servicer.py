"""The bias tier's gRPC protocol: request validation, the hot-swappable text rules, the monitor,
and the calls to the llm and embedder tiers (through Envoy) that counterfactual probes make."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import redis
from prometheus_client import Counter, Histogram

from services.bias import PROTECTED_CLASSES as CLASSES
from services.bias import counterfactual, fairness, monitor, text
from services.bias.config import BiasConfig
from services.bias.fairness import METRICS
from tiermesh.bias.v1 import bias_pb2, bias_pb2_grpc
from tiermesh.common.v1 import common_pb2
from tiermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from tiermesh.kit import telemetry
from tiermesh.kit.cancellation import raise_if_cancelled
from tiermesh.kit.errors import FailedPrecondition, InvalidArgument, Unavailable, check_text, from_downstream
from tiermesh.kit.hotswap import Follower, ModelSlot
from tiermesh.kit.registry import LATEST, ModelVersion, Registry, file_sha256
from tiermesh.llm.v1 import llm_pb2, llm_pb2_grpc

logger = logging.getLogger(__name__)
T = TypeVar("T")

# The group metrics and the probe are code, not registry models: named by their source's digest.
METRICS_MODEL = common_pb2.ModelInfo(
    name="fairness-metrics", version="1.0.0", digest="sha256:" + file_sha256(Path(fairness.__file__))
)
PROBE_MODEL = common_pb2.ModelInfo(
    name="counterfactual-probe",
    version="1.0.0",
    digest="sha256:" + file_sha256(Path(counterfactual.__file__)),
)
DEFAULT_BOOTSTRAP = 1000
# Engine names to proto enum values, by name (e.g. "age" -> PROTECTED_CLASS_AGE).
METRIC_ENUM = {name: bias_pb2.FairnessMetric.Value(f"FAIRNESS_METRIC_{name.upper()}") for name in METRICS}
CLASS_ENUM = {name: bias_pb2.ProtectedClass.Value(f"PROTECTED_CLASS_{name.upper()}") for name in CLASSES}
CLASS_OF_ENUM = {number: name for name, number in CLASS_ENUM.items()}
DIVERGENCE_ENUM = {
    kind: bias_pb2.DivergenceKind.Value(f"DIVERGENCE_KIND_{kind.upper()}")
    for kind in ("semantic", "amount", "rate", "decision")
}

TEXT_SCORES = Histogram(
    "tiermesh_bias_text_score",
    "Bias scores of scored texts",
    ["model_version"],
    buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)
TEXTS_FLAGGED = Counter("tiermesh_bias_texts_flagged", "Texts flagged as biased", ["model_version"])
PROBE_PARITY = Histogram(
    "tiermesh_bias_probe_parity",
    "Parity scores of counterfactual probes",
    ["protected_attribute"],
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
)


class BiasTier(bias_pb2_grpc.BiasServiceServicer):
    """BiasService: group metrics, text bias scores, counterfactual probes and live monitoring."""

    name = "bias"
    service_names = (bias_pb2.DESCRIPTOR.services_by_name["BiasService"].full_name,)

    def __init__(self, config: BiasConfig, *, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry or Registry()
        self.slot: ModelSlot[text.TextModel] = ModelSlot(self.name, text.NAME, text.TextModel)
        self.follower: Follower | None = None
        self.monitor = monitor.Monitor(config.store_url, config.window_capacity) if config.store_url else None
        self._pool = concurrent.futures.ThreadPoolExecutor(config.workers, thread_name_prefix="bias")
        self._channels: list[grpc.aio.Channel] = []
        self._refresher: asyncio.Task[None] | None = None

    # -- what is served (tiermesh.kit.server.Tier) ---------------------------------------------------

    @property
    def model(self) -> common_pb2.ModelInfo:
        loaded = self.slot.current
        return _info(loaded.version) if loaded else common_pb2.ModelInfo()

    def model_for(self, method: str) -> common_pb2.ModelInfo:
        return self.model if method.endswith("/ScoreText") else METRICS_MODEL

    # -- lifecycle -------------------------------------------------------------------------------

    def register(self, server: grpc.aio.Server) -> None:
        bias_pb2_grpc.add_BiasServiceServicer_to_server(self, server)

    async def start(self) -> None:
        await self.slot.load(self.registry.get(text.NAME, self.config.text_version))
        if self.config.text_version == LATEST:
            self.follower = Follower(
                tier=self.name,
                name=text.NAME,
                registry=self.registry,
                store_url=self.config.store_url,
                serving=self.slot.serving_version,
                load=self.slot.load,
                check_interval_s=self.config.check_interval_s,
            )
            self.follower.start(listen=bool(self.config.store_url))
        self._llm = llm_pb2_grpc.LlmServiceStub(self._channel(self.config.llm_target))
        self._embedder = embedder_pb2_grpc.EmbedderServiceStub(self._channel(self.config.embedder_target))
        if self.monitor is not None:
            self._refresher = asyncio.create_task(self._refresh_gauges(), name="bias-gauges")

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self.follower is not None:
            await self.follower.stop()
        for channel in self._channels:
            await channel.close()
        if self.monitor is not None:
            await self.monitor.close()
        self._pool.shutdown(wait=True)
        self.slot.close()

    def _channel(self, target: str) -> grpc.aio.Channel:
        channel = telemetry.channel(target)
        self._channels.append(channel)
        return channel

    async def _refresh_gauges(self) -> None:
        assert self.monitor is not None
        while True:
            try:
                await self.monitor.refresh()
            except (redis.RedisError, OSError, ValueError) as error:
                logger.warning("bias: cannot refresh the monitoring gauges: %s", error)
            raise_if_cancelled()
            await asyncio.sleep(self.config.monitor_interval_s)

    # -- RPCs ------------------------------------------------------------------------------------

    async def EvaluateDecisions(self, request: bias_pb2.EvaluateDecisionsRequest, context: Any):
        if not request.HasField("decisions"):
            raise InvalidArgument("decisions", "is required")
        options = self._bootstrap(request.bootstrap if request.HasField("bootstrap") else None)
        truth, predicted, privileged, _ = self._batch(request.decisions, outcomes_required=True)
        d = fairness.Decisions(truth, predicted, privileged)
        found = await self._run(lambda: fairness.evaluate(d, **options))
        return bias_pb2.EvaluateDecisionsResponse(
            report=_report(found, fairness.groups(d.table())), model=METRICS_MODEL
        )

    async def ScoreText(self, request: bias_pb2.ScoreTextRequest, context: Any):
        model = self.slot.serving(request.model_version, self.registry)
        check_text(request.text, "text", max_chars=self.config.max_text_chars)
        threshold = self.config.text_threshold if self.config.text_threshold >= 0 else None
        cap = self.config.max_text_mentions
        # Linear in the text, but a long crafted text still takes a while: off the event loop, so
        # health checks and other calls keep being answered meanwhile.
        verdict = await self._run(lambda: model.score(request.text, threshold, max_mentions=cap))
        version = model.version.version
        if verdict.unscored:  # the response has no field for it
            logger.warning(
                "bias: ScoreText scored the first %d of %d protected-class mentions "
                "(BIAS_MAX_TEXT_MENTIONS); the other %d are not in the score",
                cap,
                cap + verdict.unscored,
                verdict.unscored,
            )
        TEXT_SCORES.labels(version).observe(verdict.score)
        if verdict.flagged:
            TEXTS_FLAGGED.labels(version).inc()
        return bias_pb2.ScoreTextResponse(verdict=_verdict(verdict), model=_info(model.version))

    async def ProbeCounterfactual(self, request: bias_pb2.ProbeCounterfactualRequest, context: Any):
        check_text(request.question, "question", max_chars=self.config.max_text_chars)
        attribute = CLASS_OF_ENUM.get(request.attribute)
        if attribute is None:
            accepted = ", ".join(bias_pb2.ProtectedClass.Name(n) for n in CLASS_OF_ENUM)
            raise InvalidArgument("attribute", f"is required; accepted: {accepted}")
        try:
            variants = counterfactual.build_variants(request.question, attribute, list(request.values))
        except ValueError as error:
            field, _, reason = str(error).partition(": ")
            raise InvalidArgument(field if field in ("values", "question") else "values", reason) from None
        max_tokens = request.max_tokens if request.HasField("max_tokens") else self.config.probe_max_tokens
        if not 1 <= max_tokens <= 4096:
            raise InvalidArgument("max_tokens", f"must be between 1 and 4096, got {max_tokens}")
        temperature = request.temperature if request.HasField("temperature") else 0.0
        if not (math.isfinite(temperature) and 0 <= temperature <= 2):
            raise InvalidArgument("temperature", f"must be between 0 and 2, got {temperature}")
        sampling = llm_pb2.SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            seed=request.seed if request.HasField("seed") else self.config.probe_seed,
        )
        answers = await asyncio.gather(*(self._ask(v.question, sampling) for v in variants))
        texts = [answer.text for answer in answers]
        vectors, embedder = await self._embed(texts)
        similarities = [float(np.dot(vectors[0], vector)) for vector in vectors]
        similarities[0] = 1.0
        divergences = [
            found
            for index in range(1, len(texts))
            for found in counterfactual.compare(
                texts[0],
                texts[index],
                index=index,
                similarity=similarities[index],
                threshold=self.config.probe_similarity_threshold,
            )
        ]
        parity = counterfactual.parity_score(similarities, divergences)
        PROBE_PARITY.labels(attribute).observe(parity)
        return bias_pb2.ProbeCounterfactualResponse(
            variants=[
                bias_pb2.CounterfactualVariant(
                    attribute_value=variant.attribute_value,
                    question=variant.question,
                    answer=answer,
                    similarity=similarity,
                )
                for variant, answer, similarity in zip(variants, texts, similarities, strict=True)
            ],
            parity_score=parity,
            divergences=[
                bias_pb2.Divergence(
                    variant_index=d.variant_index,
                    kind=DIVERGENCE_ENUM[d.kind],
                    reference_value=d.reference_value,
                    variant_value=d.variant_value,
                )
                for d in divergences
            ],
            model=PROBE_MODEL,
            llm=answers[0].model,
            embedder=embedder,
        )

    async def RecordDecisions(self, request: bias_pb2.RecordDecisionsRequest, context: Any):
        store = self._monitor()
        if not request.HasField("decisions"):
            raise InvalidArgument("decisions", "is required")
        window = self._window(
            request.model_name, request.model_version, request.decisions.protected_attribute
        )
        truth, predicted, privileged, privileged_values = self._batch(
            request.decisions, outcomes_required=False
        )
        try:
            size = await store.record(window, truth, predicted, privileged, privileged_values)
        except monitor.WindowConflict as error:
            raise InvalidArgument("decisions.privileged_values", str(error)) from None
        except (redis.RedisError, OSError) as error:
            raise Unavailable(f"bias: the store is unreachable: {error}") from None
        return bias_pb2.RecordDecisionsResponse(
            window=_window_proto(window), size=size, capacity=store.capacity, model=METRICS_MODEL
        )

    async def EvaluateWindow(self, request: bias_pb2.EvaluateWindowRequest, context: Any):
        store = self._monitor()
        given = request.window
        window = self._window(
            given.model_name, given.model_version, given.protected_attribute, in_window=True
        )
        options = self._bootstrap(request.bootstrap if request.HasField("bootstrap") else None)
        try:
            found = await store.evaluate(window, **options)
        except (redis.RedisError, OSError) as error:
            raise Unavailable(f"bias: the store is unreachable: {error}") from None
        if found is None:
            raise FailedPrecondition(f"window {window.id} has no decisions: RecordDecisions fills it")
        return bias_pb2.EvaluateWindowResponse(
            window=_window_proto(window),
            report=_report(found.metrics, found.groups),
            decisions=found.decisions,
            decisions_with_outcome=found.with_outcome,
            privileged_values=found.privileged_values,
            model=METRICS_MODEL,
        )

    # -- helpers ---------------------------------------------------------------------------------

    def _monitor(self) -> monitor.Monitor:
        if self.monitor is None:
            raise FailedPrecondition("bias: monitoring needs a store (set BIAS_STORE_URL)")
        return self.monitor

    @staticmethod
    def _window(name: str, version: str, attribute: str, *, in_window: bool = False) -> monitor.Window:
        """The window, with errors naming the request's own fields."""
        prefix = "window." if in_window else ""
        where = {
            "model_name": prefix + "model_name",
            "model_version": prefix + "model_version",
            "protected_attribute": "window.protected_attribute"
            if in_window
            else "decisions.protected_attribute",
        }
        values = {"model_name": name, "model_version": version, "protected_attribute": attribute}
        for field, value in values.items():
            if not value:
                raise InvalidArgument(where[field], "is required")
        try:
            return monitor.Window(name, version, attribute)
        except ValueError as error:
            field, _, reason = str(error).partition(": ")
            raise InvalidArgument(where[field], reason) from None

    def _bootstrap(self, options: bias_pb2.BootstrapOptions | None) -> dict[str, Any]:
        samples = DEFAULT_BOOTSTRAP
        level = 0.95
        seed = 0
        if options is not None:
            if options.HasField("samples"):
                samples = options.samples
            level = options.confidence_level or 0.95
            seed = options.seed
        if not 0 <= samples <= self.config.max_bootstrap_samples:
            raise InvalidArgument(
                "bootstrap.samples", f"must be 0 to {self.config.max_bootstrap_samples}, got {samples}"
            )
        if not (math.isfinite(level) and 0 < level < 1):
            raise InvalidArgument("bootstrap.confidence_level", f"must be in (0, 1), got {level}")
        return {"bootstrap_samples": samples, "confidence_level": level, "seed": seed}

    def _batch(
        self, batch: bias_pb2.DecisionBatch, *, outcomes_required: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """(truth, predicted, privileged, privileged values) as 0/1 arrays with 1 favourable;
        truth is -1 everywhere when outcomes are optional and not given."""
        rows = len(batch.protected_values)
        if not rows:
            raise InvalidArgument("decisions.protected_values", "is empty: give one value per decision")
        if rows > self.config.max_decisions:
            raise InvalidArgument(
                "decisions.protected_values",
                f"has {rows:,} decisions; the limit is {self.config.max_decisions:,} per batch",
            )
        if not batch.protected_attribute:
            raise InvalidArgument("decisions.protected_attribute", "is required, e.g. 'sex'")
        if len(batch.protected_attribute) > 64:
            raise InvalidArgument("decisions.protected_attribute", "is longer than 64 characters")
        mapping = self._label_mapping(batch)
        if batch.predicted_labels and batch.scores:
            raise InvalidArgument("decisions.scores", "set predicted_labels or scores, not both")
        if batch.scores:
            predicted = self._scored(batch, rows)
        elif batch.predicted_labels:
            predicted = self._labels(batch.predicted_labels, "decisions.predicted_labels", rows, mapping)
            if batch.HasField("threshold"):
                raise InvalidArgument("decisions.threshold", "applies to scores only")
        else:
            raise InvalidArgument("decisions.predicted_labels", "is required (or scores with a threshold)")
        if batch.true_labels:
            truth = self._labels(batch.true_labels, "decisions.true_labels", rows, mapping)
        elif outcomes_required:
            raise InvalidArgument("decisions.true_labels", "is required: one true outcome per decision")
        else:
            truth = np.full(rows, monitor.UNKNOWN, dtype=np.int64)
        favourable = batch.favorable_label if batch.HasField("favorable_label") else 1
        if favourable not in (0, 1):
            raise InvalidArgument("decisions.favorable_label", f"must be 0 or 1, got {favourable}")
        if favourable == 0:  # the metrics count label 1 as favourable
            predicted = 1 - predicted
            truth = np.where(truth == monitor.UNKNOWN, truth, 1 - truth)
        if not batch.privileged_values:
            raise InvalidArgument("decisions.privileged_values", "is required: which values are privileged")
        privileged_values = list(batch.privileged_values)
        chosen = set(privileged_values)
        privileged = np.fromiter((v in chosen for v in batch.protected_values), dtype=np.int64, count=rows)
        if outcomes_required:
            if not privileged.any():
                raise InvalidArgument(
                    "decisions.privileged_values",
                    f"no decision has a privileged value ({', '.join(privileged_values)[:100]})",
                )
            if privileged.all():
                raise InvalidArgument(
                    "decisions.protected_values",
                    "every decision is in the privileged group: the metrics compare two groups",
                )
        return truth, predicted, privileged, privileged_values

    @staticmethod
    def _label_mapping(batch: bias_pb2.DecisionBatch) -> dict[int, int]:
        for label, mapped in batch.label_mapping.items():
            if mapped not in (0, 1):
                raise InvalidArgument(
                    f"decisions.label_mapping[{label}]", f"must map to 0 or 1, got {mapped}"
                )
        return dict(batch.label_mapping)

    @staticmethod
    def _labels(values: Any, field: str, rows: int, mapping: dict[int, int]) -> np.ndarray:
        if len(values) != rows:
            raise InvalidArgument(field, f"has {len(values)} values for {rows} decisions (protected_values)")
        labels = np.asarray(values, dtype=np.int64)
        for label, mapped in mapping.items():
            labels[labels == label] = mapped
        outside = np.flatnonzero((labels != 0) & (labels != 1))
        if outside.size:
            first = int(outside[0])
            raise InvalidArgument(
                field,
                f"labels must be 0 or 1 or have a label_mapping entry; got {values[first]} at index {first}",
            )
        return labels

    @staticmethod
    def _scored(batch: bias_pb2.DecisionBatch, rows: int) -> np.ndarray:
        if len(batch.scores) != rows:
            raise InvalidArgument(
                "decisions.scores", f"has {len(batch.scores)} values for {rows} decisions (protected_values)"
            )
        scores = np.asarray(batch.scores, dtype=np.float64)
        outside = np.flatnonzero(~((scores >= 0) & (scores <= 1)))  # NaN included
        if outside.size:
            first = int(outside[0])
            raise InvalidArgument(
                "decisions.scores", f"must be in [0, 1]; got {scores[first]} at index {first}"
            )
        threshold = batch.threshold if batch.HasField("threshold") else 0.5
        if not 0 <= threshold <= 1:  # NaN fails too
            raise InvalidArgument("decisions.threshold", f"must be in [0, 1], got {threshold}")
        return (scores >= threshold).astype(np.int64)

    async def _ask(self, question: str, sampling: llm_pb2.SamplingParams) -> llm_pb2.GenerateResponse:
        chat = llm_pb2.Chat(messages=[llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content=question)])
        try:
            return await self._llm.Generate(
                llm_pb2.GenerateRequest(chat=chat, sampling=sampling), timeout=self.config.probe_timeout_s
            )
        except grpc.aio.AioRpcError as error:
            raise from_downstream(f"llm ({self.config.llm_target})", error) from None

    async def _embed(self, texts: list[str]) -> tuple[np.ndarray, common_pb2.ModelInfo]:
        # An empty answer (e.g. max_tokens hit at once) still needs a vector to compare.
        try:
            response = await self._embedder.EmbedBatch(
                embedder_pb2.EmbedBatchRequest(texts=[t if t.strip() else "(no answer)" for t in texts]),
                timeout=self.config.probe_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            raise from_downstream(f"embedder ({self.config.embedder_target})", error) from None
        vectors = np.asarray([e.values for e in response.embeddings], dtype=np.float32)
        return vectors, response.model

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)


def _info(version: ModelVersion) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(name=version.name, version=version.version, digest=version.digest)


def _window_proto(window: monitor.Window) -> bias_pb2.DecisionWindow:
    return bias_pb2.DecisionWindow(
        model_name=window.model_name,
        model_version=window.model_version,
        protected_attribute=window.protected_attribute,
    )


def _report(
    results: list[fairness.MetricValue], groups: dict[str, fairness.Group]
) -> bias_pb2.FairnessReport:
    verdict = fairness.four_fifths(results)
    return bias_pb2.FairnessReport(
        metrics=[
            bias_pb2.MetricResult(
                metric=METRIC_ENUM[r.name],
                value=r.value if r.value is not None else 0.0,
                undefined=r.value is None,
                undefined_reason=r.undefined_reason,
                interval=(
                    bias_pb2.ConfidenceInterval(
                        lower=r.interval.lower,
                        upper=r.interval.upper,
                        level=r.interval.level,
                        samples=r.interval.samples,
                    )
                    if r.interval
                    else None
                ),
            )
            for r in results
        ],
        four_fifths=bias_pb2.FourFifthsVerdict.Value(f"FOUR_FIFTHS_VERDICT_{verdict}"),
        privileged=_group(groups["privileged"]),
        unprivileged=_group(groups["unprivileged"]),
    )


def _group(group: fairness.Group) -> bias_pb2.GroupSummary:
    return bias_pb2.GroupSummary(
        count=group.count, selection_rate=group.selection_rate, base_rate=group.base_rate
    )


def _verdict(verdict: text.Verdict) -> bias_pb2.TextBiasVerdict:
    return bias_pb2.TextBiasVerdict(
        score=verdict.score,
        flagged=verdict.flagged,
        threshold=verdict.threshold,
        evidence=[
            bias_pb2.BiasEvidence(
                protected_class=CLASS_ENUM[e.protected_class],
                span=e.span,
                start=e.start,
                end=e.end,
                used_as_basis=e.used_as_basis,
                strength=e.strength,
                cues=list(e.cues),
            )
            for e in verdict.evidence
        ],
    )
