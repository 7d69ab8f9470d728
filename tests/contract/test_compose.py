"""docker-compose.yml describes the same mesh as the local runner (no Docker engine needed)."""

import importlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping

import pytest
import yaml

from tiermesh.control import treatment
from tiermesh.control.envoy_config import write_checked
from tiermesh.kit.contract import REPO_ROOT
from tiermesh.kit.topology import TIERS, read_settings

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
COMPOSE = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES = COMPOSE["services"]
TREATMENTS = {f"{tier.name}-treatment": tier for tier in TIERS}
# Third-party images that do not read the ports file.
OBSERVABILITY = {"prometheus", "grafana"}


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's substitution of ${NAME} and ${NAME:-default} (unset or empty: the default)."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: variables.get(m[1]) or (m[2] or ""), str(value))


def container_settings(service: str, shell: Mapping[str, str] | None = None) -> dict[str, str]:
    """What the runner's read_settings() sees inside a service's container: the ports file (the
    image has .env too, and env_file passes it) overridden by the service's `environment:`, whose
    ${...} compose fills from .env and the shell."""
    variables = {**read_settings({}), **(shell or {})}
    environment = {k: interpolate(v, variables) for k, v in SERVICES[service]["environment"].items()}
    return read_settings({**read_settings({}), **environment})


def test_every_runner_component_is_a_compose_service_reading_the_ports_file():
    tiers = {tier.name for tier in TIERS}
    assert set(SERVICES) == {"store", "xds", "envoy", "otlp-sink", *tiers, *TREATMENTS, *OBSERVABILITY}
    for name, service in SERVICES.items():
        if name not in OBSERVABILITY:
            assert service["env_file"] == ".env", name
    for tier in TIERS:
        service = SERVICES[tier.name]
        assert (REPO_ROOT / service["build"]["dockerfile"]).is_file()
        assert service["environment"][f"{tier.prefix}HOST"] == "0.0.0.0"
        # each replica registers itself with the control plane's store once SERVING
        assert service["environment"]["TIERMESH_REGISTRY_URL"] == "redis://store:${STORE_PORT}/0"
        assert "healthcheck" in service and "grpc_health" in " ".join(service["healthcheck"]["test"])
        # the mesh itself starts without a profile
        assert "profiles" not in service


def test_every_substituted_variable_is_defined_in_the_ports_file():
    text = COMPOSE_FILE.read_text()
    used = set(re.findall(r"\$\{(\w+)\}", text))
    settings = read_settings({})
    assert used and used <= set(settings), used - set(settings)
    # A default marks a setting the operator may leave unset: a treatment's, nothing else.
    optional = set(re.findall(r"\$\{(\w+):-", text))
    allowed = {f"{tier.prefix}TREATMENT" for tier in TIERS} | {"RETRIEVER_TREATMENT_REPLICAS"}
    assert optional and optional <= allowed, optional - allowed


@pytest.mark.parametrize("tier", TIERS, ids=lambda tier: tier.name)
def test_every_tier_has_a_treatment_service_on_its_own_ports(tier):
    control = SERVICES[tier.name]
    service = SERVICES[f"{tier.name}-treatment"]
    environment = service["environment"]
    # the same image and block, started only on request
    assert service["image"] == control["image"] and service["build"] == control["build"]
    assert service["healthcheck"] == control["healthcheck"]
    assert "treatment" in service["profiles"] and f"{tier.name}-treatment" in service["profiles"]
    assert environment["TIERMESH_ARM"] == "treatment"
    assert environment[f"{tier.prefix}TREATMENT"] == f"${{{tier.prefix}TREATMENT:-}}"
    assert set(control["environment"]) <= set(environment)
    kinds = ("GRPC", "METRICS", "HTTP") if tier.rest else ("GRPC", "METRICS")
    for kind in kinds:
        assert environment[f"{tier.prefix}{kind}_PORT"] == f"${{{tier.prefix}TREATMENT_{kind}_PORT}}"
    # what the tier reads in the container: the treatment's ports from .env
    settings = read_settings({})
    inside = container_settings(f"{tier.name}-treatment")
    for kind in kinds:
        assert inside[f"{tier.prefix}{kind}_PORT"] == settings[f"{tier.prefix}TREATMENT_{kind}_PORT"]
    # published like the control's metrics (the retriever's replicas publish none)
    published = {interpolate(p, settings) for p in service.get("ports", [])}
    if control.get("ports"):
        port = settings[f"{tier.prefix}TREATMENT_METRICS_PORT"]
        assert published == {f"127.0.0.1:{port}:{port}"}
    else:
        assert not published
    # the healthcheck asks the container's own port, not the control's
    assert f"{tier.prefix}GRPC_PORT']" in " ".join(control["healthcheck"]["test"])
    assert service["command"] == SERVICES["embedder-treatment"]["command"]


def test_envoy_boots_from_the_control_plane_which_serves_the_registered_replicas():
    xds, envoy = SERVICES["xds"], SERVICES["envoy"]
    environment = xds["environment"]
    for tier in TIERS:
        assert environment[f"{tier.prefix}TREATMENT"] == f"${{{tier.prefix}TREATMENT:-}}"
    assert environment["OTLP_SINK_HOST"] == "otlp-sink" and environment["ENVOY_LISTEN_HOST"] == "0.0.0.0"
    serve = " ".join(xds["command"])
    assert "--bootstrap /var/lib/tiermesh/xds/envoy.yaml --address xds" in serve
    assert "--source registry --store redis://store:${STORE_PORT}/0" in serve.replace("\n", " ")
    assert "xds-config:/var/lib/tiermesh/xds" in xds["volumes"]
    assert "envoy -c /var/lib/tiermesh/xds/envoy.yaml" in " ".join(envoy["command"])
    assert "xds-config:/var/lib/tiermesh/xds:ro" in envoy["volumes"]
    assert envoy["depends_on"]["xds"] == {"condition": "service_healthy"}
    assert "${ENVOY_METRICS_PORT}:${ENVOY_METRICS_PORT}" in " ".join(envoy["ports"])
    # a service may not depend on one whose profile is off
    assert not set(envoy["depends_on"]) & set(TREATMENTS)
    assert "${OTLP_SINK_PORT}" in SERVICES["otlp-sink"]["command"]


def _validate_envoy(config_text: str, tmp_path) -> None:
    write_checked(config_text, tmp_path / "envoy.yaml")  # raises with Envoy's words when rejected


def _bootstrap(tmp_path) -> dict:
    """The bootstrap the xds container writes (its command's first part, with its environment)."""
    settings = container_settings("xds")
    out = tmp_path / "bootstrap.yaml"
    store = f"redis://store:{settings['STORE_PORT']}/0"
    argv = [sys.executable, "-m", "tiermesh.control.xds", "--bootstrap", str(out), "--address", "xds",
            "--port", settings["XDS_PORT"], "--store", store]  # fmt: skip
    subprocess.run(argv, env={**os.environ, **settings}, check=True, timeout=60)
    return yaml.safe_load(out.read_text())


def test_envoy_accepts_the_bootstrap_written_for_containers(tmp_path):
    bootstrap = _bootstrap(tmp_path)
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    xds = clusters["tiermesh_xds"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert xds["endpoint"]["address"]["socket_address"]["address"] == "xds"
    assert "otlp-sink" in yaml.safe_dump(clusters["traces"])
    assert bootstrap["node"]["metadata"]["tiermesh_store"].startswith("redis://store:")
    listening = {
        listener["address"]["socket_address"]["address"]
        for listener in bootstrap["static_resources"]["listeners"]
    }
    assert "0.0.0.0" in listening
    _validate_envoy(yaml.safe_dump(bootstrap), tmp_path)


def test_the_control_plane_serves_a_treatment_cluster_exactly_when_its_variable_is_set():
    from tiermesh.control.xds.resources import mesh_config

    plain = mesh_config(container_settings("xds"), TIERS, ("xds", 18000))
    assert not [name for name in plain.clusters if "_treatment" in name]
    shell = {f"{tier.prefix}TREATMENT": "same" for tier in TIERS}
    every = mesh_config(container_settings("xds", shell), TIERS, ("xds", 18000))
    for tier in TIERS:
        assert every.clusters[f"{tier.name}_treatment"]["type"] == "EDS"


def _run_treatment_command(monkeypatch, tier: str, value: str | None) -> tuple[int | None, dict]:
    """Run the treatment services' command here, with exec replaced: (exit status, exec'd env)."""
    for name in [k for k in os.environ if k.endswith("_TREATMENT")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TIERMESH_TIER", tier)
    monkeypatch.setenv(f"{tier.upper()}_MODEL_VERSION", "1")
    if value is not None:
        monkeypatch.setenv(f"{tier.upper()}_TREATMENT", value)
    executed: dict = {}

    class Executed(Exception):
        pass

    def execvpe(file, args, env):
        executed.update(args=args, env=env)
        raise Executed

    monkeypatch.setattr(os, "execvpe", execvpe)
    assert SERVICES[f"{tier}-treatment"]["command"] == ["python", "-m", "tiermesh.control.treatment"]
    try:
        sys.exit(treatment.main())
    except Executed:
        return None, executed
    except SystemExit as exit_:
        return exit_.code, executed
    raise AssertionError("the treatment command neither exec'd the tier nor exited")


def test_the_treatment_command_applies_the_runners_treatment_variable(monkeypatch, capsys):
    status, executed = _run_treatment_command(monkeypatch, "llm", "LLM_MODEL_VERSION=2 LLM_WARMUP_TOKENS=8")
    assert status is None
    assert executed["args"][1:] == ["-m", "services.llm"]
    assert executed["env"]["LLM_MODEL_VERSION"] == "2" and executed["env"]["LLM_WARMUP_TOKENS"] == "8"
    assert "llm treatment: LLM_MODEL_VERSION=2 LLM_WARMUP_TOKENS=8" in capsys.readouterr().out

    status, executed = _run_treatment_command(monkeypatch, "embedder", "same")
    assert status is None and executed["env"]["EMBEDDER_MODEL_VERSION"] == "1"
    assert "an A/A test" in capsys.readouterr().out


def test_the_treatment_command_exits_cleanly_when_no_treatment_is_set(monkeypatch, capsys):
    status, executed = _run_treatment_command(monkeypatch, "bias", None)
    assert status == 0 and not executed
    assert "BIAS_TREATMENT is not set" in capsys.readouterr().out
    # restarted only when it fails, so an unset treatment stays stopped
    assert all(SERVICES[name]["restart"] == "on-failure" for name in TREATMENTS)


def test_the_treatment_command_refuses_settings_the_deployment_owns(monkeypatch, capsys):
    status, executed = _run_treatment_command(monkeypatch, "llm", "LLM_GRPC_PORT=1")
    assert status == 2 and "LLM_GRPC_PORT is set by the runner" in capsys.readouterr().err and not executed


def _compose(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose validates the file: scripts/test.sh installs it"
    # only what compose needs: no operator variable of this shell leaks into the check
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL")}
    return subprocess.run(
        [binary, "--project-directory", str(REPO_ROOT), "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        check=False,
        env={**clean, **(env or {})},
        timeout=120,
    )


@pytest.mark.parametrize(
    "profiles", [(), ("treatment", "observability"), ("llm-treatment",)], ids=lambda p: "+".join(p) or "mesh"
)
def test_docker_compose_accepts_the_file(profiles):
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    result = _compose(*flags, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_docker_compose_resolves_the_treatment_blocks():
    result = _compose("--profile", "treatment", "config", env={"LLM_TREATMENT": "LLM_MODEL_VERSION=2"})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    settings = read_settings({})
    llm = services["llm-treatment"]
    assert llm["environment"]["LLM_GRPC_PORT"] == settings["LLM_TREATMENT_GRPC_PORT"]
    assert llm["environment"]["LLM_TREATMENT"] == "LLM_MODEL_VERSION=2"
    assert llm["environment"]["LLM_HOST"] == "0.0.0.0"  # merged from the control's block
    assert llm["shm_size"] == services["llm"]["shm_size"]
    assert services["xds"]["environment"]["LLM_TREATMENT"] == "LLM_MODEL_VERSION=2"
    assert services["xds"]["environment"]["BIAS_TREATMENT"] == ""


def test_every_python_healthcheck_imports_what_exists():
    """A probe that imports a moved or renamed function would mark a healthy container unhealthy."""
    checked = 0
    for name, service in SERVICES.items():
        command = " ".join(map(str, service.get("healthcheck", {}).get("test", [])))
        for module, names in re.findall(r"from (tiermesh[\w.]*) import ([\w, ]+)", command):
            imported = importlib.import_module(module)
            for attribute in names.split(","):
                assert hasattr(imported, attribute.strip()), f"{name}: {module}.{attribute.strip()}"
                checked += 1
    assert checked >= len(TIERS) + 2  # every tier, Envoy and the trace sink
