"""The seam between the LLM servicer and a generation engine: plain data in and out, no gRPC and
no vLLM. `vllm_engine.py` implements it; the servicer depends only on this module."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Literal, Protocol

from tiermesh.kit.registry import ModelVersion

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length"]


class EngineDead(Exception):
    """The engine stopped working (its process died or it raised); no request can succeed."""


class EngineRejected(Exception):
    """The engine refused one request as invalid; the message says why."""


@dataclasses.dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: Role
    content: str


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Decoding parameters after validation. None means the model's own default."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float | None = None


@dataclasses.dataclass(frozen=True)
class Chunk:
    """What one engine step added to a generation."""

    text: str  # new text since the previous chunk (held back while it may start a stop sequence)
    tokens: int  # new tokens since the previous chunk
    completion_tokens: int  # tokens generated so far
    finish_reason: FinishReason | None  # set on the last chunk only


@dataclasses.dataclass(frozen=True)
class Load:
    """Requests the engine's scheduler holds, as of its latest report."""

    running: int
    waiting: int


class LlmEngine(Protocol):
    """A loaded model that generates for many concurrent requests."""

    model: ModelVersion
    context_length: int  # prompt plus generated tokens must fit in it

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a raw prompt, as the model will see it."""
        ...

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template, ready for the reply."""
        ...

    def generate(
        self, prompt_ids: Sequence[int], sampling: Sampling, request_id: str
    ) -> AsyncIterator[Chunk]:
        """Generate for one request; closing the iterator early aborts the request in the engine.

        Raises EngineRejected for a request the engine refuses, EngineDead when the engine failed.
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its slot and KV cache; unknown or finished ids are ignored."""
        ...

    def load(self) -> Load:
        """Requests running and waiting in the engine."""
        ...

    def healthy(self) -> bool:
        """False once the engine has failed for good."""
        ...

    async def close(self) -> None:
        """Stop the engine and its processes."""
        ...
