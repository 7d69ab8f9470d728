"""The LLM tier's gRPC protocol: request validation, proto conversion and metrics around the engine.

A request whose client cancels or whose deadline passes is aborted in the engine (its slot and KV
cache are freed at once). When the engine fails, every call answers UNAVAILABLE and the tier
reports NOT_SERVING through `report_serving`, rather than letting calls hang.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import duration_pb2
from prometheus_client import Counter, Gauge, Histogram

from services.llm.config import LlmConfig
from services.llm.engine import Chunk, EngineDead, EngineRejected, LlmEngine, Message, Role, Sampling
from tiermesh.common.v1 import common_pb2
from tiermesh.kit import metrics
from tiermesh.kit.errors import InvalidArgument, Unavailable, check_count, check_text
from tiermesh.kit.registry import METADATA, ModelVersion, Registry, file_sha256, tree_digest
from tiermesh.llm.v1 import llm_pb2, llm_pb2_grpc

logger = logging.getLogger(__name__)

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TIME_TO_FIRST_TOKEN = Histogram(
    "tiermesh_llm_time_to_first_token_seconds",
    "From a request's arrival to its first generated token",
    ["model_version"],
    buckets=metrics.LATENCY_BUCKETS,
)
INTER_TOKEN = Histogram(
    "tiermesh_llm_inter_token_latency_seconds",
    "Time between successive generated tokens of a request",
    ["model_version"],
    buckets=metrics.LATENCY_BUCKETS,
)
GENERATED = Histogram(
    "tiermesh_llm_generated_tokens", "Tokens generated per request", ["model_version"], buckets=TOKEN_BUCKETS
)
PROMPT_TOKENS = Counter("tiermesh_llm_prompt_tokens", "Prompt tokens processed", ["model_version"])
COMPLETION_TOKENS = Counter("tiermesh_llm_completion_tokens", "Tokens generated", ["model_version"])
RUNNING = Gauge("tiermesh_llm_requests_running", "Requests the engine is generating for", ["model_version"])
WAITING = Gauge("tiermesh_llm_requests_waiting", "Requests queued in the engine", ["model_version"])

ROLES: dict[int, Role] = {
    llm_pb2.ROLE_SYSTEM: "system",
    llm_pb2.ROLE_USER: "user",
    llm_pb2.ROLE_ASSISTANT: "assistant",
}
FINISH: dict[str, int] = {"stop": llm_pb2.FINISH_REASON_STOP, "length": llm_pb2.FINISH_REASON_LENGTH}
Request = llm_pb2.GenerateRequest | llm_pb2.GenerateStreamRequest


def messages_from_proto(chat: llm_pb2.Chat, *, max_messages: int, max_chars: int) -> list[Message]:
    """Validated chat turns; InvalidArgument names the first bad field."""
    check_count(len(chat.messages), "chat.messages", low=1, high=max_messages)
    turns = []
    for index, message in enumerate(chat.messages):
        field = f"chat.messages[{index}]"
        if message.role not in ROLES:
            raise InvalidArgument(
                f"{field}.role", f"must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT, got {message.role}"
            )
        check_text(message.content, f"{field}.content", max_chars=max_chars)
        turns.append(Message(ROLES[message.role], message.content))
    return turns


def _positive_finite(value: float, field: str, rule: str, ok: bool) -> float:
    if not math.isfinite(value) or not ok:
        raise InvalidArgument(field, f"must be {rule}, got {value:g}")
    return value


def sampling_from_proto(params: llm_pb2.SamplingParams, config: LlmConfig) -> Sampling:
    """Validated decoding parameters; InvalidArgument names the first bad field and its limit."""
    wanted = min(config.default_max_tokens, config.max_tokens_cap)
    if params.HasField("max_tokens"):
        wanted = params.max_tokens
        if not 1 <= wanted <= config.max_tokens_cap:
            raise InvalidArgument(
                "sampling.max_tokens", f"must be between 1 and {config.max_tokens_cap}, got {wanted}"
            )
    temperature = top_p = repetition_penalty = None
    if params.HasField("temperature"):
        temperature = _positive_finite(
            params.temperature, "sampling.temperature", ">= 0", params.temperature >= 0
        )
    if params.HasField("top_p"):
        top_p = _positive_finite(params.top_p, "sampling.top_p", "in (0, 1]", 0 < params.top_p <= 1)
    if params.HasField("repetition_penalty"):
        value = params.repetition_penalty
        repetition_penalty = _positive_finite(value, "sampling.repetition_penalty", "> 0", value > 0)
    if params.HasField("top_k") and params.top_k < 1:
        raise InvalidArgument("sampling.top_k", f"must be >= 1, got {params.top_k}")
    check_count(len(params.stop), "sampling.stop", low=0, high=config.max_stop)
    for index, stop in enumerate(params.stop):
        if not stop:  # whitespace such as "\n" is a fine stop sequence
            raise InvalidArgument(f"sampling.stop[{index}]", "must not be empty")
        if len(stop) > config.max_stop_chars:
            raise InvalidArgument(
                f"sampling.stop[{index}]", f"is {len(stop)} characters; the limit is {config.max_stop_chars}"
            )
    return Sampling(
        max_tokens=wanted,
        temperature=temperature,
        top_p=top_p,
        top_k=params.top_k if params.HasField("top_k") else None,
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
        repetition_penalty=repetition_penalty,
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


class _Generation:
    """One request's tally: token counts and timings, recorded in metrics as it goes."""

    def __init__(self, version: str, prompt_tokens: int, arrived: float) -> None:
        self.version = version
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.arrived = arrived
        self.first_token_s = 0.0
        self._last = arrived

    def add(self, chunk: Chunk) -> None:
        if not chunk.tokens:
            return
        now = time.perf_counter()
        if not self.completion_tokens:
            self.first_token_s = now - self.arrived
            TIME_TO_FIRST_TOKEN.labels(self.version).observe(self.first_token_s)
        else:
            INTER_TOKEN.labels(self.version).observe((now - self._last) / chunk.tokens)
        self._last = now
        self.completion_tokens = chunk.completion_tokens

    def usage(self) -> llm_pb2.Usage:
        return llm_pb2.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)

    def close(self) -> None:
        PROMPT_TOKENS.labels(self.version).inc(self.prompt_tokens)
        COMPLETION_TOKENS.labels(self.version).inc(self.completion_tokens)
        GENERATED.labels(self.version).observe(self.completion_tokens)


class LlmTier(llm_pb2_grpc.LlmServiceServicer):
    """LlmService over a continuously batching engine."""

    name = "llm"
    service_names = (llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name,)

    def __init__(self, config: LlmConfig, *, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry or Registry()
        self.engine: LlmEngine | None = None
        self.model = common_pb2.ModelInfo()
        # Set by the owner of the health service: called with False when the engine fails.
        self.report_serving: Callable[[bool], Awaitable[None]] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._failed = False

    # -- lifecycle (tiermesh.kit.server.Tier) --------------------------------------------------------

    def register(self, server: grpc.aio.Server) -> None:
        llm_pb2_grpc.add_LlmServiceServicer_to_server(self, server)

    def _model_version(self) -> ModelVersion:
        if self.config.model_path is None:
            return self.registry.get(self.config.model, self.config.model_version)
        # A local folder is digested like a registry version, so the same files get the same digest.
        folder = self.config.model_path.resolve()
        files = {
            str(p.relative_to(folder)): file_sha256(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != METADATA
        }
        return ModelVersion(self.config.model, "local", folder, {"sha256": tree_digest(files)})

    async def start(self) -> None:
        from services.llm.vllm_engine import start_vllm_engine

        model = await asyncio.to_thread(self._model_version)
        engine = await start_vllm_engine(
            model,
            dtype=self.config.dtype,
            enforce_eager=self.config.enforce_eager,
            kv_cache_gib=self.config.kv_cache_gib,
            threads=self.config.threads,
            cpu_bind=self.config.cpu_bind,
            max_model_len=self.config.max_model_len,
            max_num_seqs=self.config.max_num_seqs,
        )
        try:
            await self._warm_up(engine)
        except BaseException:
            await engine.close()
            raise
        self.engine = engine
        self.model = common_pb2.ModelInfo(name=model.name, version=model.version, digest=model.digest)
        RUNNING.labels(model.version).set_function(lambda: engine.load().running)
        WAITING.labels(model.version).set_function(lambda: engine.load().waiting)
        self._watchdog = asyncio.create_task(self._watch(engine))

    async def _warm_up(self, engine: LlmEngine) -> None:
        """One short generation before SERVING: the first request pays for lazy set-up otherwise."""
        started = time.perf_counter()
        prompt = engine.encode_chat([Message("user", "Hello")])
        sampling = Sampling(max_tokens=self.config.warmup_tokens, temperature=0.0)
        produced = [chunk async for chunk in engine.generate(prompt, sampling, f"warmup-{uuid.uuid4().hex}")]
        logger.info("llm engine warmed up: %d tokens in %.2fs", len(produced), time.perf_counter() - started)

    async def _watch(self, engine: LlmEngine) -> None:
        """Notice an engine that died between requests, so health turns NOT_SERVING without traffic."""
        while engine.healthy():
            await asyncio.sleep(1.0)
        await self._engine_failed(EngineDead("the engine process stopped"))

    async def _engine_failed(self, error: BaseException) -> None:
        if self._failed:
            return
        self._failed = True
        logger.error("llm engine failed: %s; reporting NOT_SERVING", error)
        if self.report_serving is not None:
            await self.report_serving(False)

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.engine is not None:
            for gauge in (RUNNING, WAITING):
                gauge.remove(self.model.version)
            await self.engine.close()
            self.engine = None

    # -- RPCs ------------------------------------------------------------------------------------

    async def Generate(self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> Any:
        arrived = time.perf_counter()
        parts: list[str] = []
        last: tuple[Chunk, _Generation] | None = None
        async for last in self._generate(request, arrived):
            parts.append(last[0].text)
        if last is None or last[0].finish_reason is None:
            raise RuntimeError("the engine ended a generation without a finish reason")
        chunk, generation = last
        return llm_pb2.GenerateResponse(
            text="".join(parts),
            finish_reason=FINISH[chunk.finish_reason],
            usage=generation.usage(),
            time_to_first_token=_duration(generation.first_token_s),
            model=self.model,
        )

    async def GenerateStream(
        self, request: llm_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[llm_pb2.GenerateStreamResponse]:
        arrived = time.perf_counter()
        async for chunk, generation in self._generate(request, arrived):
            if chunk.finish_reason is not None:
                yield llm_pb2.GenerateStreamResponse(
                    delta=chunk.text,
                    finish_reason=FINISH[chunk.finish_reason],
                    usage=generation.usage(),
                    time_to_first_token=_duration(generation.first_token_s),
                    model=self.model,
                )
            elif chunk.text:  # tokens whose text is held back (a possible stop sequence) send nothing yet
                yield llm_pb2.GenerateStreamResponse(delta=chunk.text, model=self.model)

    # -- helpers ---------------------------------------------------------------------------------

    def _ready(self, wanted_version: str) -> LlmEngine:
        if self.engine is None:
            raise Unavailable("llm is still loading its model")
        if not self.engine.healthy():
            raise Unavailable("llm: the engine has failed; this tier is NOT_SERVING")
        if wanted_version and wanted_version != self.model.version:
            raise InvalidArgument(
                "model_version", f"this tier serves {self.model.version!r}, not {wanted_version!r}"
            )
        return self.engine

    async def _prompt(self, engine: LlmEngine, request: Request) -> list[int]:
        """Token ids of the request's input, checked against the context window."""
        config = self.config
        kind = request.WhichOneof("input")
        if kind == "chat":
            turns = messages_from_proto(
                request.chat, max_messages=config.max_messages, max_chars=config.max_input_chars
            )
            self._check_size(engine, "chat", sum(len(turn.content) for turn in turns))
            # Tokenizing is CPU work of up to ~100 ms: off the event loop, health checks keep answering.
            ids = await asyncio.to_thread(engine.encode_chat, turns)
            field, what = "chat", "tokens after the chat template"
        else:
            if kind is None:
                raise InvalidArgument("prompt", "must not be empty (send a prompt or chat messages)")
            check_text(request.prompt, "prompt", max_chars=config.max_input_chars)
            self._check_size(engine, "prompt", len(request.prompt))
            ids = await asyncio.to_thread(engine.encode_prompt, request.prompt)
            field, what = "prompt", "tokens"
        if len(ids) >= engine.context_length:
            raise InvalidArgument(
                field,
                f"is {len(ids)} {what}; the context window is {engine.context_length} tokens "
                "and must leave room for at least 1 generated token",
            )
        return ids

    def _check_size(self, engine: LlmEngine, field: str, chars: int) -> None:
        """Refuse input that cannot fit the context window before paying to tokenize it."""
        most = int(engine.context_length * self.config.max_chars_per_token)
        if chars > most:
            raise InvalidArgument(
                field,
                f"is {chars} characters; the context window of {engine.context_length} tokens holds "
                f"at most {most} (LLM_MAX_CHARS_PER_TOKEN={self.config.max_chars_per_token:g} per token)",
            )

    async def _generate(self, request: Request, arrived: float) -> AsyncIterator[tuple[Chunk, _Generation]]:
        engine = self._ready(request.model_version)
        sampling = sampling_from_proto(request.sampling, self.config)  # cheap checks before tokenizing
        prompt = await self._prompt(engine, request)
        # A generation that fills the context window ends with FINISH_REASON_LENGTH.
        room = engine.context_length - len(prompt)
        sampling = dataclasses.replace(sampling, max_tokens=min(sampling.max_tokens, room))
        generation = _Generation(self.model.version, len(prompt), arrived)
        request_id = uuid.uuid4().hex
        finished = False
        try:
            async for chunk in engine.generate(prompt, sampling, request_id):
                generation.add(chunk)
                finished = chunk.finish_reason is not None
                yield chunk, generation
        except EngineRejected as error:
            raise InvalidArgument("sampling", str(error)) from error
        except EngineDead as error:
            await self._engine_failed(error)
            raise Unavailable("llm: the engine has failed; this tier is NOT_SERVING") from error
        finally:
            if not finished:  # cancelled by the client, past its deadline, or failed
                await engine.abort(request_id)
            generation.close()
