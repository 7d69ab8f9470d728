import time
from pathlib import Path

import pytest

from tiermesh.control.envoy_config import render_envoy, write_checked
from tiermesh.kit.topology import (
    TierSpec,
    TopologyError,
    arms,
    cluster_name,
    read_settings,
    replica_name,
    replica_ports,
    treatment_overrides,
)


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
    with pytest.raises(TopologyError, match=r"\.env:2: expected KEY=VALUE"):
        read_settings({}, env_file)


TWO_TIERS = (
    TierSpec("embedder", "tiermesh.embedder.v1.EmbedderService"),
    TierSpec("llm", "tiermesh.llm.v1.LlmService"),
)
PORTS = {
    "ENVOY_GRPC_PORT": "1",
    "ENVOY_ADMIN_PORT": "2",
    "ENVOY_METRICS_PORT": "5",
    "EMBEDDER_GRPC_PORT": "3",
    "LLM_GRPC_PORT": "4",
}


def test_render_routes_each_tier_by_its_proto_package():
    config = render_envoy(PORTS, TWO_TIERS)
    assert 'prefix: "/tiermesh.embedder.v1."' in config and 'prefix: "/tiermesh.llm.v1."' in config
    assert "port_value: 3" in config and "port_value: 4" in config
    assert 'service_name: "tiermesh.llm.v1.LlmService"' in config
    assert "address: 127.0.0.1, port_value: 2" in config  # admin stays on loopback


def test_render_requires_every_tier_port():
    with pytest.raises(TopologyError, match="EMBEDDER_GRPC_PORT"):
        render_envoy({"ENVOY_GRPC_PORT": "1", "ENVOY_ADMIN_PORT": "2"})


def test_free_ports_are_distinct_and_outside_the_ephemeral_range():
    from tiermesh.kit.testing import _listen_range, free_port, free_ports

    picked = [free_port() for _ in range(200)] + [
        free_ports(4) + offset for _ in range(20) for offset in range(4)
    ]
    low, high = _listen_range()
    assert len(set(picked)) == len(picked)  # two tiers of one mesh never get the same port
    assert all(low <= port <= high for port in picked)


def _validate(config: str, tmp_path) -> None:
    write_checked(config, tmp_path / "envoy.yaml")  # raises with Envoy's words when rejected


def test_a_tier_without_treatment_routes_to_its_control_only(tmp_path):
    config = render_envoy(PORTS, TWO_TIERS)
    assert "llm_treatment" not in config and "runtime_key_prefix" not in config
    assert config.count("value: control") == 2  # every route reports its arm
    assert "envoy.tracers.opentelemetry" not in config  # no OTLP sink or endpoint: no tracing
    _validate(config, tmp_path)


def test_a_treatment_gets_its_own_cluster_and_a_sticky_weighted_split(tmp_path):
    settings = {**PORTS, "LLM_TREATMENT": "LLM_MODEL_VERSION=2", "LLM_TREATMENT_GRPC_PORT": "6"}
    config = render_envoy(settings, TWO_TIERS)
    assert "- name: llm_treatment" in config and "port_value: 6" in config
    assert "runtime_key_prefix: tiermesh.weights.llm" in config and "use_hash_policy: true" in config
    # the user's hash is salted with the tier, so each tier's split is independent
    assert "header_name: x-tiermesh-user" in config and 'substitution: "llm/"' in config
    assert "weight: 10000" in config and "weight: 0" in config  # a treatment starts with no users
    assert "exact: llm_treatment" in config  # its own health route
    assert "tiermesh.weights.embedder" not in config
    _validate(config, tmp_path)


def test_tracing_goes_to_the_sink_or_the_configured_otlp_endpoint(tmp_path):
    sink = render_envoy({**PORTS, "OTLP_SINK_PORT": "7"}, TWO_TIERS)
    assert "envoy.tracers.opentelemetry" in sink and "port_value: 7" in sink
    _validate(sink, tmp_path)
    collector = render_envoy(
        {**PORTS, "OTLP_SINK_PORT": "7", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, TWO_TIERS
    )
    assert "address: collector, port_value: 4317" in collector
    with pytest.raises(TopologyError, match="OTEL_EXPORTER_OTLP_ENDPOINT"):
        render_envoy({**PORTS, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://:4317"}, TWO_TIERS)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", None),
        ("same", {}),
        ("LLM_MODEL_VERSION=2", {"LLM_MODEL_VERSION": "2"}),
        (
            "LLM_MODEL_VERSION=2  TIERMESH_LOG_LEVEL='debug'",
            {"LLM_MODEL_VERSION": "2", "TIERMESH_LOG_LEVEL": "debug"},
        ),
    ],
)
def test_treatment_overrides_are_key_value_pairs_or_same(raw, expected):
    llm = TWO_TIERS[1]
    assert treatment_overrides({"LLM_TREATMENT": raw}, llm) == expected
    assert arms({"LLM_TREATMENT": raw}, llm) == (
        ("control",) if expected is None else ("control", "treatment")
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("LLM_MODEL_VERSION", "expected KEY=VALUE"),
        ("lower=1", "expected KEY=VALUE"),
        ("LLM_GRPC_PORT=1", "set by the runner"),
        ("TIERMESH_ARM=control", "set by the runner"),
    ],
)
def test_bad_treatment_settings_name_the_variable(raw, message):
    with pytest.raises(TopologyError, match=f"LLM_TREATMENT: .*{message}"):
        treatment_overrides({"LLM_TREATMENT": raw}, TWO_TIERS[1])


def test_treatment_ports_and_names_are_the_treatments_own():
    settings = {"LLM_GRPC_PORT": "100", "LLM_TREATMENT_GRPC_PORT": "200", "LLM_TREATMENT_REPLICAS": "2"}
    llm = TWO_TIERS[1]
    assert replica_ports(settings, llm) == [100]
    assert replica_ports(settings, llm, "GRPC", "treatment") == [200, 201]
    assert [replica_name(llm, i, "treatment") for i in range(2)] == ["llm-treatment", "llm-treatment-2"]
    assert cluster_name(llm, "treatment") == "llm_treatment" and cluster_name(llm) == "llm"
    with pytest.raises(TopologyError, match="LLM_TREATMENT_METRICS_PORT"):
        replica_ports(settings, llm, "METRICS", "treatment")


def test_quoted_values_in_the_env_file_are_read_as_compose_reads_them(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text('LLM_TREATMENT="LLM_MODEL_VERSION=2 LLM_THREADS=1"\nA=\'x\'\nB="\n')
    settings = read_settings({}, env_file)
    assert settings["LLM_TREATMENT"] == "LLM_MODEL_VERSION=2 LLM_THREADS=1"
    assert settings["A"] == "x" and settings["B"] == '"'
    assert treatment_overrides(settings, TWO_TIERS[1]) == {"LLM_MODEL_VERSION": "2", "LLM_THREADS": "1"}


def _sleeper():
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "tiermesh-test-marker"])


def test_a_recorded_process_is_alive_until_it_exits_and_a_reused_pid_is_not_it():
    from tiermesh.control.runner import _pid_alive, _process

    process = _sleeper()
    try:
        state, started = _process(process.pid)
        assert state in "RS"
        assert _pid_alive({"pid": process.pid, "started": started})
        # the same pid with another start time is another process (the pid was reused)
        assert not _pid_alive({"pid": process.pid, "started": started + 1})
        # records written before start times were kept fall back to the command-line marker. Its
        # flaw, and why start times replaced it: Popen returns (vfork) once the child's exec has
        # switched memory, before the kernel has set its arguments, so a read at once may find
        # /proc/<pid>/cmdline empty. Such records are old: read it once the exec has finished.
        cmdline = Path(f"/proc/{process.pid}/cmdline")
        deadline = time.monotonic() + 5
        while b"tiermesh-test-marker" not in cmdline.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _pid_alive({"pid": process.pid, "marker": "tiermesh-test-marker"})
        assert not _pid_alive({"pid": process.pid, "marker": "something-else"})
    finally:
        process.kill()
    process.wait()
    assert _process(process.pid) is None
    assert not _pid_alive({"pid": process.pid, "started": started})


def test_stop_process_stops_a_recorded_process_gracefully():
    from tiermesh.control.runner import _process, stop_process

    process = _sleeper()
    record = {"pid": process.pid, "started": _process(process.pid)[1]}
    assert stop_process(record, timeout=10)  # True: it went on SIGTERM, before any SIGKILL
    assert _process(process.pid) is None  # gone, and reaped (no zombie left)


def test_replicas_are_placed_on_the_named_hosts_in_turn():
    from tiermesh.kit.topology import placement, tier_named

    settings = {
        "MESH_HOSTS": "a=10.0.0.11, b=10.0.0.12",
        "MESH_ADDRESS": "10.0.0.1",
        "MESH_HOST_EXEC": "ip netns exec {name}",
        "RETRIEVER_PLACEMENT": "a,local,b",
    }
    retriever = tier_named("retriever")
    assert [placement(settings, retriever, i) for i in range(4)] == [
        ("a", "10.0.0.11"),
        None,
        ("b", "10.0.0.12"),
        ("a", "10.0.0.11"),
    ]
    assert placement(settings, tier_named("embedder"), 0) is None  # no placement: this host


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"MESH_HOSTS": "a", "MESH_ADDRESS": "x", "MESH_HOST_EXEC": "{name}"}, "expected NAME=ADDRESS"),
        ({"MESH_HOSTS": "a=1.2.3.4", "MESH_HOST_EXEC": "{name}"}, "set MESH_ADDRESS too"),
        ({"MESH_HOSTS": "a=1.2.3.4", "MESH_ADDRESS": "1.2.3.1"}, "set MESH_HOST_EXEC"),
        (
            {"MESH_HOSTS": "a=1.2.3.4", "MESH_ADDRESS": "1.2.3.1", "MESH_HOST_EXEC": "{name}",
             "RETRIEVER_PLACEMENT": "c"},
            "RETRIEVER_PLACEMENT: unknown host 'c'",
        ),
    ],
)  # fmt: skip
def test_a_bad_host_setting_is_named(settings, message):
    from tiermesh.kit.topology import placement, tier_named

    settings = {"RETRIEVER_PLACEMENT": "a", **settings}
    with pytest.raises(TopologyError, match=message):
        placement(settings, tier_named("retriever"), 0)
