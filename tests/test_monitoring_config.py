"""The monitoring configuration as data: ``config/prometheus.yml``, ``config/prometheus-rules.yml`` and
its unit tests, the Grafana dashboard ``config/grafana/session_svc.json`` with its provisioning, and
``compose.yaml`` that wires them to the service.

promtool validates the scrape config and the rules and runs the rules' unit tests; every PromQL
expression of the dashboard goes through promtool too. Every metric the rules and the dashboard name is
one the service exports (``EXPORTED``, cross-checked against a live scrape elsewhere). No container
engine runs here, so compose is checked as a document: it runs only ``session-svc`` subcommands, sets
only documented settings, and its service names and ports are the ones Prometheus scrapes and Grafana
reads. promtool missing is a failure, not a skip: ``scripts/tools.sh`` installs it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from session_svc import cli
from session_svc.settings import Settings
from tests.metric_names import EXPORTED, HISTOGRAMS, SERVICE_WIDE
from tests.support import ROOT, SETTINGS_ENV

CONFIG = ROOT / "config"
PROMETHEUS_YML = CONFIG / "prometheus.yml"
RULES = CONFIG / "prometheus-rules.yml"
RULES_TEST = CONFIG / "prometheus-rules.test.yml"
DASHBOARD = CONFIG / "grafana" / "session_svc.json"
GRAFANA_DATASOURCES = CONFIG / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = CONFIG / "grafana" / "provisioning" / "dashboards" / "session_svc.yml"
COMPOSE = ROOT / "compose.yaml"

# Made by Prometheus itself for every scrape job.
SCRAPE_SERIES = {"up"}
# Grafana's interval variables, replaced by a value before promtool sees a dashboard expression.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "6h"}
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def test_the_metric_lists_are_consistent() -> None:
    assert HISTOGRAMS <= EXPORTED and SERVICE_WIDE <= EXPORTED
    assert all(name.startswith("session_") for name in EXPORTED)


# promtool ----------------------------------------------------------------------------------------------


def promtool(*args: str | Path) -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is not installed: run scripts/tools.sh (Debian package prometheus)")
    out = subprocess.run(
        [exe, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_prometheus_config_is_valid() -> None:
    assert "1 rule files found" in promtool("check", "config", PROMETHEUS_YML)


def test_rules_are_valid() -> None:
    promtool("check", "rules", RULES)


def test_rules_unit_tests_pass() -> None:
    assert "SUCCESS" in promtool("test", "rules", RULES_TEST)


# Documents ---------------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def recorded() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def scrape_jobs() -> dict[str, list[str]]:
    """job name -> its static targets (host:port)."""
    config = load_yaml(PROMETHEUS_YML)
    return {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # a collapsed row keeps its panels inside


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in all_panels(dashboard()["panels"]) for t in p.get("targets", [])]


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = load_yaml(COMPOSE)
    return doc


def interpolated(value: str) -> str:
    """``${NAME:-default}`` as compose substitutes it when NAME is unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


# PromQL, read just enough to find the series an expression names ----------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# A name not followed by "(" (that would be a function or an aggregation).
_NAME = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
_KEYWORDS |= {"offset", "inf", "nan", "Inf", "NaN"}


def series_names(expr: str) -> set[str]:
    """The metric names an expression selects (label names, values, ranges and functions left out)."""
    text = _GROUPING.sub(" ", _RANGE.sub(" ", _MATCHERS.sub(" ", _STRING.sub('""', expr))))
    return {name for name in _NAME.findall(text) if name not in _KEYWORDS}


def summed_names(expr: str) -> set[str]:
    """The metric names inside the argument of any ``sum`` aggregation of ``expr``."""
    text = _STRING.sub('""', expr)
    found: set[str] = set()
    for match in re.finditer(r"\bsum\s*(?:(?:by|without)\s*\([^()]*\)\s*)?\(", text):
        depth, end = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        found |= series_names(text[match.end() : end - 1])
    return found


def test_the_promql_reader() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (route, le) (rate(session_http_request_duration_seconds_bucket"
        '{route="/x", status=~"5.."}[5m] offset 1m))) / on (job) group_left max(up{job="a"}) > 1e3'
    )
    assert series_names(expr) == {"session_http_request_duration_seconds_bucket", "up"}
    assert summed_names(expr) == {"session_http_request_duration_seconds_bucket"}
    assert summed_names("max(sum_over_time(session_sessions[5m])) + sum(x)") == {"x"}
    assert series_names("time() - max by (instance) (job:a:rate5m)") == {"job:a:rate5m"}


def exported_series() -> set[str]:
    histogram_series = {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    return (EXPORTED - HISTOGRAMS) | histogram_series | SCRAPE_SERIES


# Rules -------------------------------------------------------------------------------------------------


def test_every_alert_has_a_for_a_severity_and_annotations_with_values() -> None:
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)) >= 9
    for alert in alerts():
        assert re.fullmatch(r"\d+[smh]", alert.get("for", "")), alert["alert"]
        assert alert["labels"]["severity"] in {"warning", "critical"}, alert["alert"]
        annotations = alert["annotations"]
        assert set(annotations) >= {"summary", "description"}, alert["alert"]
        # Templated: the value that crossed the line, or the target that is down. An absence (no worker
        # target up, no heartbeat) has neither: its value is always the same.
        if alert["alert"] not in {"SessionWorkerAbsent", "SessionNoLiveWorker"}:
            assert "{{" in annotations["summary"] + annotations["description"], alert["alert"]


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in load_yaml(RULES_TEST)["tests"]:
        for case in group.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - firing == set(), "alerts never shown to fire"
    assert names - quiet == set(), "alerts never shown to stay quiet"
    assert (firing | quiet) - names == set(), "tests of alerts that do not exist"


def test_rules_name_only_exported_metrics() -> None:
    allowed = exported_series() | recorded()
    for rule in rules():
        names = series_names(rule["expr"])
        assert names, rule
        assert names <= allowed, (rule.get("alert") or rule.get("record"), names - allowed)


def test_recording_rule_names_follow_level_metric_operations() -> None:
    for name in recorded():
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", name), name


def test_dashboard_names_only_exported_metrics_and_recorded_series() -> None:
    allowed = exported_series() | recorded()
    for expr in dashboard_exprs():
        names = series_names(expr)
        assert names, expr
        assert names <= allowed, (expr, names - allowed)


def test_dashboard_shows_every_exported_metric() -> None:
    """Directly or through a recording rule it plots."""
    by_record = {rule["record"]: series_names(rule["expr"]) for rule in rules() if "record" in rule}
    shown: set[str] = set()
    for expr in dashboard_exprs():
        for name in series_names(expr):
            shown |= by_record.get(name, {name})
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) if n not in EXPORTED else n for n in shown}
    assert EXPORTED - shown == set()


def test_service_wide_figures_are_never_summed() -> None:
    """Every target reports the same service-wide value: a sum over targets would multiply it."""
    for expr in [rule["expr"] for rule in rules()] + dashboard_exprs():
        assert summed_names(expr) & SERVICE_WIDE == set(), expr


def test_job_labels_name_scrape_jobs() -> None:
    jobs = set(scrape_jobs())
    assert jobs == {"session_api", "session_worker"}
    exprs = [rule["expr"] for rule in rules()] + dashboard_exprs()
    used = {
        job for expr in exprs for value in re.findall(r'\bjob=~?"([^"]*)"', expr) for job in value.split("|")
    }
    assert used == jobs


def test_scrape_interval_is_15s_and_rules_load_from_beside_the_config() -> None:
    config = load_yaml(PROMETHEUS_YML)
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == [RULES.name]


# Dashboard ---------------------------------------------------------------------------------------------


def test_dashboard_is_importable_with_a_templated_datasource() -> None:
    board = dashboard()
    assert board["schemaVersion"] == 39
    assert board["uid"] and board["title"]
    (variable,) = [v for v in board["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    # No "__inputs": the datasource variable resolves both on a UI import and when provisioned.
    assert "__inputs" not in board


def test_every_dashboard_panel_has_a_datasource_and_targets() -> None:
    panels = list(all_panels(dashboard()["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 20
    for panel in graphs:
        assert panel["datasource"] == DS, panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"] == DS, panel["title"]
            assert target["expr"].strip(), panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]


def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    """Each expression, its Grafana variables filled in, as a recording rule that promtool parses."""
    records = []
    for i, expr in enumerate(dashboard_exprs()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        records.append({"record": f"dashboard:expr_{i}:check", "expr": expr})
    path = tmp_path / "dashboard-exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    assert f"SUCCESS: {len(records)} rules found" in promtool("check", "rules", path)


def test_dashboard_covers_the_overview_the_issue_asks_for() -> None:
    titles = " | ".join(p["title"].lower() for p in all_panels(dashboard()["panels"]))
    for words in (
        "requests/s by route",
        "latency p50 / p99 by route",
        "errors/s by status",
        "sessions by status",
        "tokens/s",
        "cost per hour",
        "outbox backlog",
        "outbox lag",
        "flush rows/s by kind",
        "dead letters",
        "redis / postgresql reachable",
        "redis memory",
        "by instance",
    ):
        assert words in titles, words


# Grafana provisioning ----------------------------------------------------------------------------------


def test_grafana_provisioning_points_at_compose_prometheus_and_the_dashboard() -> None:
    services = compose()["services"]
    (datasource,) = load_yaml(GRAFANA_DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    assert datasource["url"] == "http://prometheus:9090"
    assert "9090:9090" in services["prometheus"]["ports"]
    assert datasource["jsonData"]["timeInterval"] == load_yaml(PROMETHEUS_YML)["global"]["scrape_interval"]

    (provider,) = load_yaml(GRAFANA_DASHBOARDS)["providers"]
    mounts = mounts_of(services["grafana"])
    assert mounts["./config/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert Path(mounts[f"./{DASHBOARD.relative_to(ROOT)}"]).parent == Path(provider["options"]["path"])


# compose.yaml ------------------------------------------------------------------------------------------


def mounts_of(service: dict[str, Any]) -> dict[str, str]:
    """Bind mounts: host path -> container path."""
    out = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        if host.startswith("./"):
            out[host] = container
    return out


def project_services() -> dict[str, dict[str, Any]]:
    """The services that run the project image (built from the Dockerfile)."""
    return {name: s for name, s in compose()["services"].items() if s.get("build") == "."}


def subcommands() -> set[str]:
    (sub,) = [a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_compose_parses_and_has_every_part() -> None:
    assert set(compose()["services"]) == {
        "redis", "postgres", "migrate", "api", "worker", "prometheus", "grafana"
    }  # fmt: skip
    assert set(project_services()) == {"migrate", "api", "worker"}
    assert {s["image"] for s in project_services().values()} == {"session_svc:local"}
    assert (ROOT / "Dockerfile").is_file()


def test_compose_runs_only_session_svc_subcommands() -> None:
    commands = subcommands()
    assert {"api", "worker", "migrate", "health"} <= commands
    run = {name: s["command"] for name, s in project_services().items()}
    assert run == {
        "migrate": ["session-svc", "migrate"],
        "api": ["session-svc", "api"],
        "worker": ["session-svc", "worker"],
    }
    for name, service in project_services().items():
        check = service["healthcheck"]
        if service["command"][1] == "api":
            assert check["test"][:2] == ["CMD", "session-svc"] and check["test"][2] in commands
        else:
            # The image's HEALTHCHECK (`session-svc health`) probes the API port: off where no API runs.
            assert check == {"disable": True}, name


def test_compose_sets_only_documented_settings() -> None:
    example = (CONFIG / "session_svc.env.example").read_text()
    page = (ROOT / "docs" / "configuration.md").read_text()
    for name, service in project_services().items():
        env = {k: interpolated(str(v)) for k, v in service["environment"].items()}
        assert {"REDIS_URL", "DATABASE_URL"} <= set(env), name
        for variable in env:
            assert variable in SETTINGS_ENV, (name, variable)
            assert re.search(rf"^{variable}=", example, re.M), (name, variable)
            assert f"`{variable}`" in page, (name, variable)
        Settings.from_env(env)  # the values are valid too


def test_compose_service_names_and_ports_are_what_prometheus_scrapes() -> None:
    services = project_services()
    api_env = services["api"]["environment"]
    api_port = int(api_env.get("SERVICE_PORT", Settings().service_port))
    worker_port = int(services["worker"]["environment"]["WORKER_METRICS_PORT"])
    assert worker_port != 0 and Settings().worker_metrics_port == 0  # off unless compose turns it on
    assert scrape_jobs() == {"session_api": [f"api:{api_port}"], "session_worker": [f"worker:{worker_port}"]}
    assert f"{api_port}:{api_port}" in services["api"]["ports"]

    prometheus = compose()["services"]["prometheus"]
    mounts = mounts_of(prometheus)
    config_in_container = Path(mounts[f"./{PROMETHEUS_YML.relative_to(ROOT)}"])
    assert config_in_container == Path("/etc/prometheus/prometheus.yml")  # the image's default
    for rule_file in load_yaml(PROMETHEUS_YML)["rule_files"]:
        assert mounts[f"./config/{rule_file}"] == str(config_in_container.parent / rule_file)


def test_compose_redis_runs_the_repo_redis_conf() -> None:
    redis = compose()["services"]["redis"]
    assert redis["image"] == "redis:7"
    conf = mounts_of(redis)["./config/redis.conf"]
    command = [interpolated(str(arg)) for arg in redis["command"]]
    assert command[:2] == ["redis-server", conf]
    assert re.fullmatch(r"\d+[kmg]b", command[command.index("--maxmemory") + 1])  # bounded (operations.md)
    lines = (CONFIG / "redis.conf").read_text().splitlines()
    settings = dict(line.split(None, 1) for line in lines if line.strip() and not line.startswith("#"))
    assert settings["appendonly"] == "yes"
    assert settings["maxmemory-policy"] == "noeviction"


def test_compose_starts_in_order() -> None:
    services = compose()["services"]
    assert services["postgres"]["image"] == "postgres:15"
    for dependency in ("redis", "postgres"):
        assert services[dependency]["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL"}
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker"):
        assert services[name]["depends_on"] == {
            "redis": {"condition": "service_healthy"},
            "postgres": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"},
        }, name
        assert services[name]["restart"] == "unless-stopped"
    # DATABASE_URL's password is the one postgres is created with.
    url = interpolated(services["api"]["environment"]["DATABASE_URL"])
    pg = {k: interpolated(v) for k, v in services["postgres"]["environment"].items()}
    user, password, db = pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]
    assert url == f"postgresql://{user}:{password}@postgres:5432/{db}"


# docs/operations.md ------------------------------------------------------------------------------------


def test_operations_page_lists_every_alert() -> None:
    page = (ROOT / "docs" / "operations.md").read_text()
    section = page[page.index("## Monitoring") :]
    table = section[section.index("| alert | condition | what to do |") :].split("\n\n")[0]
    documented = {re.findall(r"`(\w+)`", row)[0] for row in table.splitlines()[2:]}
    assert documented == {a["alert"] for a in alerts()}
