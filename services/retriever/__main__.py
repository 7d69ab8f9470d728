"""`python -m services.retriever`: serve the retriever tier (configured by RETRIEVER_* variables)."""

from services.retriever.config import RetrieverConfig
from services.retriever.servicer import RetrieverTier
from tiermesh.kit.server import run

if __name__ == "__main__":
    run("retriever", RetrieverConfig, RetrieverTier)
