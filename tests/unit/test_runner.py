import pytest

from tiermesh.runner import RunnerError, TierSpec, read_settings, render_envoy


def test_env_file_values_are_overridden_by_the_environment(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("# ports\nENVOY_GRPC_PORT=8080\n\nSTORE_PORT = 6380\n")
    settings = read_settings({"ENVOY_GRPC_PORT": "9999", "EMBEDDER_GRPC_PORT": "5"}, env_file)
    assert settings["ENVOY_GRPC_PORT"] == "9999"
    assert settings["STORE_PORT"] == "6380"
    assert settings["EMBEDDER_GRPC_PORT"] == "5"


def test_malformed_env_file_line_is_reported_with_its_number(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("A=1\nnot a setting\n")
    with pytest.raises(RunnerError, match=r"\.env:2: expected KEY=VALUE"):
        read_settings({}, env_file)


def test_render_routes_each_tier_by_its_proto_package():
    tiers = (
        TierSpec("embedder", "tiermesh.embedder.v1.EmbedderService"),
        TierSpec("llm", "tiermesh.llm.v1.LlmService"),
    )
    settings = {
        "ENVOY_GRPC_PORT": "1",
        "ENVOY_ADMIN_PORT": "2",
        "EMBEDDER_GRPC_PORT": "3",
        "LLM_GRPC_PORT": "4",
    }
    config = render_envoy(settings, tiers)
    assert 'prefix: "/tiermesh.embedder.v1."' in config and 'prefix: "/tiermesh.llm.v1."' in config
    assert "port_value: 3" in config and "port_value: 4" in config
    assert 'service_name: "tiermesh.llm.v1.LlmService"' in config
    assert "address: 127.0.0.1, port_value: 2" in config  # admin stays on loopback


def test_render_requires_every_tier_port():
    with pytest.raises(RunnerError, match="EMBEDDER_GRPC_PORT"):
        render_envoy({"ENVOY_GRPC_PORT": "1", "ENVOY_ADMIN_PORT": "2"})


def test_free_ports_are_distinct_and_outside_the_ephemeral_range():
    from tiermesh.testing import _listen_range, free_port, free_ports

    picked = [free_port() for _ in range(200)] + [
        free_ports(4) + offset for _ in range(20) for offset in range(4)
    ]
    low, high = _listen_range()
    assert len(set(picked)) == len(picked)  # two tiers of one mesh never get the same port
    assert all(low <= port <= high for port in picked)
