"""`python -m services.embedder`: serve the embedder tier (configured by EMBEDDER_* variables)."""

from services.embedder.config import EmbedderConfig
from services.embedder.servicer import EmbedderTier
from tiermesh.kit.server import run

if __name__ == "__main__":
    run("embedder", EmbedderConfig, EmbedderTier)
