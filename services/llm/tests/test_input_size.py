"""The servicer's input checks on a stand-in engine (no vLLM): input too long for the context window
is refused by its size before anything is tokenized, and tokenizing runs off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from services.llm.engine import Chunk, Load, Message, Sampling
from services.llm.servicer import LlmTier
from services.llm.tests.conftest import tiny_config
from tiermesh.kit.errors import InvalidArgument
from tiermesh.kit.registry import ModelVersion, Registry
from tiermesh.llm.v1 import llm_pb2

CONTEXT = 1_000


class StandIn:
    """An `LlmEngine` of one token per character that records what it tokenizes, and where."""

    def __init__(self) -> None:
        self.model = ModelVersion("stand-in", "1.0.0", Path("."), {})
        self.context_length = CONTEXT
        self.tokenized: list[int] = []  # characters per call
        self.on_event_loop: list[bool] = []

    def _tokenize(self, text: str) -> list[int]:
        self.tokenized.append(len(text))
        try:
            asyncio.get_running_loop()
            self.on_event_loop.append(True)
        except RuntimeError:  # no loop in this thread: a worker's
            self.on_event_loop.append(False)
        return [1] * len(text)

    def encode_prompt(self, prompt: str) -> list[int]:
        return self._tokenize(prompt)

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        return self._tokenize("".join(message.content for message in messages))

    async def generate(
        self, prompt_ids: Sequence[int], sampling: Sampling, request_id: str
    ) -> AsyncIterator[Chunk]:
        yield Chunk("ok", 1, 1, "stop")

    async def abort(self, request_id: str) -> None:
        pass

    def load(self) -> Load:
        return Load(running=0, waiting=0)

    def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        pass


def serving(tmp_path: Path, **settings: float) -> tuple[LlmTier, StandIn]:
    tier = LlmTier(tiny_config(**settings), registry=Registry(tmp_path / "models"))
    tier.engine = engine = StandIn()
    return tier, engine


def chat(*contents: str) -> llm_pb2.Chat:
    return llm_pb2.Chat(messages=[llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content=c) for c in contents])


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            llm_pb2.GenerateRequest(prompt="x" * 16_001),
            "prompt: is 16001 characters; the context window of 1000 tokens holds at most 16000 "
            "(LLM_MAX_CHARS_PER_TOKEN=16 per token)",
        ),
        (
            llm_pb2.GenerateRequest(chat=chat(*["y" * 4_001] * 4)),
            "chat: is 16004 characters; the context window of 1000 tokens holds at most 16000 "
            "(LLM_MAX_CHARS_PER_TOKEN=16 per token)",
        ),
    ],
)
async def test_input_longer_than_the_window_can_hold_is_refused_before_tokenizing(
    tmp_path, request_, message
):
    tier, engine = serving(tmp_path)
    with pytest.raises(InvalidArgument) as refused:
        await tier.Generate(request_, None)
    assert str(refused.value) == message
    assert engine.tokenized == []


async def test_the_characters_per_token_are_a_setting(tmp_path):
    tier, engine = serving(tmp_path, max_chars_per_token=2.0)
    with pytest.raises(InvalidArgument, match=r"^prompt: is 2001 characters; .* at most 2000 "):
        await tier.Generate(llm_pb2.GenerateRequest(prompt="z" * 2_001), None)
    assert engine.tokenized == []


async def test_input_that_may_fit_is_tokenized_off_the_event_loop(tmp_path):
    tier, engine = serving(tmp_path)
    answer = await tier.Generate(llm_pb2.GenerateRequest(prompt="a" * 999), None)
    assert answer.text == "ok" and answer.usage.prompt_tokens == 999
    await tier.Generate(llm_pb2.GenerateRequest(chat=chat("b" * 500, "c" * 499)), None)
    # within the size bound but over the window once tokenized: the token count decides
    with pytest.raises(InvalidArgument, match=r"^prompt: is 16000 tokens; the context window is 1000"):
        await tier.Generate(llm_pb2.GenerateRequest(prompt="d" * 16_000), None)
    assert engine.tokenized == [999, 999, 16_000]
    assert engine.on_event_loop == [False, False, False]
