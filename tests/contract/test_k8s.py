"""deploy/k8s/ runs the mesh of .env and tiermesh/kit/topology.py on Kubernetes (no cluster needed).

Every overlay is rendered with `kubectl kustomize` and each object is validated offline against
the Kubernetes API's schemas (kubernetes-validate, strict: an unknown field is an error) for the
oldest Kubernetes the manifests claim (1.27: gRPC probes) and the newest the validator knows. The
rendered objects are then checked against the mesh's own definitions: every tier with its ports
from .env, its health service, the variables it reads (parsed by the tier's own config class) and
the same environment as docker-compose.yml; Envoy with the control plane's bootstrap (which Envoy
validates), RBAC limited to EndpointSlices, the store with compose's flags, probes, grace periods,
disruption budgets, autoscalers on metrics the tiers export, GPUs only where the GPU overlay puts
them, the restricted Pod Security Standard, and the network policies evaluated connection by
connection. What only a cluster shows (scheduling, probes answering, policies enforced) is not
tested here (docs/kubernetes.md).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from tests.contract.test_compose import SERVICES as COMPOSE
from tests.contract.test_compose import interpolate
from tiermesh.control.docs import tier_config
from tiermesh.control.envoy_config import render_envoy, write_checked
from tiermesh.control.kubernetes import endpoints_from_slices, labels
from tiermesh.kit.config import describe, load
from tiermesh.kit.contract import REPO_ROOT
from tiermesh.kit.telemetry import TelemetryConfig
from tiermesh.kit.topology import (
    TIERS,
    TierSpec,
    arm_prefix,
    cluster_name,
    read_settings,
    treatment_overrides,
)

K8S = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
# gRPC probes are GA from 1.27; the newest schemas kubernetes-validate ships.
VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
SETTINGS = read_settings({})
ENVOY_TARGET = f"envoy:{SETTINGS['ENVOY_GRPC_PORT']}"
STORE_URL = f"redis://store:{SETTINGS['STORE_PORT']}/0"
XDS_PORT = 18000
# Variables a tier container may set besides its own settings: what the image and runner use.
RUNNER_VARIABLES = {"TIERMESH_HOME", "HF_HUB_OFFLINE", "REDIS_URL"}
KUBECTL = shutil.which("kubectl")


@functools.cache
def _rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [KUBECTL or "kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, f"kubectl kustomize deploy/k8s/overlays/{overlay}:\n{result.stderr}"
    return tuple(yaml.safe_load_all(result.stdout))


def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    """The overlay's objects, as `kubectl kustomize` renders them."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: it renders the kustomize overlays (it bundles kustomize)")
    return _rendered(overlay)


def kind(overlay: str, kind_name: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in rendered(overlay) if o["kind"] == kind_name}


def containers(workload: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in workload["spec"]["template"]["spec"]["containers"]}


def env(container: Mapping[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def ports(container: Mapping[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def tier_workloads(overlay: str) -> Iterator[tuple[TierSpec, str, dict[str, Any]]]:
    """(tier, arm, Deployment) of every tier deployment of the overlay."""
    for deployment in kind(overlay, "Deployment").values():
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        if "tiermesh.dev/tier" in pod_labels:
            tier = next(t for t in TIERS if t.name == pod_labels["tiermesh.dev/tier"])
            yield tier, pod_labels["tiermesh.dev/arm"], deployment


def deployment_ports(tier: TierSpec, arm: str) -> dict[str, int]:
    """The ports .env gives a tier's arm: grpc, metrics (and http for a REST tier)."""
    prefix = arm_prefix(tier, arm)
    return {port.lower(): int(SETTINGS[f"{prefix}{port}_PORT"]) for port in tier.port_kinds()}


def test_the_overlays_are_there():
    assert {"cpu", "gpu"} <= set(OVERLAYS)
    # the treatment example too, so the treatment component is rendered and checked
    assert "cpu-llm-treatment" in OVERLAYS


# -- rendering and the API's schemas -----------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_passes_the_kubernetes_schemas_strictly(overlay, version):
    objects = rendered(overlay)
    assert len(objects) > 20
    errors = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{name}: {'.'.join(map(str, error.path))}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{name}: no schema (only built-in kinds are used, so every object is checked)")
    assert errors == []


def test_the_schema_check_catches_a_bad_object():
    deployment = dict(kind("cpu", "Deployment")["llm"])
    kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    spec = deployment["spec"]["template"]["spec"]
    typo = {**spec, "containers": [{**spec["containers"][0], "readinesProbe": {}}]}
    wrong_type = {**spec, "terminationGracePeriodSeconds": "100s"}
    for broken_spec in (typo, wrong_type):
        broken = {**deployment, "spec": {**deployment["spec"], "template": {"spec": broken_spec}}}
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lives_in_one_namespace(overlay):
    [namespace] = kind(overlay, "Namespace")
    for obj in rendered(overlay):
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, obj["metadata"]["name"]
    namespace_labels = kind(overlay, "Namespace")[namespace]["metadata"]["labels"]
    assert namespace_labels["pod-security.kubernetes.io/enforce"] == "restricted"


# -- the tiers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_tier_runs_with_its_service_labels_and_ports(overlay):
    deployments = kind(overlay, "Deployment")
    services = kind(overlay, "Service")
    for tier in TIERS:
        deployment, service = deployments[tier.name], services[tier.name]
        want = labels(tier, "control")
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert (
            deployment["metadata"]["labels"] == want
            and pod_labels == want
            and service["metadata"]["labels"] == want
        )
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items() and service["spec"]["selector"] == selector
        # headless: only Envoy balances, over the Service's EndpointSlices
        assert service["spec"]["clusterIP"] == "None"
        expected = deployment_ports(tier, "control")
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == expected, tier.name
        assert all(p["targetPort"] == p["name"] for p in service["spec"]["ports"])
        [container] = containers(deployment).values()
        assert container["name"] == tier.name and ports(container) == expected
        # the image's own command: python -m services.<tier>
        assert "command" not in container and "args" not in container


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_tier_reads_its_ports_and_settings_from_the_manifest(overlay):
    for tier, arm, deployment in tier_workloads(overlay):
        [container] = containers(deployment).values()
        variables = env(container)
        config_class = tier_config(tier)
        own = {name for name, _, _ in describe(config_class, prefix=tier.prefix)}
        arm_settings = {name for name, _, _ in describe(TelemetryConfig, prefix="TIERMESH_")}
        known = own | arm_settings | RUNNER_VARIABLES | {f"{tier.prefix}TREATMENT"}
        assert set(variables) <= known, (
            f"{tier.name}: variables the tier does not read: {set(variables) - known}"
        )
        # what the tier starts with: its own config class parses every value
        config = load(config_class, prefix=tier.prefix, environ=variables)
        expected = deployment_ports(tier, arm)
        assert (config.grpc_port, config.metrics_port) == (expected["grpc"], expected["metrics"])
        assert ports(container) == expected
        if tier.rest:
            assert config.http_port == expected["http"]
        assert config.host == "0.0.0.0"
        assert variables["TIERMESH_ARM"] == arm


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tiers_call_tiers_through_envoy_and_use_the_store(overlay):
    envoy = containers(kind(overlay, "Deployment")["envoy"])["envoy"]
    envoy_service = kind(overlay, "Service")["envoy"]
    assert {p["name"]: p["port"] for p in envoy_service["spec"]["ports"]}["grpc"] == ports(envoy)["grpc"]
    assert f"{envoy_service['metadata']['name']}:{ports(envoy)['grpc']}" == ENVOY_TARGET
    for tier, _, deployment in tier_workloads(overlay):
        [container] = containers(deployment).values()
        variables = env(container)
        for name, _, _ in describe(tier_config(tier), prefix=tier.prefix):
            if name.endswith("_TARGET"):
                assert variables.get(name) == ENVOY_TARGET, name
            if name.endswith(("_STORE_URL", "_CACHE_URL")):
                assert variables.get(name) == STORE_URL, name
        assert variables.get("REDIS_URL", STORE_URL) == STORE_URL


def test_the_tiers_environment_is_composes():
    """Each tier sets every variable its compose service sets, to the same value (compose's ${...}
    filled from .env): the same store and Envoy addresses, by the same service names. But for the
    registry: in Kubernetes the control plane's endpoints are the EndpointSlices, so pods do not
    register themselves."""
    deployments = kind("cpu", "Deployment")
    for tier in TIERS:
        [container] = containers(deployments[tier.name]).values()
        compose = {k: interpolate(v, SETTINGS) for k, v in COMPOSE[tier.name]["environment"].items()}
        assert compose.pop("TIERMESH_REGISTRY_URL") and "TIERMESH_REGISTRY_URL" not in env(container)
        assert compose.items() <= env(container).items(), tier.name
        assert container["image"] == COMPOSE[tier.name]["image"]
    assert containers(deployments["envoy"])["envoy"]["image"] == COMPOSE["envoy"]["image"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_tier_is_probed_over_the_grpc_health_protocol(overlay):
    for tier, arm, deployment in tier_workloads(overlay):
        [container] = containers(deployment).values()
        grpc_port = deployment_ports(tier, arm)["grpc"]
        readiness, startup = container["readinessProbe"], container["startupProbe"]
        assert readiness["grpc"] == {"port": grpc_port, "service": tier.service}, tier.name
        assert startup["grpc"]["port"] == grpc_port
        # the tier's own load timeout (the llm's vLLM start-up and warm-up: 300 s) before liveness
        assert startup["periodSeconds"] * startup["failureThreshold"] >= tier.load_timeout_s, tier.name
        liveness = container["livenessProbe"]
        if tier.rest:
            assert liveness["httpGet"] == {"path": "/healthz", "port": "http"}
        else:
            assert liveness["grpc"] == {"port": grpc_port, "service": ""}
    startup = containers(kind(overlay, "Deployment")["llm"])["llm"]["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # ~60 s of vLLM on CPU, twice


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_period_covers_each_tiers_drain(overlay):
    for tier, _, deployment in tier_workloads(overlay):
        [container] = containers(deployment).values()
        config = load(tier_config(tier), prefix=tier.prefix, environ=env(container))
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > config.drain_delay_s + config.shutdown_grace_s, tier.name
    grace = {
        n: d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        for n, d in kind(overlay, "Deployment").items()
    }
    assert grace["gateway"] >= 120 and grace["llm"] >= 100


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replicas_follow_the_ports_file_and_the_autoscalers(overlay):
    deployments = kind(overlay, "Deployment")
    autoscalers = {
        h["spec"]["scaleTargetRef"]["name"]: h for h in kind(overlay, "HorizontalPodAutoscaler").values()
    }
    assert set(autoscalers) == {"llm", "embedder"}
    for tier, arm, deployment in tier_workloads(overlay):
        name = deployment["metadata"]["name"]
        wanted = int(SETTINGS.get(f"{arm_prefix(tier, arm)}REPLICAS", "1"))
        if name in autoscalers:
            # the autoscaler owns the count: a re-apply must not reset it
            assert "replicas" not in deployment["spec"]
            assert autoscalers[name]["spec"]["minReplicas"] == wanted
            assert autoscalers[name]["spec"]["maxReplicas"] > wanted
        else:
            assert deployment["spec"]["replicas"] == wanted, name
        assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert deployments["retriever"]["spec"]["replicas"] == int(SETTINGS["RETRIEVER_REPLICAS"]) == 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_that_can_have_several_replicas_has_a_disruption_budget(overlay):
    budgets = kind(overlay, "PodDisruptionBudget")
    autoscaled = {
        h["spec"]["scaleTargetRef"]["name"] for h in kind(overlay, "HorizontalPodAutoscaler").values()
    }
    covered = set()
    for name, deployment in kind(overlay, "Deployment").items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        matching = [b for b in budgets.values() if b["spec"]["selector"]["matchLabels"] == selector]
        if deployment["spec"].get("replicas", 1) > 1 or name in autoscaled:
            [budget] = matching
            assert budget["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}, name
            covered.add(budget["metadata"]["name"])
    assert covered == set(budgets) and {"retriever", "llm", "embedder", "envoy"} <= covered


# -- autoscaling -------------------------------------------------------------------------------


def exported_metrics() -> dict[str, str]:
    """tiermesh_* metric name -> Gauge/Counter/Histogram, as the tiers and the kit declare them."""
    found = {}
    for path in [*REPO_ROOT.glob("services/*/*.py"), *REPO_ROOT.glob("tiermesh/kit/*.py")]:
        for metric_kind, name in re.findall(
            r"\b(Gauge|Counter|Histogram)\(\s*\"(tiermesh_\w+)\"", path.read_text()
        ):
            found[name] = metric_kind
    return found


def test_the_autoscalers_scale_on_gauges_the_tiers_export():
    metrics = exported_metrics()
    assert metrics["tiermesh_rpc_requests"] == "Counter"  # the scan finds the kit's metrics
    autoscalers = kind("cpu", "HorizontalPodAutoscaler")
    scaled_on = {}
    for name, autoscaler in autoscalers.items():
        [metric] = autoscaler["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
        scaled_on[name] = metric["pods"]["metric"]["name"]
    assert scaled_on == {"llm": "tiermesh_llm_requests_waiting", "embedder": "tiermesh_rpc_in_flight"}
    for metric in scaled_on.values():
        assert metrics.get(metric) == "Gauge", f"{metric} is not a gauge any tier exports"
    # prometheus-adapter serves exactly these, from the same series
    rules = yaml.safe_load((K8S / "prometheus-adapter.yaml").read_text())["rules"]["custom"]
    assert {rule["name"]["as"] for rule in rules} == set(scaled_on.values())
    for rule in rules:
        assert rule["seriesQuery"].startswith(rule["name"]["as"] + "{")
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


# -- GPUs, resources, pod security ------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_cpu_and_memory_requests_and_limits(overlay):
    for obj in rendered(overlay):
        if obj["kind"] in ("Deployment", "StatefulSet"):
            for container in containers(obj).values():
                resources = container.get("resources", {})
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(resources.get(part, {})), (obj["metadata"]["name"], part)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_only_for_the_llm_and_the_embedder_of_the_gpu_overlay(overlay):
    with_gpu = {}
    for obj in rendered(overlay):
        if obj["kind"] in ("Deployment", "StatefulSet"):
            for container in containers(obj).values():
                gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
                if gpus is not None:
                    with_gpu[obj["metadata"]["name"]] = (gpus, container["image"])
    if overlay == "gpu":
        assert with_gpu == {"llm": (1, "tiermesh/llm-cuda"), "embedder": (1, "tiermesh/embedder-cuda")}
        deployments = kind(overlay, "Deployment")
        assert env(containers(deployments["embedder"])["embedder"])["EMBEDDER_DEVICE"] == "cuda"
        # the other tiers as on CPU
        cpu = kind("cpu", "Deployment")
        assert env(containers(deployments["bias"])["bias"]) == env(containers(cpu["bias"])["bias"])
    else:
        assert with_gpu == {}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_pod_security_standard(overlay):
    for obj in rendered(overlay):
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        name, spec = obj["metadata"]["name"], obj["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec), name
        assert all("hostPath" not in volume for volume in spec.get("volumes", [])), name
        for container in containers(obj).values():
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert all("hostPort" not in port for port in container.get("ports", [])), name
        # no Service variables injected (a `store` Service would set STORE_PORT=tcp://...)
        assert spec["enableServiceLinks"] is False, name
        # only the control plane talks to the Kubernetes API
        assert spec["automountServiceAccountToken"] is (name == "envoy"), name


# -- the store ---------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_store_runs_composes_valkey_on_a_persistent_volume(overlay):
    store = kind(overlay, "StatefulSet")["store"]
    [valkey] = containers(store).values()
    compose = COMPOSE["store"]
    assert valkey["image"] == compose["image"]
    assert valkey["args"] == [interpolate(arg, SETTINGS) for arg in compose["command"]]
    flags = dict(zip(valkey["args"][1::2], valkey["args"][2::2], strict=True))
    assert flags["--appendonly"] == "yes" and flags["--appendfsync"] == "everysec"
    assert flags["--maxmemory"] == SETTINGS["STORE_MAXMEMORY"] and flags["--maxmemory-policy"] == "noeviction"
    assert ports(valkey) == {"redis": int(SETTINGS["STORE_PORT"])}
    [claim] = store["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": flags["--dir"]} in valkey["volumeMounts"]
    service = kind(overlay, "Service")[store["spec"]["serviceName"]]
    assert service["metadata"]["name"] == "store" and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [
        {"name": "redis", "port": int(SETTINGS["STORE_PORT"]), "targetPort": "redis"}
    ]


# -- Envoy and the control plane ---------------------------------------------------------------


def load_bootstrap_script():
    spec = importlib.util.spec_from_file_location("k8s_bootstrap", K8S / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_boots_from_the_control_planes_bootstrap(overlay, tmp_path):
    deployment = kind(overlay, "Deployment")["envoy"]
    envoy, xds = containers(deployment)["envoy"], containers(deployment)["xds"]
    [config_map] = [c for n, c in kind(overlay, "ConfigMap").items() if n.startswith("envoy-bootstrap-")]
    text = config_map["data"]["bootstrap.yaml"]
    assert text == load_bootstrap_script().render(), "stale: run .venv/bin/python deploy/k8s/bootstrap.py"
    write_checked(text, tmp_path / "bootstrap.yaml")  # Envoy itself accepts it
    # mounted where `-c` reads it
    [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    [mount] = [m for m in envoy["volumeMounts"] if m["name"] == volume["name"]]
    assert envoy["args"][envoy["args"].index("-c") + 1] == f"{mount['mountPath']}/bootstrap.yaml"
    bootstrap = yaml.safe_load(text)
    # clusters, endpoints, routes and weights over ADS, from the sidecar
    ads = bootstrap["dynamic_resources"]["ads_config"]
    [xds_cluster] = [
        c
        for c in bootstrap["static_resources"]["clusters"]
        if c["name"] == ads["grpc_services"][0]["envoy_grpc"]["cluster_name"]
    ]
    [[endpoint]] = [e["lb_endpoints"] for e in xds_cluster["load_assignment"]["endpoints"]]
    assert endpoint["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": XDS_PORT,
    }
    assert "ads" in bootstrap["dynamic_resources"]["cds_config"]
    assert xds["command"] == ["python", "-m", "tiermesh.control.xds"]
    assert xds["args"][:4] == ["--source", "kubernetes", "--port", str(XDS_PORT)]
    # the listeners of .env on every address of the pod; the admin on its loopback only
    listeners = {
        listener["name"]: listener["address"]["socket_address"]
        for listener in bootstrap["static_resources"]["listeners"]
    }
    assert {a["address"] for a in listeners.values()} == {"0.0.0.0"}
    assert {a["port_value"] for a in listeners.values()} == set(ports(envoy).values())
    assert ports(envoy) == {
        "grpc": int(SETTINGS["ENVOY_GRPC_PORT"]),
        "http": int(SETTINGS["ENVOY_HTTP_PORT"]),
        "metrics": int(SETTINGS["ENVOY_METRICS_PORT"]),
    }
    admin = bootstrap["admin"]["address"]["socket_address"]
    assert admin == {"address": "127.0.0.1", "port_value": int(SETTINGS["ENVOY_ADMIN_PORT"])}
    # the probes ask the metrics listener, which routes /stats/prometheus to the admin
    assert "path: /stats/prometheus" in text
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert (
            envoy[probe]["httpGet"]["path"].startswith("/stats/prometheus?")
            and envoy[probe]["httpGet"]["port"] == "metrics"
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_control_plane_may_only_read_the_endpointslices_of_its_namespace(overlay):
    kinds = {obj["kind"] for obj in rendered(overlay)}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    [(role_name, role)] = kind(overlay, "Role").items()
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    [binding] = kind(overlay, "RoleBinding").values()
    [account] = kind(overlay, "ServiceAccount").values()
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name}
    namespace = account["metadata"]["namespace"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": namespace}
    ]
    pod = kind(overlay, "Deployment")["envoy"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_envoys_rest_listener_is_exposed(overlay):
    services = kind(overlay, "Service")
    exposed = {n: s for n, s in services.items() if s["spec"].get("type", "ClusterIP") != "ClusterIP"}
    assert list(exposed) == ["envoy-rest"]
    assert exposed["envoy-rest"]["spec"]["ports"] == [
        {"name": "http", "port": int(SETTINGS["ENVOY_HTTP_PORT"]), "targetPort": "http"}
    ]
    assert "Ingress" not in {obj["kind"] for obj in rendered(overlay)}
    admin = int(SETTINGS["ENVOY_ADMIN_PORT"])
    for service in services.values():
        assert admin not in {p["port"] for p in service["spec"]["ports"]}
    for deployment in kind(overlay, "Deployment").values():
        for container in containers(deployment).values():
            assert admin not in ports(container).values()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_control_plane_finds_every_deployment_through_its_service(overlay):
    """The EndpointSlices Kubernetes would publish for the rendered Services (each Service's labels,
    its named ports with the pods' numbers, one ready pod) give exactly the clusters of Envoy's
    configuration for the same tiers and arms, each on the arm's gRPC port of .env."""
    workloads = [*kind(overlay, "Deployment").values(), *kind(overlay, "StatefulSet").values()]
    slices = []
    for number, (name, service) in enumerate(kind(overlay, "Service").items(), 1):
        selector = service["spec"]["selector"]
        [workload] = [
            w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        container_ports = {k: v for c in containers(workload).values() for k, v in ports(c).items()}
        slices.append(
            {
                "metadata": {"labels": {**service["metadata"]["labels"], "kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [f"10.0.0.{number}"], "conditions": {"ready": True}}],
                "ports": [
                    {"name": p["name"], "port": container_ports[p["targetPort"]]}
                    for p in service["spec"]["ports"]
                ],
            }
        )
    found = endpoints_from_slices(slices)
    # the control plane's settings: .env and what its container sets (a tier's treatment)
    xds = containers(kind(overlay, "Deployment")["envoy"])["xds"]
    settings = read_settings({**SETTINGS, **env(xds)})
    static = yaml.safe_load(render_envoy(settings))["static_resources"]["clusters"]
    assert set(found) == {c["name"] for c in static} - {"envoy_admin", "traces"}
    for tier in TIERS:
        arms = ("control", "treatment") if treatment_overrides(settings, tier) is not None else ("control",)
        for arm in arms:
            [(_, port)] = found[cluster_name(tier, arm)]
            assert port == int(settings[f"{arm_prefix(tier, arm)}GRPC_PORT"])


def test_the_llm_treatment_runs_beside_its_control():
    deployments = kind("cpu-llm-treatment", "Deployment")
    treatment, control = deployments["llm-treatment"], deployments["llm"]
    llm = next(t for t in TIERS if t.name == "llm")
    assert treatment["spec"]["template"]["metadata"]["labels"] == labels(llm, "treatment")
    service = kind("cpu-llm-treatment", "Service")["llm-treatment"]
    assert service["metadata"]["labels"] == labels(llm, "treatment")
    [container] = containers(treatment).values()
    [control_container] = containers(control).values()
    assert container["command"] == ["python", "-m", "tiermesh.control.treatment"]
    assert ports(container) == deployment_ports(llm, "treatment") != ports(control_container)
    # the runner's parser accepts what it differs in, and the control plane reads the same value
    variables = env(container)
    assert treatment_overrides(variables, llm) is not None
    xds = containers(deployments["envoy"])["xds"]
    assert env(xds)["LLM_TREATMENT"] == variables["LLM_TREATMENT"]
    # sized like the control (the overlay's component patches both arms)
    assert container["resources"] == control_container["resources"]
    # no treatment elsewhere
    for overlay in ("cpu", "gpu"):
        assert "llm-treatment" not in kind(overlay, "Deployment")
        xds = containers(kind(overlay, "Deployment")["envoy"])["xds"]
        assert not any(name.endswith("_TREATMENT") for name in env(xds))


# -- network policies --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pod:
    """A connection's end: its labels, its named ports, its namespace (and that namespace's labels)."""

    labels: Mapping[str, str]
    ports: Mapping[str, int] = dataclasses.field(default_factory=dict)
    namespace: str = "tiermesh"
    namespace_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)


OUTSIDE = None  # a client outside the cluster (through the LoadBalancer)
PROMETHEUS = Pod({"app.kubernetes.io/name": "prometheus"}, namespace="monitoring")
STRANGER = Pod({"app.kubernetes.io/name": "debug-shell"})  # any other pod in the namespace


def selects(selector: Mapping[str, Any], pod_labels: Mapping[str, str]) -> bool:
    """A label selector (matchLabels and matchExpressions) against labels."""
    if any(pod_labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in pod_labels
        if not {
            "In": present and pod_labels[key] in values,
            "NotIn": not present or pod_labels[key] not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True


def allowed(policies: list[dict[str, Any]], source: Pod | None, target: Pod, port: str) -> bool:
    """Whether `source` (None: outside the cluster) may connect to `target`'s named port, under
    Kubernetes' NetworkPolicy semantics: a pod selected by no ingress policy takes everything;
    otherwise some rule of a policy selecting it must match both the port and the peer."""
    number = target.ports[port]
    selecting = [
        p
        for p in policies
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and p["metadata"]["namespace"] == target.namespace
        and selects(p["spec"]["podSelector"], target.labels)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            rule_ports = rule.get("ports")
            if rule_ports and not any(p.get("port") in (port, number) for p in rule_ports):
                continue
            if "from" not in rule or any(_peer(peer, source, target.namespace) for peer in rule["from"]):
                return True
    return False


def _peer(peer: Mapping[str, Any], source: Pod | None, namespace: str) -> bool:
    if source is None:
        return "ipBlock" in peer
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": source.namespace, **source.namespace_labels}
        if not selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif "podSelector" in peer and source.namespace != namespace:
        return False
    if "ipBlock" in peer:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], source.labels)


def mesh_pods(overlay: str) -> dict[str, Pod]:
    pods = {}
    for workload in [*kind(overlay, "Deployment").values(), *kind(overlay, "StatefulSet").values()]:
        named_ports = {k: v for c in containers(workload).values() for k, v in ports(c).items()}
        pods[workload["metadata"]["name"]] = Pod(
            workload["spec"]["template"]["metadata"]["labels"], named_ports
        )
    return pods


def test_the_policy_evaluator_follows_kubernetes_semantics():
    web = Pod({"app": "web"}, {"http": 80})
    only_app = {
        "metadata": {"namespace": "tiermesh"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}},
    }
    deny = {**only_app, "spec": {**only_app["spec"], "policyTypes": ["Ingress"]}}
    from_api = {
        **deny,
        "spec": {**deny["spec"], "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "api"}}}]}]},
    }
    assert allowed([], STRANGER, web, "http")  # not isolated
    assert not allowed([deny], STRANGER, web, "http")
    assert allowed([deny, from_api], Pod({"app": "api"}), web, "http")
    assert not allowed([deny, from_api], Pod({"app": "api"}, namespace="other"), web, "http")
    assert not allowed([deny, from_api], OUTSIDE, web, "http")
    any_port_80 = {**deny, "spec": {**deny["spec"], "ingress": [{"ports": [{"port": 80}]}]}}
    assert allowed([any_port_80], OUTSIDE, web, "http")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_network_policies_allow_only_the_meshs_own_connections(overlay):
    policies = list(kind(overlay, "NetworkPolicy").values())
    pods = mesh_pods(overlay)
    envoy, store = pods["envoy"], pods["store"]
    tiers = {name: pod for name, pod in pods.items() if "tiermesh.dev/tier" in pod.labels}
    # who calls a tier (a *_TARGET setting) and who uses the store, from the tiers' own settings
    settings_of = {
        tier.name: {n for n, _, _ in describe(tier_config(tier), prefix=tier.prefix)} for tier in TIERS
    }
    callers = {t for t, names in settings_of.items() if any(n.endswith("_TARGET") for n in names)}
    store_clients = {
        t for t, names in settings_of.items() if any(n.endswith(("_STORE_URL", "_CACHE_URL")) for n in names)
    }
    assert callers == {"retriever", "bias", "gateway"} and "llm" not in store_clients

    # a default deny: any pod of the namespace is isolated, the mesh's or not ...
    assert not allowed(policies, STRANGER, Pod({"app.kubernetes.io/name": "debug-shell"}, {"web": 80}), "web")
    # ... and from outside the cluster or any other pod, only Envoy's REST listener is open
    assert allowed(policies, OUTSIDE, envoy, "http")
    for name, pod in pods.items():
        for port in pod.ports:
            public = name == "envoy" and port == "http"
            assert allowed(policies, OUTSIDE, pod, port) == public, (name, port)
            assert allowed(policies, STRANGER, pod, port) == public, (name, port)
    for name, pod in tiers.items():
        tier = pod.labels["tiermesh.dev/tier"]
        # a tier calls tiers only through Envoy's gRPC listener, and only if it calls any
        assert allowed(policies, pod, envoy, "grpc") == (tier in callers), name
        for other_name, other in tiers.items():
            for port in other.ports:
                assert not allowed(policies, pod, other, port), (name, other_name, port)
        # Envoy reaches its gRPC (and REST) port, not its metrics
        assert allowed(policies, envoy, pod, "grpc") and not allowed(policies, envoy, pod, "metrics")
        if "http" in pod.ports:
            assert allowed(policies, envoy, pod, "http")
        assert allowed(policies, pod, store, "redis") == (tier in store_clients), name
        # Prometheus scrapes metrics only
        assert allowed(policies, PROMETHEUS, pod, "metrics"), name
        assert not allowed(policies, PROMETHEUS, pod, "grpc"), name
    assert allowed(policies, envoy, store, "redis")  # the control plane reads the A/B weights
    assert allowed(policies, PROMETHEUS, envoy, "metrics")
    assert not allowed(policies, PROMETHEUS, envoy, "grpc")
    assert not allowed(policies, PROMETHEUS, store, "redis")
