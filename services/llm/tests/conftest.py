"""Fixtures for the LLM tier's tests: a tiny random-weight Llama with SmolLM2's tokenizer and chat
template, published in a registry of the session's own, and one tier serving it for the session
(starting vLLM's engine processes costs ~30 s, so every test shares it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from services.llm.config import LlmConfig
from tiermesh.kit.registry import ModelVersion, Registry
from tiermesh.kit.testing import tier_config

TINY_MODEL = "tiny-llama"
CONTEXT = 2048


def make_tiny_llama(folder: Path) -> None:
    """A 2-layer Llama with random weights: fast to load, deterministic, and real to vLLM.

    Head size 32 (hidden 64, 2 heads): vLLM's CPU attention refuses sizes such as 16.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from services.llm.convert import source_gguf

    gguf = source_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="session")
def llm_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return Registry(tmp_path_factory.mktemp("llm") / "models")


@pytest.fixture(scope="session")
def tiny_model(llm_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> ModelVersion:
    staging = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(staging)
    return llm_registry.publish(
        TINY_MODEL,
        staging,
        origin={"package": "tests", "conversion": "random weights"},
        parameters={"context_length": CONTEXT, "layers": 2, "hidden_size": 64},
    )


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model: ModelVersion) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model.path)


def tiny_config(**values: Any) -> LlmConfig:
    """Small limits, so that tests can reach them; a small KV cache, so that start-up is quick."""
    settings = {
        "model": TINY_MODEL,
        "kv_cache_gib": 0.0625,
        "max_num_seqs": 8,
        "max_tokens_cap": 1500,
        "default_max_tokens": 16,
        "max_stop": 2,
        "max_messages": 4,
        "max_input_chars": 20_000,
        **values,
    }
    return tier_config(LlmConfig, **settings)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def llm_server(tiny_model: ModelVersion, llm_registry: Registry, spans: Any) -> Any:
    from services.llm.servicer import LlmTier
    from tiermesh.kit.testing import serving_in_process

    config = tiny_config()
    async with serving_in_process(LlmTier(config, registry=llm_registry), config) as server:
        yield server
