import pytest

from tiermesh.testing import running_mesh


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, embedding_model, knowledge_index):
    """A real mesh (valkey-server, Envoy, the embedder, two retriever replicas) on free loopback ports."""
    with running_mesh(tmp_path_factory.mktemp("mesh")) as (running, status):
        yield running, status
