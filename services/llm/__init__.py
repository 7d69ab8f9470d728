"""The LLM tier: SmolLM2-135M-Instruct text generation over gRPC with vLLM's async engine."""
