"""The LLM engine on vLLM's `AsyncLLM`: the only module of the tier that imports vLLM.

The engine core runs in its own (spawned) process and batches all running requests continuously;
this process keeps the tokenizer and the per-request output streams. In-process `AsyncLLM` was
measured at 0.7 tok/s against ~16 multiprocess, so the default multiprocess engine is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from services.llm.engine import Chunk, EngineDead, EngineRejected, Load, Message, Sampling
from tiermesh.kit.registry import ModelVersion

logger = logging.getLogger(__name__)

GIB = 1 << 30


class _SchedulerWatch:
    """Keeps the scheduler's latest request counts; vLLM calls `record` after every engine step."""

    def __init__(self) -> None:
        self.load = Load(running=0, waiting=0)

    def factory(self, vllm_config: Any, engine_index: int = 0) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        watch = self

        class Recorder(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *_: Any, **__: Any) -> None:
                if scheduler_stats is not None:
                    watch.load = Load(scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs)

            def log_engine_initialized(self) -> None:
                pass

        return Recorder(vllm_config, engine_index)


class VllmEngine:
    """`LlmEngine` over a started `AsyncLLM`; build it with `start_vllm_engine`."""

    def __init__(self, model: ModelVersion, llm: Any, watch: _SchedulerWatch) -> None:
        self.model = model
        self.llm = llm
        self.watch = watch
        self.closed = False
        self.context_length = int(llm.model_config.max_model_len)
        self.tokenizer = llm.get_tokenizer()
        # The model's generation_config.json may set a default temperature; the contract's
        # defaults (top-p 1, no top-k, no repetition penalty) apply to the rest.
        self.default_temperature = float(llm.model_config.get_diff_sampling_param().get("temperature", 1.0))

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt))

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            tokenize=False,
        )
        # The template already holds the special tokens it wants.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _params(self, sampling: Sampling) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=self.default_temperature if sampling.temperature is None else sampling.temperature,
            top_p=1.0 if sampling.top_p is None else sampling.top_p,
            top_k=0 if sampling.top_k is None else sampling.top_k,  # 0: no cut
            seed=sampling.seed,
            stop=list(sampling.stop),
            repetition_penalty=1.0 if sampling.repetition_penalty is None else sampling.repetition_penalty,
            output_kind=RequestOutputKind.DELTA,  # each output carries only what is new
        )

    async def generate(
        self, prompt_ids: Sequence[int], sampling: Sampling, request_id: str
    ) -> AsyncIterator[Chunk]:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        try:
            params = self._params(sampling)
            # Already tokenized and length-checked by the servicer: the renderer only wraps the ids.
            (prompt,) = self.llm.renderer.render_cmpl([TokensPrompt(prompt_token_ids=list(prompt_ids))])
        except (VLLMClientError, ValueError) as error:
            raise EngineRejected(str(error)) from error
        stream = self.llm.generate(prompt, params, request_id)
        finished = False
        produced = 0
        try:
            async for output in stream:
                completion = output.outputs[0]
                produced += len(completion.token_ids)
                reason = completion.finish_reason
                if reason not in (None, "stop", "length"):
                    raise RuntimeError(f"vLLM ended request {request_id} with {reason!r}")
                finished = reason is not None
                yield Chunk(completion.text, len(completion.token_ids), produced, reason)
        except (VLLMClientError, ValueError) as error:
            raise EngineRejected(str(error)) from error
        except (EngineDeadError, EngineGenerateError) as error:
            if not self.healthy():
                raise EngineDead(str(error)) from error
            raise
        finally:
            await stream.aclose()  # vLLM aborts an unfinished request when its stream closes
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        if self.healthy():
            await self.llm.abort(request_id)

    def load(self) -> Load:
        return self.watch.load

    def healthy(self) -> bool:
        return not self.closed and not self.llm.errored

    async def close(self) -> None:
        self.llm.shutdown()
        # AsyncLLM shuts down again when collected; at interpreter exit that fails noisily.
        self.closed = True
        del self.llm


async def start_vllm_engine(
    model: ModelVersion,
    *,
    path: Path | None = None,
    dtype: str = "float32",
    enforce_eager: bool = True,
    kv_cache_gib: float = 2.0,
    threads: int = 2,
    cpu_bind: str = "auto",
    max_model_len: int = 0,
    max_num_seqs: int = 32,
) -> VllmEngine:
    """Start the engine core process on `path` (default: the registry version's folder)."""
    # Read by the spawned engine processes; vLLM fell back to one thread without it.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
    watch = _SchedulerWatch()

    def build() -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        folder = str(path or model.path)
        arguments = AsyncEngineArgs(
            model=folder,
            tokenizer=folder,
            served_model_name=[model.name],
            dtype=dtype,
            enforce_eager=enforce_eager,
            kv_cache_memory_bytes=int(kv_cache_gib * GIB),
            max_model_len=max_model_len or None,
            max_num_seqs=max_num_seqs,
            disable_log_stats=True,  # vLLM's own loggers off; the watch below still gets the stats
        )
        return AsyncLLM.from_engine_args(arguments, stat_loggers=[watch.factory])

    # Starting blocks for tens of seconds; off the event loop, health checks keep answering.
    # vLLM then starts its output tasks lazily, on the first request (the warm-up). The engine
    # comes back in a list, not as the thread's result: the executor would keep that alive.
    built: list[Any] = []
    await asyncio.to_thread(lambda: built.append(build()))
    llm = built.pop()
    try:
        return VllmEngine(model, llm, watch)
    except BaseException:
        with contextlib.suppress(Exception):
            llm.shutdown()
        raise
