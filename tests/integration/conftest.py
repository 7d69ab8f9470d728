import pytest

from tiermesh.control.testing import running_mesh


@pytest.fixture(scope="session")
def mesh(
    tmp_path_factory, embedding_model, knowledge_index, language_model, classifier_models, bias_text_model
):
    """A real mesh (valkey-server, Envoy, the embedder, two retriever replicas, the llm, the
    classifiers, bias, the gateway, an A/A treatment of bias and of the gateway, the OTLP sink) on
    free loopback ports, shared by the modules that only call it (starting vLLM takes ~40 s)."""
    treatments = {"BIAS_TREATMENT": "same", "GATEWAY_TREATMENT": "same"}
    with running_mesh(tmp_path_factory.mktemp("mesh"), **treatments) as (running, status):
        yield running, status
