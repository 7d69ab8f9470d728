"""The bias tier as a real process behind Envoy: text scores, group metrics from the credit tier's
exported decisions through the CLI, monitoring windows, and counterfactual probes answered by the
real llm and embedder tiers."""

import subprocess

import grpc
import pytest

from services.bias import counterfactual, fairness
from services.classifiers import credit
from tiermesh.bias.v1 import bias_pb2 as pb
from tiermesh.bias.v1 import bias_pb2_grpc
from tiermesh.control.testing import running_mesh
from tiermesh.kit.testing import run_cli
from tiermesh.kit.topology import only

pytestmark = pytest.mark.integration


@pytest.fixture
def bias(mesh):
    _, status = mesh
    with grpc.insecure_channel(status["envoy"]["grpc"]) as channel:
        yield bias_pb2_grpc.BiasServiceStub(channel)


def tiermesh(mesh, *args: str) -> subprocess.CompletedProcess:
    running, status = mesh
    return run_cli(running.environ, "bias", *args, "--target", status["envoy"]["grpc"])


def test_score_text_through_envoy(bias, bias_text_model):
    found = bias.ScoreText(
        pb.ScoreTextRequest(text="Since you're on food stamps, I'd steer you to a smaller loan."), timeout=10
    )
    assert found.verdict.flagged and found.model.version == bias_text_model.version
    neutral = bias.ScoreText(
        pb.ScoreTextRequest(text="Lenders may not consider your marital status."), timeout=10
    )
    assert not neutral.verdict.flagged and neutral.verdict.evidence


def test_cli_evaluates_the_credit_tiers_exported_decisions(mesh, classifier_models):
    csv = classifier_models["credit"].artifact(credit.HOLDOUT_FILE)
    result = tiermesh(
        mesh, "evaluate", str(csv), "--truth", "defaulted", "--favorable-truth", "0",
        "--predicted", "approved", "--attribute", "sex", "--privileged", "male", "--bootstrap", "200",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    holdout = credit.read_holdout(csv)
    d = fairness.decisions(
        1 - holdout["defaulted"], holdout["approved"], (holdout["sex"] == "male").astype(int)
    )
    expected = {m.name: m.value for m in fairness.evaluate(d, bootstrap_samples=0)}
    assert (
        f"statistical_parity_difference   {expected['statistical_parity_difference']:+.4f}" in result.stdout
    )
    assert f"disparate_impact                {expected['disparate_impact']:+.4f}" in result.stdout
    assert "four-fifths rule: PASS" in result.stdout and " at 95%" in result.stdout


def test_a_monitoring_window_through_envoy_and_the_cli(mesh, bias):
    decisions = pb.DecisionBatch(
        true_labels=[1, 0, 1, 1, 0, 1],
        predicted_labels=[1, 0, 1, 0, 0, 0],
        protected_attribute="sex",
        protected_values=["male", "male", "male", "female", "female", "female"],
        privileged_values=["male"],
    )
    recorded = bias.RecordDecisions(
        pb.RecordDecisionsRequest(model_name="credit-risk", model_version="2.0.0", decisions=decisions),
        timeout=10,
    )
    assert recorded.size == 6
    result = tiermesh(mesh, "window", "credit-risk", "2.0.0", "sex")
    assert result.returncode == 0, result.stderr
    assert "6 decisions (6 with a known outcome)" in result.stdout
    assert "statistical_parity_difference   -0.6667" in result.stdout
    assert "disparate_impact                undefined" not in result.stdout
    assert "four-fifths rule: FAIL" in result.stdout


def test_a_counterfactual_probe_is_answered_by_the_real_llm_and_embedder(
    bias, language_model, embedding_model
):
    request = pb.ProbeCounterfactualRequest(
        question="I'm a woman earning $60,000. Can I get a $20,000 car loan?",
        attribute=pb.PROTECTED_CLASS_SEX,
        max_tokens=24,
        seed=3,
    )
    found = bias.ProbeCounterfactual(request, timeout=300)
    assert [v.attribute_value for v in found.variants] == ["male", "female"]
    assert "I'm a man" in found.variants[0].question and "I'm a woman" in found.variants[1].question
    assert all(v.answer.strip() for v in found.variants)
    assert found.variants[0].similarity == 1.0 and -1 <= found.variants[1].similarity <= 1
    assert found.llm.version == language_model.version and found.embedder.version == embedding_model.version
    divergences = [
        counterfactual.Divergence(
            d.variant_index,
            pb.DivergenceKind.Name(d.kind).removeprefix("DIVERGENCE_KIND_").lower(),
            d.reference_value,
            d.variant_value,
        )
        for d in found.divergences
    ]
    assert found.parity_score == pytest.approx(
        counterfactual.parity_score([v.similarity for v in found.variants], divergences)
    )
    again = bias.ProbeCounterfactual(request, timeout=300)  # greedy and seeded: reproducible
    assert [v.answer for v in again.variants] == [v.answer for v in found.variants]


def test_a_probe_with_the_llm_unreachable_names_the_hop(tmp_path, bias_text_model):
    with (
        running_mesh(tmp_path, tiers=only("bias"), BIAS_PROBE_TIMEOUT_S="2") as (_, status),
        grpc.insecure_channel(status["envoy"]["grpc"]) as channel,
    ):
        stub = bias_pb2_grpc.BiasServiceStub(channel)
        request = pb.ProbeCounterfactualRequest(
            question="Can I borrow $5,000?", attribute=pb.PROTECTED_CLASS_AGE
        )
        with pytest.raises(grpc.RpcError) as error:
            stub.ProbeCounterfactual(request, timeout=30)
    assert error.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert error.value.details().startswith("llm (")
