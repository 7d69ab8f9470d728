"""The embedder tier: all-MiniLM-L6-v2 sentence embeddings over gRPC."""
