"""BiasService through its gRPC interface, served in-process on a free port (a real valkey-server
holds the monitoring windows)."""

import asyncio
import math
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from services.bias import fairness
from services.bias.config import BiasConfig
from services.bias.servicer import BiasTier
from tiermesh.bias.v1 import bias_pb2 as pb
from tiermesh.bias.v1 import bias_pb2_grpc
from tiermesh.kit.testing import health_while, scratch_registry, serving_in_process, tier_config

pytestmark = pytest.mark.asyncio(loop_scope="session")


def seeded(rows: int, seed: int = 3, penalty: float = 0.2) -> tuple[list[int], list[int], list[str]]:
    rng = np.random.default_rng(seed)
    sex = np.where(rng.random(rows) < 0.5, "male", "female")
    truth = (rng.random(rows) < 0.7).astype(int)
    approve = np.clip(0.2 + 0.6 * truth - penalty * (sex == "female"), 0, 1)
    return truth.tolist(), (rng.random(rows) < approve).astype(int).tolist(), sex.tolist()


def batch(rows: int = 400, **changes) -> pb.DecisionBatch:
    truth, predicted, sex = seeded(rows)
    fields = dict(
        true_labels=truth,
        predicted_labels=predicted,
        protected_attribute="sex",
        protected_values=sex,
        privileged_values=["male"],
    )
    fields.update(changes)
    return pb.DecisionBatch(**{k: v for k, v in fields.items() if v is not None})


@pytest.fixture
async def server(tmp_path, bias_text_model, store_url):
    registry = scratch_registry(tmp_path / "models", bias_text_model)
    config = tier_config(BiasConfig, store_url=store_url, max_decisions=5_000, monitor_interval_s=0.2)
    async with serving_in_process(BiasTier(config, registry=registry), config) as running:
        yield running


async def call(server, method: str, request):
    async with grpc.aio.insecure_channel(server.address) as channel:
        return await getattr(bias_pb2_grpc.BiasServiceStub(channel), method)(request, timeout=30)


async def test_evaluate_decisions_equals_the_metrics_module(server):
    request = pb.EvaluateDecisionsRequest(
        decisions=batch(), bootstrap=pb.BootstrapOptions(samples=300, seed=4)
    )
    found = await call(server, "EvaluateDecisions", request)
    truth, predicted, sex = seeded(400)
    d = fairness.decisions(truth, predicted, [int(s == "male") for s in sex])
    expected = fairness.evaluate(d, bootstrap_samples=300, seed=4)
    assert [m.metric for m in found.report.metrics] == [1, 2, 3, 4, 5]
    for got, want in zip(found.report.metrics, expected, strict=True):
        assert got.value == pytest.approx(want.value, abs=1e-12)
        assert (got.interval.lower, got.interval.upper) == pytest.approx(
            (want.interval.lower, want.interval.upper)
        )
    assert found.report.privileged.count + found.report.unprivileged.count == 400
    assert found.report.unprivileged.selection_rate < found.report.privileged.selection_rate
    assert found.model.name == "fairness-metrics" and found.model.digest.startswith("sha256:")


async def test_scores_with_a_threshold_and_a_label_mapping_give_the_same_metrics(server):
    truth, predicted, _ = seeded(400)
    scores = [0.8 if p else 0.2 for p in predicted]
    as_labels = await call(server, "EvaluateDecisions", pb.EvaluateDecisionsRequest(decisions=batch()))
    mapped = batch(
        true_labels=[2 if t else -1 for t in truth],
        predicted_labels=None,
        scores=scores,
        threshold=0.5,
        label_mapping={2: 1, -1: 0},
    )
    as_scores = await call(server, "EvaluateDecisions", pb.EvaluateDecisionsRequest(decisions=mapped))
    assert [m.value for m in as_scores.report.metrics] == [m.value for m in as_labels.report.metrics]


async def test_undefined_metrics_come_back_explained(server):
    # Nobody in the privileged group is approved: disparate impact has no value.
    decisions = batch(
        rows=4,
        true_labels=[1, 0, 1, 0],
        predicted_labels=[1, 1, 0, 0],
        protected_values=["f", "f", "m", "m"],
        privileged_values=["m"],
    )
    found = await call(server, "EvaluateDecisions", pb.EvaluateDecisionsRequest(decisions=decisions))
    impact = found.report.metrics[1]
    assert impact.undefined and "privileged group has no favourable predictions" in impact.undefined_reason
    assert found.report.four_fifths == pb.FOUR_FIFTHS_VERDICT_UNDEFINED


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"protected_values": []}, "decisions.protected_values"),
        ({"predicted_labels": [1, 0]}, "decisions.predicted_labels"),
        ({"true_labels": [1] * 399}, "decisions.true_labels"),
        ({"true_labels": []}, "decisions.true_labels"),
        ({"true_labels": [2] * 400}, "decisions.true_labels"),
        ({"predicted_labels": None}, "decisions.predicted_labels"),
        ({"scores": [0.5] * 400}, "decisions.scores"),
        ({"predicted_labels": None, "scores": [1.5] * 400}, "decisions.scores"),
        ({"predicted_labels": None, "scores": [math.nan] * 400}, "decisions.scores"),
        ({"predicted_labels": None, "scores": [0.5] * 400, "threshold": 2.0}, "decisions.threshold"),
        ({"threshold": 0.5}, "decisions.threshold"),
        ({"privileged_values": []}, "decisions.privileged_values"),
        ({"privileged_values": ["nobody"]}, "decisions.privileged_values"),
        ({"privileged_values": ["male", "female"]}, "decisions.protected_values"),
        ({"protected_attribute": ""}, "decisions.protected_attribute"),
        ({"favorable_label": 3}, "decisions.favorable_label"),
        ({"label_mapping": {2: 5}}, "decisions.label_mapping[2]"),
    ],
)
async def test_bad_decision_batches_name_the_field(server, changes, field):
    request = pb.EvaluateDecisionsRequest(decisions=batch(**changes))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(server, "EvaluateDecisions", request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(field + ":"), error.value.details()


async def test_more_decisions_than_the_cap_and_bad_bootstrap_options_are_refused(server):
    for request, field in (
        (pb.EvaluateDecisionsRequest(decisions=batch(rows=5_001)), "decisions.protected_values"),
        (pb.EvaluateDecisionsRequest(), "decisions"),
        (
            pb.EvaluateDecisionsRequest(decisions=batch(), bootstrap=pb.BootstrapOptions(samples=-1)),
            "bootstrap.samples",
        ),
        (
            pb.EvaluateDecisionsRequest(
                decisions=batch(), bootstrap=pb.BootstrapOptions(confidence_level=1.5)
            ),
            "bootstrap.confidence_level",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call(server, "EvaluateDecisions", request)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith(field + ":"), error.value.details()


async def test_score_text_returns_evidence_and_counts_flags(server, bias_text_model):
    advice = "At your age, a 30-year mortgage makes no sense; take a 10-year term instead."
    found = await call(server, "ScoreText", pb.ScoreTextRequest(text=advice))
    verdict = found.verdict
    assert verdict.flagged and verdict.threshold == pytest.approx(0.3)
    assert found.model.version == bias_text_model.version
    (evidence,) = [e for e in verdict.evidence if e.used_as_basis]
    assert evidence.protected_class == pb.PROTECTED_CLASS_AGE
    assert advice[evidence.start : evidence.end] == evidence.span and evidence.cues
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    assert f'tiermesh_bias_texts_flagged_total{{model_version="{bias_text_model.version}"}}' in scrape
    assert "tiermesh_bias_text_score_bucket" in scrape


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ScoreTextRequest(text="  "), "text"),
        (pb.ScoreTextRequest(text="x" * 16_385), "text"),
        (pb.ScoreTextRequest(text="fine", model_version="9.9.9"), "model_version"),
    ],
)
async def test_bad_texts_are_refused(server, request_, field):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(server, "ScoreText", request_)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(field + ":")


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ProbeCounterfactualRequest(question="", attribute=pb.PROTECTED_CLASS_SEX), "question"),
        (pb.ProbeCounterfactualRequest(question="Can I borrow $5,000?"), "attribute"),
        (
            pb.ProbeCounterfactualRequest(
                question="Can I borrow $5,000?", attribute=pb.PROTECTED_CLASS_AGE, values=["30"]
            ),
            "values",
        ),
        (
            pb.ProbeCounterfactualRequest(
                question="Can I borrow $5,000?", attribute=pb.PROTECTED_CLASS_SEX, max_tokens=0
            ),
            "max_tokens",
        ),
        (
            pb.ProbeCounterfactualRequest(
                question="Can I borrow $5,000?", attribute=pb.PROTECTED_CLASS_SEX, temperature=-1
            ),
            "temperature",
        ),
    ],
)
async def test_bad_probes_are_refused_before_any_generation(server, request_, field):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(server, "ProbeCounterfactual", request_)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(field + ":"), error.value.details()


async def test_a_window_rolls_its_metrics_match_and_its_gauges_are_exported(server):
    window = dict(model_name="credit-risk", model_version="7.0.0")
    truth, predicted, sex = seeded(3_000, seed=11)
    # The first 2,000 decisions have known outcomes; the last 1,000 not yet.
    for start, known in ((0, True), (1_000, True), (2_000, False)):
        rows = slice(start, start + 1_000)
        decisions = batch(
            true_labels=truth[rows] if known else [],
            predicted_labels=predicted[rows],
            protected_values=sex[rows],
        )
        recorded = await call(
            server, "RecordDecisions", pb.RecordDecisionsRequest(**window, decisions=decisions)
        )
    assert recorded.size == 3_000 and recorded.capacity == 10_000
    request = pb.EvaluateWindowRequest(
        window=pb.DecisionWindow(**window, protected_attribute="sex"),
        bootstrap=pb.BootstrapOptions(samples=0),
    )
    found = await call(server, "EvaluateWindow", request)
    assert (found.decisions, found.decisions_with_outcome) == (3_000, 2_000)
    assert list(found.privileged_values) == ["male"]
    male = np.array([s == "male" for s in sex], dtype=int)
    everything = fairness.evaluate(fairness.decisions(truth, predicted, male), bootstrap_samples=0)
    known = fairness.evaluate(
        fairness.decisions(truth[:2_000], predicted[:2_000], male[:2_000]), bootstrap_samples=0
    )
    expected = [everything[0], everything[1], *known[2:]]  # parity on all, outcomes on known
    for got, want in zip(found.report.metrics, expected, strict=True):
        assert got.value == pytest.approx(want.value, abs=1e-12), want.name
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    line = next(
        line
        for line in scrape.splitlines()
        if line.startswith("tiermesh_bias_fairness{")
        and 'model_version="7.0.0"' in line
        and "disparate_impact" in line
    )
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(everything[1].value)


async def test_a_window_keeps_its_privileged_values_and_unknown_windows_are_explained(server):
    window = dict(model_name="credit-risk", model_version="8.0.0")
    await call(server, "RecordDecisions", pb.RecordDecisionsRequest(**window, decisions=batch(rows=10)))
    changed = batch(rows=10, privileged_values=["female"])
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(server, "RecordDecisions", pb.RecordDecisionsRequest(**window, decisions=changed))
    assert error.value.details().startswith("decisions.privileged_values:")
    missing = pb.DecisionWindow(model_name="credit-risk", model_version="0.0.1", protected_attribute="sex")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(server, "EvaluateWindow", pb.EvaluateWindowRequest(window=missing))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    for bad, field in (
        (pb.RecordDecisionsRequest(model_version="1", decisions=batch(rows=10)), "model_name"),
        (
            pb.RecordDecisionsRequest(model_name="m", model_version="1 0", decisions=batch(rows=10)),
            "model_version",
        ),
        (
            pb.RecordDecisionsRequest(
                model_name="m", model_version="1", decisions=batch(rows=10, protected_attribute="a/b")
            ),
            "decisions.protected_attribute",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call(server, "RecordDecisions", bad)
        assert error.value.details().startswith(field + ":"), error.value.details()


@pytest.fixture
async def storeless(tmp_path, bias_text_model):
    """The tier without a monitoring store: ScoreText needs none."""
    registry = scratch_registry(tmp_path / "models", bias_text_model)
    config = tier_config(BiasConfig, max_text_mentions=500)
    async with serving_in_process(BiasTier(config, registry=registry), config) as running:
        yield running


async def test_health_checks_answer_while_crafted_texts_are_scored(storeless, caplog):
    crafted = "women " * 2730  # one 16 KB sentence of mentions: ~20 s on the event loop before
    async with grpc.aio.insecure_channel(storeless.address) as channel:
        stub = bias_pb2_grpc.BiasServiceStub(channel)
        calls = [
            asyncio.ensure_future(stub.ScoreText(pb.ScoreTextRequest(text=crafted), timeout=60))
            for _ in range(4)
        ]
        statuses = await health_while(channel, BiasTier.service_names[0], calls)
        answers = await asyncio.gather(*calls)
    assert set(statuses) == {health_pb2.HealthCheckResponse.SERVING}
    for answer in answers:
        assert len(answer.verdict.evidence) == 500 and not answer.verdict.flagged  # the cap held
        assert {e.protected_class for e in answer.verdict.evidence} == {pb.PROTECTED_CLASS_SEX}
    assert "scored the first 500 of 2730 protected-class mentions" in caplog.text
