"""`python -m services.llm`: serve the LLM tier (configured by LLM_* variables)."""

from services.llm.config import LlmConfig
from services.llm.servicer import LlmTier
from tiermesh.kit.server import run

# The guard matters: vLLM starts its engine core in a spawned process, which imports this module.
if __name__ == "__main__":
    run("llm", LlmConfig, LlmTier)
