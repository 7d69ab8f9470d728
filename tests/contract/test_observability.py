"""observability/: Prometheus scrapes what compose runs, and the dashboard asks for metrics that exist."""

import ast
import itertools
import json
import re
from pathlib import Path

import pytest
import yaml

from tiermesh.kit.contract import REPO_ROOT
from tiermesh.kit.topology import ARMS, TIERS, read_settings, replica_ports

OBSERVABILITY = REPO_ROOT / "observability"
PROMETHEUS = yaml.safe_load((OBSERVABILITY / "prometheus.yml").read_text())
GRAFANA = OBSERVABILITY / "grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards" / "tiermesh.json").read_text())
SERVICES = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]


def scrape_targets() -> list[dict]:
    """Every target of prometheus.yml: static ones, and DNS-discovered names with the labels their
    job's relabelling sets to constants."""
    targets = []
    for job in PROMETHEUS["scrape_configs"]:
        common = {
            "job": job["job_name"],
            "path": job.get("metrics_path", "/metrics"),
            "honor_labels": job.get("honor_labels", False),
        }
        for group in job.get("static_configs", []):
            for address in group["targets"]:
                targets.append({**common, "address": address, "labels": dict(group.get("labels", {}))})
        constants = {
            rule["target_label"]: rule["replacement"]
            for rule in job.get("relabel_configs", [])
            if not rule.get("source_labels") and rule.get("action", "replace") == "replace"
        }
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                targets.append({**common, "address": f"{name}:{sd['port']}", "labels": constants})
    return targets


TARGETS = scrape_targets()


def service_of(tier, arm: str) -> str:
    return tier.name if arm == "control" else f"{tier.name}-{arm}"


def test_prometheus_scrapes_every_5_seconds_with_unique_jobs():
    assert PROMETHEUS["global"]["scrape_interval"] == "5s"
    jobs = [job["job_name"] for job in PROMETHEUS["scrape_configs"]]
    assert len(jobs) == len(set(jobs))


def test_prometheus_scrapes_envoys_metrics_listener():
    settings = read_settings({})
    (envoy,) = [t for t in TARGETS if t["labels"].get("component") == "envoy"]
    assert envoy["address"] == f"envoy:{settings['ENVOY_METRICS_PORT']}"
    assert envoy["path"] == "/stats/prometheus"
    assert "envoy" in SERVICES


@pytest.mark.parametrize(
    ("tier", "arm"), list(itertools.product(TIERS, ARMS)), ids=lambda v: getattr(v, "name", v)
)
def test_prometheus_scrapes_every_tier_and_arm_on_its_ports_file_port(tier, arm):
    settings = read_settings({})
    # in compose every replica of an arm is its own container on the arm's first port
    address = f"{service_of(tier, arm)}:{replica_ports(settings, tier, 'METRICS', arm)[0]}"
    assert service_of(tier, arm) in SERVICES
    matches = [t for t in TARGETS if t["address"] == address]
    assert len(matches) == 1, f"{address} is scraped {len(matches)} times"
    (target,) = matches
    assert target["labels"]["tier"] == tier.name and target["labels"]["arm"] == arm
    assert target["labels"]["component"] == "tier" and target["path"] == "/metrics"
    # the gateway's hop histogram labels the tier and arm it called: those must win
    assert target["honor_labels"] is True


def test_every_target_is_labelled_with_tier_and_arm_and_nothing_else_is_scraped():
    settings = read_settings({})
    for target in TARGETS:
        assert target["labels"].get("tier") and target["labels"].get("arm"), target
    expected = {f"envoy:{settings['ENVOY_METRICS_PORT']}"} | {
        f"{service_of(tier, arm)}:{replica_ports(settings, tier, 'METRICS', arm)[0]}"
        for tier, arm in itertools.product(TIERS, ARMS)
    }
    assert {t["address"] for t in TARGETS} == expected
    assert len(TARGETS) == len(expected)


def test_compose_runs_prometheus_and_grafana_with_these_files():
    prometheus, grafana = SERVICES["prometheus"], SERVICES["grafana"]
    assert prometheus["profiles"] == ["observability"] == grafana["profiles"]
    assert "./observability/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "127.0.0.1:9090:9090" in prometheus["ports"] and "127.0.0.1:3000:3000" in grafana["ports"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./observability/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "tiermesh.yml").read_text())
    assert mounts["./observability/grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (prometheus_source,) = source["datasources"]
    assert prometheus_source["type"] == "prometheus"
    assert prometheus_source["url"] == "http://prometheus:9090"


# -- the dashboard -----------------------------------------------------------------------------


def all_panels(panels: list[dict]) -> list[dict]:
    """Panels, those inside collapsed rows included."""
    return [p for panel in panels for p in [panel, *all_panels(panel.get("panels", []))]]


PANELS = [p for p in all_panels(DASHBOARD["panels"]) if p["type"] != "row"]


def test_the_dashboard_is_a_grafana_dashboard_with_a_tier_variable():
    assert DASHBOARD["uid"] and DASHBOARD["title"] == "tiermesh"
    assert DASHBOARD["schemaVersion"] >= 36
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["tier"]["type"] == "query" and variables["tier"]["multi"]
    ids = [p["id"] for p in all_panels(DASHBOARD["panels"])]
    assert len(ids) == len(set(ids))
    rows = {p["title"].split(":")[0] for p in DASHBOARD["panels"] if p["type"] == "row"}
    assert {"Tiers", "Experiments", "Bias", "LLM"} <= rows


def test_every_panel_queries_prometheus():
    assert PANELS
    for panel in PANELS:
        exprs = [t.get("expr", "").strip() for t in panel.get("targets", [])]
        assert exprs and all(exprs), panel["title"]


def defined_metric_names() -> set[str]:
    """The series names the repository's prometheus_client metrics expose."""
    suffixes = {
        "Counter": ("_total", "_created"),
        "Histogram": ("_bucket", "_sum", "_count", "_created"),
        "Summary": ("", "_sum", "_count", "_created"),
        "Gauge": ("",),
        "Info": ("_info",),
        "Enum": ("",),
    }
    names = set()
    skip = {".venv", "var", ".git", "tests"}
    for path in REPO_ROOT.rglob("*.py"):
        if skip & set(path.relative_to(REPO_ROOT).parts):
            continue
        for node in ast.walk(ast.parse(Path(path).read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            kind = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if kind not in suffixes:
                continue
            args = [*node.args[:1], *(k.value for k in node.keywords if k.arg == "name")]
            if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                base = args[0].value
                if kind == "Counter":
                    base = base.removesuffix("_total")
                names.update(base + suffix for suffix in suffixes[kind])
    return names


def test_every_tiermesh_metric_on_the_dashboard_is_one_the_code_defines():
    defined = defined_metric_names()
    assert "tiermesh_rpc_requests_total" in defined and "tiermesh_rpc_latency_seconds_bucket" in defined
    used = {
        name
        for panel in PANELS
        for target in panel["targets"]
        for name in re.findall(r"\btiermesh_[a-z0-9_]+", target["expr"])
    }
    assert used, "the dashboard uses no tiermesh metric"
    assert used <= defined, sorted(used - defined)


def test_the_experiments_row_compares_each_tiers_arms_through_envoy():
    exprs = " ".join(t["expr"] for p in PANELS for t in p["targets"])
    assert "envoy_cluster_upstream_rq_total" in exprs and "envoy_cluster_upstream_rq_time_bucket" in exprs
    assert 'envoy_cluster_name=~"$tier(_treatment)?' in exprs
    assert "tiermesh_gateway_hop_seconds_bucket" in exprs
