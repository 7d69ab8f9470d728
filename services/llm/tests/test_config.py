"""Settings and model resolution: no engine needed."""

from __future__ import annotations

import pytest

from services.llm.config import MODEL_NAME, LlmConfig
from services.llm.servicer import LlmTier
from services.llm.tests.conftest import TINY_MODEL, tiny_config
from tiermesh.kit.config import ConfigError, load

PORTS = {"LLM_GRPC_PORT": "0", "LLM_METRICS_PORT": "0"}


def test_defaults_suit_a_small_cpu_host():
    config = load(LlmConfig, prefix="LLM_", environ=PORTS)
    assert (config.model, config.model_version, config.model_path) == (MODEL_NAME, "latest", None)
    assert (config.dtype, config.enforce_eager, config.kv_cache_gib, config.threads) == (
        "float32",
        True,
        2.0,
        2,
    )
    assert (config.default_max_tokens, config.max_stop) == (200, 8)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LLM_MAX_TOKENS_CAP", "0", "LLM_MAX_TOKENS_CAP: must be >= 1"),
        ("LLM_DTYPE", "int8", "LLM_DTYPE: expected one of float32, bfloat16, float16"),
        ("LLM_KV_CACHE_GIB", "lots", "LLM_KV_CACHE_GIB: expected a number"),
        ("LLM_ENFORCE_EAGER", "maybe", "LLM_ENFORCE_EAGER: expected a boolean"),
    ],
)
def test_a_bad_setting_names_the_variable(variable, value, message):
    with pytest.raises(ConfigError, match=message):
        load(LlmConfig, prefix="LLM_", environ={**PORTS, variable: value})


def test_the_registry_version_is_served_by_default(tiny_model, llm_registry):
    assert LlmTier(tiny_config(), registry=llm_registry)._model_version() == tiny_model


def test_a_local_folder_overrides_the_registry_and_is_digested_alike(tiny_model, llm_registry):
    model = LlmTier(tiny_config(model_path=tiny_model.path), registry=llm_registry)._model_version()
    assert (model.name, model.version, model.path) == (TINY_MODEL, "local", tiny_model.path)
    assert model.digest == tiny_model.digest
