"""Fixtures shared by every test folder (tests/ and services/*/tests/)."""

from __future__ import annotations

import os

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
_SPANS = InMemorySpanExporter()
# Fixtures that start a process of their own: a test using one is an integration test.
PROCESS_FIXTURES = frozenset({"store_url", "llm_server", "mesh"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test is in exactly one lane, `unit` or `integration` (docs/testing.md)."""
    for item in items:
        if item.get_closest_marker("integration") is None and PROCESS_FIXTURES.intersection(
            getattr(item, "fixturenames", ())
        ):
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def spans() -> InMemorySpanExporter:
    """Spans finished in this process (the global tracer provider is set once per session)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_SPANS))
        trace.set_tracer_provider(provider)
    return _SPANS


@pytest.fixture(scope="session")
def embedding_model():
    """The published embedding model (exported once by set-up; exported here if missing)."""
    from services.embedder.export import prepare
    from tiermesh.kit.registry import Registry

    return prepare(Registry())


@pytest.fixture(scope="session")
def knowledge_index(embedding_model):
    """The shipped knowledge base's index, live in the registry (built by set-up; built here if missing)."""
    from services.retriever.manage import prepare
    from tiermesh.kit.registry import Registry

    return prepare(Registry())


@pytest.fixture(scope="session")
def language_model(embedding_model):
    """The converted default language model (converted by set-up; converted here if missing)."""
    from services.llm.convert import prepare
    from tiermesh.kit.registry import Registry

    return prepare(Registry())


@pytest.fixture(scope="session")
def classifier_models(embedding_model):
    """The four classifier models by kind, live in the registry (trained by set-up; here if missing)."""
    from services.classifiers import training
    from services.classifiers.config import MODELS
    from tiermesh.kit.registry import Registry

    return dict(zip(MODELS, training.prepare(Registry()), strict=True))


@pytest.fixture(scope="session")
def bias_text_model():
    """The published bias-text rules (built by set-up; built here if missing)."""
    from services.bias import text
    from tiermesh.kit.registry import Registry

    return text.prepare(Registry())


@pytest.fixture(scope="session")
def store_url():
    """A valkey-server of the session's own on a free port."""
    from tiermesh.control.testing import running_store

    with running_store() as url:
        yield url
