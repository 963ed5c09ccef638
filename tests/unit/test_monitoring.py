"""Monitoring: the compose Prometheus and Grafana configuration checked against the
metrics taskq exports, and the queue series of the API's metrics. The queue depths read
from a real broker are in ``tests/integration/test_monitoring.py``."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import generate_latest

from taskq.metrics import ApiMetrics, WorkerMetrics
from taskq.model import QueuePause, RequestOutcome, Stats, StatusCounts, Throughput
from taskq.web.monitor import QueueDepth, StatsSnapshot
from tests.support import ROOT
from tests.support.metrics import samples

DEPLOY = ROOT / "deploy"


# ------------------------------------------------------------ compose, Prometheus, Grafana


def exported_metric_names() -> set[str]:
    """Every sample name the API and the workers can expose."""
    names = set()
    for registry in (ApiMetrics().registry, WorkerMetrics().registry):
        for family in registry.collect():
            if family.type == "counter":
                names |= {family.name + "_total", family.name + "_created"}
            elif family.type == "histogram":
                names |= {family.name + s for s in ("_bucket", "_count", "_sum", "_created")}
            else:
                names.add(family.name)
    return names


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(ROOT / "compose.yaml")
    return data


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DEPLOY / "grafana/dashboards/taskq.json").read_text())
    return data


def panel_exprs() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def test_grafana_panels_query_only_metrics_taskq_exports() -> None:
    exported = exported_metric_names()
    exprs = panel_exprs()
    assert len(exprs) >= 20
    for title, expr in exprs:
        used = set(re.findall(r"\btaskq_[a-z_]+\b", expr))
        # Prometheus's own `up` is the one other series a panel may read.
        assert used or re.search(r"\bup\{", expr), f"{title}: {expr} names no taskq metric"
        assert used <= exported, f"{title}: {sorted(used - exported)} are not exported"
        assert expr.count("(") == expr.count(")"), f"{title}: unbalanced {expr}"


def test_grafana_dashboard_covers_what_operators_need() -> None:
    text = " ".join(expr for _, expr in panel_exprs())
    for needed in (
        "taskq_tasks_processed_total",  # throughput by outcome
        "histogram_quantile(0.95, sum by (le) (rate(taskq_task_queue_wait_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (rate(taskq_task_duration_seconds_bucket",
        'taskq_queue_messages{kind="work"}',  # queue depths
        'taskq_queue_messages{kind="dlq"}',  # DLQ size
        "taskq_task_retries_total",
        "taskq_tasks_in_flight",
        "taskq_publish_failures_total",
        "taskq_unpublished_tasks",
        # Flow control and workflows (issues #17, #18).
        "sum by (reason) (taskq_waiting_tasks)",
        "taskq_rate_limited_total",
        "sum by (status) (taskq_workflows)",
        "taskq_handoffs_total",
        "taskq_schedule_lateness_seconds_bucket",
    ):
        assert needed in text, needed
    board = dashboard()
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)) and board["uid"] == "taskq-overview"
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]


def test_grafana_datasource_is_the_one_the_panels_use() -> None:
    provisioned = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")
    [source] = provisioned["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    for panel in dashboard()["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}


def test_grafana_provider_path_is_where_compose_mounts_the_dashboards() -> None:
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/taskq.yaml")
    path = provider["providers"][0]["options"]["path"]
    grafana = compose()["services"]["grafana"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in grafana["volumes"]}
    assert mounts[path] == "./deploy/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/taskq.json"


def test_prometheus_scrapes_the_api_and_every_worker() -> None:
    config = load_yaml(DEPLOY / "prometheus/prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = compose()["services"]

    [api_target] = jobs["taskq-api"]["static_configs"][0]["targets"]
    host, port = api_target.split(":")
    assert host == "api" and services["api"]["command"][-1] == port

    [discovery] = jobs["taskq-worker"]["dns_sd_configs"]
    assert discovery["names"] == ["worker"] and discovery["type"] == "A"
    worker = services["worker"]["command"]
    assert worker[worker.index("--metrics-port") + 1] == str(discovery["port"])
    assert worker[worker.index("--metrics-host") + 1] == "0.0.0.0"


def test_the_api_answers_the_hosts_its_compose_clients_use() -> None:
    from urllib.parse import urlsplit

    from taskq.settings import load_settings
    from taskq.web.hosts import HostCheck

    api = compose()["services"]["api"]
    command = api["command"]
    environment = {
        k.removeprefix("TASKQ_").lower(): v
        for k, v in api["environment"].items()
        if k.startswith("TASKQ_")
    }
    settings = load_settings(_env_file=None, **environment, http_host=command[3])
    check = HostCheck(settings)
    config = load_yaml(DEPLOY / "prometheus/prometheus.yml")
    scrape = {job["job_name"]: job for job in config["scrape_configs"]}["taskq-api"]
    healthcheck = next(arg for arg in api["healthcheck"]["test"] if "http://" in arg)
    health_url = healthcheck[healthcheck.index("http://") :].split("'")[0]
    published = api["ports"][0].rsplit(":", 2)[0]
    for host in [
        scrape["static_configs"][0]["targets"][0],  # Prometheus
        urlsplit(health_url).netloc,  # the healthcheck
        f"{published}:8000",  # the dashboard through the published port
        "localhost:8000",
    ]:
        assert check.allows(host), host
    assert not check.allows("rebound.example:8000")


def test_compose_mounts_exist_and_volumes_are_declared() -> None:
    data = compose()
    declared = set(data["volumes"])
    for name, service in data["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} is missing"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
        for dependency in service.get("depends_on", []):
            assert dependency in data["services"], f"{name} depends on unknown {dependency}"
    prometheus = data["services"]["prometheus"]
    assert (
        "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
        in (prometheus["volumes"])
    )


def test_observe_queues_sets_and_drops_the_series() -> None:
    metrics = ApiMetrics()
    metrics.observe_queues([("ns.default", "work", 4, 2), ("ns.dlq", "dlq", 1, 0)])
    text = generate_latest(metrics.registry).decode()
    assert samples(text, "taskq_queue_messages") == {
        (("kind", "work"), ("queue", "ns.default")): 4,
        (("kind", "dlq"), ("queue", "ns.dlq")): 1,
    }
    assert samples(text, "taskq_queue_consumers")[(("kind", "work"), ("queue", "ns.default"))] == 2
    metrics.observe_queues([("ns.high", "work", 0, 1)])
    text = generate_latest(metrics.registry).decode()
    assert list(samples(text, "taskq_queue_messages")) == [(("kind", "work"), ("queue", "ns.high"))]
    metrics.observe_queues(None)
    text = generate_latest(metrics.registry).decode()
    assert samples(text, "taskq_queue_messages") == {}
    assert samples(text, "taskq_broker_up") == {(): 0.0}


def test_the_enqueue_counter_names_every_request_outcome() -> None:
    metrics = ApiMetrics()
    for outcome in RequestOutcome:
        metrics.enqueued("t", "default", outcome, None)
    text = generate_latest(metrics.registry).decode()
    (help_line,) = [
        line for line in text.splitlines() if line.startswith("# HELP taskq_enqueue_total ")
    ]
    assert all(outcome in help_line for outcome in RequestOutcome), help_line
    assert 'taskq_enqueue_total{outcome="invalid",queue="default",type="t"} 1.0' in text


# ------------------------------------------------------------------------- the /stats body

AT = datetime(2026, 12, 7, 4, 0, tzinfo=UTC)
STATS = Stats(
    StatusCounts({"ENQUEUED": 3}, {"default": {"ENQUEUED": 3}}, {"t": {"ENQUEUED": 3}}),
    2,
    Throughput(60, 30, 6, 0.5, 1.5, 2.0, 4.0),
    {"t": {"paused": 1}},
    ["t"],
)


def test_the_stats_body_is_the_snapshot_as_the_dashboard_reads_it() -> None:
    pause = QueuePause("low", AT, "ops", None)
    snapshot = StatsSnapshot(STATS, {"ns.default": QueueDepth("work", 4, 1)}, [pause], AT)
    assert snapshot.to_json() == {
        "by_status": {"ENQUEUED": 3},
        "scheduled": 2,
        "by_queue": {"default": {"ENQUEUED": 3}},
        "by_type": {"t": {"ENQUEUED": 3}},
        "waiting": {"t": {"paused": 1}},
        "paused_types": ["t"],
        "broker": {
            "available": True,
            "queues": {"ns.default": {"kind": "work", "messages": 4, "consumers": 1}},
        },
        "paused_queues": {"low": {"paused_at": AT, "paused_by": "ops", "reason": None}},
        "throughput": {
            "window_seconds": 60,
            "succeeded_per_second": 0.5,
            "failed_per_second": 0.1,
            "enqueued_per_second": 1.0,
        },
        "latency": {
            "window_seconds": 60,
            "queue_wait_p50": 0.5,
            "queue_wait_p95": 1.5,
            "duration_p50": 2.0,
            "duration_p95": 4.0,
        },
        "at": AT,
        "estimated": [],
    }
    assert list(snapshot.to_json()) == [  # the keys in the order the body has had them
        "by_status", "scheduled", "by_queue", "by_type", "waiting", "paused_types", "broker",
        "paused_queues", "throughput", "latency", "at", "estimated",
    ]  # fmt: skip


def test_the_stats_body_says_what_the_broker_and_the_database_did_not() -> None:
    body = StatsSnapshot(STATS, None, None, AT).to_json()
    assert body["broker"] == {"available": False, "queues": {}}
    assert body["paused_queues"] is None
