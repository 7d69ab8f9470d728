"""The Advisor flow's logic over scripted tiers: order, deadlines, degraded modes, errors, ranking.

The tiers here are a script of replies (a unit test of the flow's decisions); the same flow over the
real tiers through Envoy is tested in tests/integration/test_gateway*.py.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from services.gateway import prompt
from services.gateway.config import GatewayConfig
from services.gateway.flow import Advisor, resolve
from services.gateway.tiers import Reply
from tiermesh.bias.v1 import bias_pb2
from tiermesh.classifiers.v1 import classifiers_pb2
from tiermesh.common.v1 import common_pb2
from tiermesh.embedder.v1 import embedder_pb2
from tiermesh.gateway.v1 import gateway_pb2 as g
from tiermesh.kit.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from tiermesh.kit.testing import tier_config
from tiermesh.llm.v1 import llm_pb2
from tiermesh.retriever.v1 import retriever_pb2

QUESTION = "Can I afford a $25,000 car loan on $4,000 a month?"


def model(name: str) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(name=name, version="1.0.0", digest="sha256:" + name)


def failure(code: grpc.StatusCode, details: str = "connection refused") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class ScriptedTiers:
    """Answers each RPC from a table; an exception in the table is raised instead. Records calls."""

    def __init__(self, **overrides: Any) -> None:
        self.calls: list[tuple[str, Any, float]] = []
        passages = [
            retriever_pb2.Passage(
                doc_id="kb-apr-001", score=0.70, title="APR", metadata={"topic": "apr-interest"}
            ),
            retriever_pb2.Passage(
                doc_id="kb-dti-001",
                score=0.68,
                title="DTI",
                section="Affordability",
                metadata={"topic": "debt-to-income"},
            ),
            retriever_pb2.Passage(
                doc_id="kb-misc-001", score=0.60, title="Misc", metadata={"topic": "documents"}
            ),
        ]
        self.replies: dict[str, Any] = {
            "ClassifyIntent": classifiers_pb2.ClassifyIntentResponse(
                intent=classifiers_pb2.Intent(label="loan_affordability", probability=0.9),
                model=model("loan-intent"),
            ),
            "ExtractEntities": classifiers_pb2.ExtractEntitiesResponse(
                entities=[
                    classifiers_pb2.Entity(label=classifiers_pb2.ENTITY_LABEL_MONEY, text="$25,000"),
                    classifiers_pb2.Entity(label=classifiers_pb2.ENTITY_LABEL_ORG, text="Chase"),
                ],
                model=model("financial-ner"),
            ),
            "Embed": embedder_pb2.EmbedResponse(
                embedding=embedder_pb2.Embedding(values=[0.1] * 4), model=model("all-minilm-l6-v2")
            ),
            "Search": retriever_pb2.SearchResponse(passages=passages, model=model("loan-kb")),
            "Generate": llm_pb2.GenerateResponse(
                text="Keep the payment under 10% of income [2].",
                usage=llm_pb2.Usage(prompt_tokens=300, completion_tokens=12),
                model=model("smollm2"),
            ),
            "GenerateStream": [
                llm_pb2.GenerateStreamResponse(delta="Keep the payment ", model=model("smollm2")),
                llm_pb2.GenerateStreamResponse(delta="under 10% of income [2].", model=model("smollm2")),
                llm_pb2.GenerateStreamResponse(
                    usage=llm_pb2.Usage(prompt_tokens=300, completion_tokens=12), model=model("smollm2")
                ),
            ],
            "ScoreText": bias_pb2.ScoreTextResponse(
                verdict=bias_pb2.TextBiasVerdict(score=0.0, threshold=0.3), model=model("bias-text")
            ),
        }
        self.replies.update(overrides)

    def _answer(self, rpc: str, request: Any, timeout: float) -> Any:
        self.calls.append((rpc, request, timeout))
        answer = self.replies[rpc]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def call(self, tier: int, rpc: str, request: Any, *, timeout: float, user_id: str) -> Reply:
        return Reply(self._answer(rpc, request, timeout), g.ARM_CONTROL)

    async def stream(
        self, tier: int, rpc: str, request: Any, *, timeout: float, user_id: str
    ) -> AsyncIterator[Reply]:
        for message in self._answer(rpc, request, timeout):
            yield Reply(message, g.ARM_CONTROL)

    async def close(self) -> None:
        return None

    def rpcs(self) -> list[str]:
        return [rpc for rpc, _, _ in self.calls]

    def request(self, rpc: str) -> Any:
        return next(request for name, request, _ in self.calls if name == rpc)


def advisor(tiers: ScriptedTiers, **config: Any) -> Advisor:
    return Advisor(tier_config(GatewayConfig, **config), tiers, prompt.load("1"))


async def answer(flow: Advisor, question: Any, deadline: float) -> g.Advice:
    """`flow.advise`, then wait for its cache and record writes (they run off the answer's path)."""
    advice = await flow.advise(question, deadline)
    await flow.drain()
    return advice


async def ask(tiers: ScriptedTiers, *, timeout: float | None = None, **config: Any) -> g.Advice:
    flow = advisor(tiers, **config)
    question = resolve(flow.config, QUESTION, user_id="u1", top_k=2, max_tokens=32)
    return await flow.advise(question, flow.deadline(timeout))


async def test_a_full_answer_uses_every_tier_once_and_reports_them():
    tiers = ScriptedTiers()
    advice = await ask(tiers)
    assert sorted(tiers.rpcs()) == sorted(
        ["ClassifyIntent", "ExtractEntities", "Embed", "Search", "Generate", "ScoreText"]
    )
    assert advice.text == "Keep the payment under 10% of income [2]."
    assert advice.bias.status == g.BIAS_CHECK_STATUS_CHECKED and not advice.degraded_modes
    assert advice.intent.label == "loan_affordability" and len(advice.entities) == 2
    assert {v.model.name for v in advice.versions} == {
        "advisor-prompt",
        "loan-intent",
        "financial-ner",
        "all-minilm-l6-v2",
        "loan-kb",
        "smollm2",
        "bias-text",
    }
    assert [t.status_code for t in advice.timings] == ["OK"] * 6
    assert advice.usage.completion_tokens == 12 and advice.response_id.startswith("resp_")


async def test_passages_on_the_intents_topics_are_lifted_and_the_prompt_carries_them_and_the_figures():
    tiers = ScriptedTiers()
    advice = await ask(tiers)
    # top_k=2 of 3 candidates (k = top_k x candidates_per_passage); the DTI passage (0.68) is on
    # loan_affordability's topics and overtakes the APR passage (0.70)
    assert tiers.request("Search").k == 2 * prompt.load("1").candidates_per_passage
    assert [s.doc_id for s in advice.sources] == ["kb-dti-001", "kb-apr-001"]
    system, user = tiers.request("Generate").chat.messages
    assert user.content == QUESTION and user.role == llm_pb2.ROLE_USER
    assert "[1] DTI (Affordability)" in system.content and "[2] APR (general)" in system.content
    assert "$25,000" in system.content and "Chase" not in system.content  # figures only, not every entity


def intent(
    label: str, probability: float, top: str, low_confidence: bool
) -> classifiers_pb2.ClassifyIntentResponse:
    return classifiers_pb2.ClassifyIntentResponse(
        intent=classifiers_pb2.Intent(
            label=label,
            probability=probability,
            low_confidence=low_confidence,
            candidates=[classifiers_pb2.IntentCandidate(label=top, probability=probability)],
        )
    )


async def test_out_of_scope_questions_get_the_refusal_without_retrieval_or_generation():
    tiers = ScriptedTiers(ClassifyIntent=intent("out_of_scope", 0.96, "out_of_scope", False))
    advice = await ask(tiers)
    assert advice.out_of_scope and advice.text == prompt.load("1").refusal
    assert "Generate" not in tiers.rpcs() and "Search" not in tiers.rpcs()
    assert not advice.sources and advice.usage.completion_tokens == 0


async def test_a_low_confidence_loan_question_is_answered_without_the_topic_boost():
    # the classifier labels it out_of_scope only because no loan intent was confident enough
    tiers = ScriptedTiers(ClassifyIntent=intent("out_of_scope", 0.31, "loan_affordability", True))
    advice = await ask(tiers)
    assert not advice.out_of_scope and "Generate" in tiers.rpcs()
    assert [s.doc_id for s in advice.sources] == ["kb-apr-001", "kb-dti-001"]  # by score alone


async def test_bias_tier_down_marks_the_advice_unchecked_never_clean():
    tiers = ScriptedTiers(ScoreText=failure(grpc.StatusCode.UNAVAILABLE))
    advice = await ask(tiers)
    assert advice.text  # the advice is still returned
    assert advice.bias.status == g.BIAS_CHECK_STATUS_UNCHECKED
    assert not advice.bias.HasField("verdict")
    assert advice.bias.unchecked_reason.startswith("bias: UNAVAILABLE")
    assert list(advice.degraded_modes) == [g.DEGRADED_MODE_BIAS_UNCHECKED]


async def test_classifiers_down_is_one_degraded_mode_and_the_answer_goes_on_without_them():
    down = failure(grpc.StatusCode.UNAVAILABLE)
    tiers = ScriptedTiers(ClassifyIntent=down, ExtractEntities=down)
    advice = await ask(tiers)
    assert list(advice.degraded_modes) == [g.DEGRADED_MODE_CLASSIFIERS_SKIPPED]
    assert not advice.HasField("intent") and not advice.entities
    assert "Generate" in tiers.rpcs() and advice.bias.status == g.BIAS_CHECK_STATUS_CHECKED


@pytest.mark.parametrize(("rpc", "hop"), [("Search", "retriever"), ("Embed", "embedder")])
async def test_retrieval_down_is_unavailable_naming_the_hop_unless_configured(rpc, hop):
    tiers = ScriptedTiers(**{rpc: failure(grpc.StatusCode.UNAVAILABLE)})
    with pytest.raises(Unavailable, match=f"^{hop}: UNAVAILABLE"):
        await ask(tiers)
    assert "Generate" not in tiers.rpcs()

    tiers = ScriptedTiers(**{rpc: failure(grpc.StatusCode.UNAVAILABLE)})
    advice = await ask(tiers, answer_without_sources=True)
    assert list(advice.degraded_modes) == [g.DEGRADED_MODE_SOURCES_SKIPPED] and not advice.sources
    system = tiers.request("Generate").chat.messages[0].content
    assert prompt.load("1").no_context in system


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
    ],
)
async def test_llm_failures_fail_the_request_naming_the_llm(code, error):
    tiers = ScriptedTiers(Generate=failure(code, "gone"))
    with pytest.raises(error, match=f"^llm: {code.name}: gone"):
        await ask(tiers)
    assert "ScoreText" not in tiers.rpcs()


async def test_envoys_circuit_breaker_overflow_is_a_load_refusal_not_an_outage():
    overflow = "upstream connect error or disconnect/reset before headers. reset reason: overflow"
    tiers = ScriptedTiers(Search=failure(grpc.StatusCode.UNAVAILABLE, overflow))
    with pytest.raises(ResourceExhausted, match=r"^retriever: UNAVAILABLE: .*overflow"):
        await ask(tiers)


async def test_a_refused_option_downstream_is_the_callers_invalid_argument():
    tiers = ScriptedTiers(Search=failure(grpc.StatusCode.INVALID_ARGUMENT, "metadata_filter: key 'x'"))
    with pytest.raises(InvalidArgument, match="retriever tier refused"):
        await ask(tiers, answer_without_sources=True)


async def test_every_hop_gets_its_cap_but_never_more_than_the_request_has_left():
    tiers = ScriptedTiers()
    await ask(tiers, timeout=5.0, classify_timeout_s=0.25, search_timeout_s=30.0)
    timeouts = {rpc: timeout for rpc, _, timeout in tiers.calls}
    assert timeouts["ClassifyIntent"] == pytest.approx(0.25)
    assert 4.0 < timeouts["Search"] <= 5.0  # capped by the request's deadline, not its own 30 s
    assert 4.0 < timeouts["Generate"] <= 5.0


async def test_a_request_out_of_time_stops_before_calling_the_next_hop():
    tiers = ScriptedTiers()
    flow = advisor(tiers)
    question = resolve(flow.config, QUESTION)
    with pytest.raises(DeadlineExceeded, match=r"^embedder: the request's deadline passed"):
        await flow.advise(question, time.monotonic() - 1)
    assert "Generate" not in tiers.rpcs() and "Embed" not in tiers.rpcs()


async def test_streaming_yields_the_chunks_then_advice_with_the_same_text_as_unary():
    tiers = ScriptedTiers()
    flow = advisor(tiers)
    question = resolve(flow.config, QUESTION)
    items = [item async for item in flow.advise_stream(question, flow.deadline(None), response_id="resp_x")]
    chunks, final = items[:-1], items[-1]
    assert chunks == ["Keep the payment ", "under 10% of income [2]."]
    assert isinstance(final, g.Advice) and final.response_id == "resp_x"
    assert final.text == "".join(chunks) == (await flow.advise(question, flow.deadline(None))).text
    assert final.usage.prompt_tokens == 300


async def test_a_client_that_goes_away_mid_stream_stops_the_generation_stream():
    closed = asyncio.Event()

    class Endless(ScriptedTiers):
        async def stream(self, tier, rpc, request, *, timeout, user_id):
            try:
                while True:
                    yield Reply(llm_pb2.GenerateStreamResponse(delta="x"), g.ARM_CONTROL)
                    await asyncio.sleep(0)
            finally:
                closed.set()

    flow = advisor(Endless())
    stream = flow.advise_stream(resolve(flow.config, QUESTION), flow.deadline(None))
    assert await anext(stream) == "x"
    await stream.aclose()
    assert closed.is_set()


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"question": " "}, "question"),
        ({"question": "x" * 2001}, "question"),
        ({"top_k": 0}, "options.top_k"),
        ({"top_k": 11}, "options.top_k"),
        ({"max_tokens": 0}, "options.max_tokens"),
        ({"max_tokens": 1025}, "options.max_tokens"),
        ({"temperature": -0.1}, "options.temperature"),
        ({"temperature": float("nan")}, "options.temperature"),
        ({"user_id": "u" * 129}, "user_id"),
    ],
)
def test_bad_options_are_refused_naming_the_field(options, field):
    config = tier_config(GatewayConfig)
    question = options.pop("question", QUESTION)
    with pytest.raises(InvalidArgument) as raised:
        resolve(config, question, **options)
    assert raised.value.field == field


def test_the_caller_can_name_its_own_fields():
    config = tier_config(GatewayConfig)
    with pytest.raises(InvalidArgument) as raised:
        resolve(config, QUESTION, max_tokens=0, fields={"max_tokens": "max_completion_tokens"})
    assert raised.value.field == "max_completion_tokens"


def test_defaults_come_from_the_config():
    config = tier_config(GatewayConfig, default_top_k=3, default_max_tokens=50, default_temperature=0.5)
    question = resolve(config, QUESTION)
    assert (question.top_k, question.max_tokens, question.temperature, question.seed) == (3, 50, 0.5, None)


def test_an_unknown_prompt_version_is_refused_naming_the_file_and_the_known_versions():
    with pytest.raises(ValueError, match=r"advisor-9\.json: no such prompt version \(known: 1\)"):
        prompt.load("9")
