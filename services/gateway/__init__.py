"""The gateway tier: the Advisor RAG flow over every tier and the REST API for external apps."""
