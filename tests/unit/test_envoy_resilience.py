"""Envoy's retry policies, circuit breakers and persisted runtime, as rendered for the tiers."""

import re

import pytest
import yaml

from tiermesh.control.envoy_config import render_envoy, write_checked
from tiermesh.control.runtime_layer import PersistedRuntime
from tiermesh.kit.topology import TopologyError, max_concurrency, only, read_settings, tier_named


def routes_of(config: str) -> list[dict]:
    listener = yaml.safe_load(config)["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return manager["route_config"]["virtual_hosts"][0]["routes"]


def cluster(config: str, name: str) -> dict:
    return next(c for c in yaml.safe_load(config)["static_resources"]["clusters"] if c["name"] == name)


def test_streams_and_writes_are_only_retried_when_they_never_reached_a_replica():
    routes = routes_of(render_envoy(read_settings({}), only("llm", "bias")))
    by_match = {r["match"].get("path") or r["match"].get("prefix") or "health": r for r in routes}
    for unretried in (
        "/tiermesh.llm.v1.LlmService/GenerateStream",
        "/tiermesh.bias.v1.BiasService/RecordDecisions",
    ):
        policy = by_match[unretried]["route"]["retry_policy"]
        assert set(policy["retry_on"].split(",")) == {
            "connect-failure",
            "refused-stream",
            "reset-before-request",
        }
    # the method routes come before their package's route, or they would never match
    order = [r["match"].get("path") or r["match"].get("prefix") for r in routes]
    assert order.index("/tiermesh.llm.v1.LlmService/Generate") < order.index("/tiermesh.llm.v1.")


def test_idempotent_calls_are_retried_on_another_replica():
    routes = routes_of(render_envoy(read_settings({}), only("retriever")))
    policy = next(r for r in routes if r["match"].get("prefix") == "/tiermesh.retriever.v1.")["route"][
        "retry_policy"
    ]
    assert {"reset", "unavailable", "connect-failure", "refused-stream"} <= set(policy["retry_on"].split(","))
    assert policy["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    assert policy["num_retries"] >= 1


def test_circuit_breakers_admit_every_replicas_capacity():
    settings = read_settings({"RETRIEVER_REPLICAS": "3", "RETRIEVER_MAX_CONCURRENT_RPCS": "50"})
    config = render_envoy(settings, only("retriever", "llm"))
    thresholds = cluster(config, "retriever")["circuit_breakers"]["thresholds"][0]
    assert thresholds["max_requests"] == thresholds["max_pending_requests"] == 150
    llm = cluster(config, "llm")["circuit_breakers"]["thresholds"][0]
    assert llm["max_requests"] == tier_named("llm").max_concurrency  # one replica, the tier's own figure


def test_health_checks_tolerate_one_slow_probe():
    config = render_envoy(read_settings({}), only("embedder"))
    assert cluster(config, "embedder")["health_checks"][0]["unhealthy_threshold"] == 2


def test_envoys_own_refusals_on_the_rest_api_are_json_errors_with_retry_after():
    listeners = yaml.safe_load(render_envoy(read_settings({}), only("gateway")))["static_resources"][
        "listeners"
    ]
    rest = next(listener for listener in listeners if listener["name"] == "rest_ingress")
    manager = rest["filter_chains"][0]["filters"][0]["typed_config"]
    mappers = {
        tuple(m["filter"]["response_flag_filter"]["flags"]): m
        for m in manager["local_reply_config"]["mappers"]
    }
    assert {
        flags: m["body_format_override"]["json_format"]["error"]["code"] for flags, m in mappers.items()
    } == {
        ("UO",): "overloaded",
        ("UH", "UF", "URX"): "upstream_unavailable",
    }
    for mapper in mappers.values():
        assert mapper["headers_to_add"][0]["header"] == {"key": "retry-after", "value": "1"}
        assert mapper["body_format_override"]["json_format"]["error"]["param"] is None


def test_a_treatment_may_have_its_own_capacity_and_a_bad_one_is_named():
    settings = read_settings({"LLM_TREATMENT": "LLM_MAX_CONCURRENT_RPCS=8"})
    assert max_concurrency(settings, tier_named("llm"), "treatment") == 8
    assert max_concurrency(settings, tier_named("llm"), "control") == tier_named("llm").max_concurrency
    with pytest.raises(TopologyError, match="EMBEDDER_MAX_CONCURRENT_RPCS: expected a positive integer"):
        max_concurrency({"EMBEDDER_MAX_CONCURRENT_RPCS": "lots"}, tier_named("embedder"))


def test_persisted_runtime_survives_in_files_and_swaps_atomically(tmp_path):
    runtime = PersistedRuntime(tmp_path / "runtime")
    runtime.ensure()
    assert runtime.read() == {}
    runtime.write({"tiermesh.weights.bias.bias": "7000", "tiermesh.weights.bias.bias_treatment": "3000"})
    runtime.write({"tiermesh.weights.llm.llm": "10000"})
    assert runtime.read() == {
        "tiermesh.weights.bias.bias": "7000",
        "tiermesh.weights.bias.bias_treatment": "3000",
        "tiermesh.weights.llm.llm": "10000",
    }
    current = tmp_path / "runtime" / "current"
    assert current.is_symlink() and re.fullmatch(r"v\d+", str(current.readlink()))
    assert (current / "keys" / "tiermesh" / "weights" / "bias" / "bias_treatment").read_text() == "3000"
    assert len(list((tmp_path / "runtime").glob("v*"))) <= 2  # old versions are cleaned up
    runtime.reset()
    assert runtime.read() == {}


def test_envoy_accepts_the_persisted_layer(tmp_path):
    runtime = PersistedRuntime(tmp_path / "runtime")
    runtime.ensure()
    config = render_envoy({**read_settings({}), "ENVOY_RUNTIME_DIR": str(runtime.root)}, only("embedder"))
    write_checked(config, tmp_path / "envoy.yaml")  # raises with Envoy's words if refused
    layers = yaml.safe_load(config)["layered_runtime"]["layers"]
    assert [layer["name"] for layer in layers] == ["static", "persisted", "admin"]


def test_only_a_disk_layer_of_envoys_bootstrap_is_written_to(tmp_path, monkeypatch):
    from tiermesh.control.traffic import EnvoyAdmin

    def dump(layers):
        return {"configs": [{"bootstrap": {"layered_runtime": {"layers": layers}}}]}

    admin = EnvoyAdmin("127.0.0.1:1")
    monkeypatch.setattr(
        admin, "config_dump", lambda: dump([{"name": "static", "static_layer": {}}, {"name": "admin"}])
    )
    assert admin.persisted_runtime() is None  # no disk layer: nothing is written anywhere
    admin = EnvoyAdmin("127.0.0.1:1")
    disk = {"name": "persisted", "disk_layer": {"symlink_root": str(tmp_path / "runtime" / "current")}}
    monkeypatch.setattr(admin, "config_dump", lambda: dump([{"name": "static", "static_layer": {}}, disk]))
    assert admin.persisted_runtime() is None  # its directory is not on this machine
    (tmp_path / "runtime").mkdir()
    admin = EnvoyAdmin("127.0.0.1:1")
    monkeypatch.setattr(admin, "config_dump", lambda: dump([{"name": "static", "static_layer": {}}, disk]))
    assert admin.persisted_runtime().root == tmp_path / "runtime"


def test_cleaning_old_versions_touches_only_the_layers_own_directories(tmp_path):
    (tmp_path / "var").mkdir()
    (tmp_path / "v1").mkdir()
    runtime = PersistedRuntime(tmp_path)
    for weight in range(4):
        runtime.write({"tiermesh.weights.llm.llm": str(weight)})
    assert (tmp_path / "var").is_dir() and (tmp_path / "v1").is_dir()
    assert len(runtime.versions()) == 2 and runtime.read() == {"tiermesh.weights.llm.llm": "3"}


def test_envoy_closes_idle_rest_connections_before_the_gateway_would():
    """The other way round, Envoy may send a request down a connection just as the gateway closes
    it for being idle: the call fails with "connection termination" and is not retried (a POST)."""
    from services.gateway.servicer import HTTP_KEEP_ALIVE_S

    rest = cluster(render_envoy(read_settings({}), only("gateway")), "gateway_rest")
    options = rest["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    idle = options["common_http_protocol_options"]["idle_timeout"]
    assert idle.endswith("s") and float(idle[:-1]) < HTTP_KEEP_ALIVE_S


def test_the_tiers_accept_envoys_keepalive_pings():
    """Envoy PINGs each replica to find silent hosts; a server that finds the PINGs too frequent
    answers GOAWAY "too_many_pings" and the calls on that connection fail."""
    from tiermesh.kit.server import server_options

    options = dict(server_options(1))
    keepalive = cluster(render_envoy(read_settings({}), only("llm")), "llm")[
        "typed_extension_protocol_options"
    ]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"][
        "http2_protocol_options"
    ]["connection_keepalive"]
    interval_ms = float(keepalive["interval"].removesuffix("s")) * 1000
    jitter = 0.15  # Envoy's default interval_jitter
    assert options["grpc.http2.min_ping_interval_without_data_ms"] < interval_ms * (1 - jitter)
    assert options["grpc.keepalive_permit_without_calls"] == 1  # idle connections are PINGed too
