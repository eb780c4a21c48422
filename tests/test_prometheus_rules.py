"""deploy/: the Prometheus alerting rules pass promtool's checks and unit tests, and the rules and the
Grafana dashboard query only metrics the proxy exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import HISTOGRAM_SUFFIXES, HISTOGRAMS, METRICS, ROOT

ALERTS = Path("deploy/prometheus/alerts.yml")
ALERTS_TEST = Path("deploy/prometheus/alerts_test.yml")
PROMETHEUS_CONFIG = Path("deploy/prometheus/prometheus.yml")
DASHBOARD = Path("deploy/grafana/mlproxy-dashboard.json")

# What the dashboard must show at least (one panel or more each).
DASHBOARD_MUST_SHOW = {
    "mlproxy_requests_total",
    "mlproxy_request_duration_seconds",
    "mlproxy_traffic_weight_ratio",
    "mlproxy_shadow_agreement_ratio",
    "mlproxy_drift_score",
    "mlproxy_accuracy_ratio",
    "mlproxy_holdout_accuracy_ratio",
    "mlproxy_input_duplicate_ratio",
    "mlproxy_input_out_of_range_ratio",
    "mlproxy_event_loop_lag_seconds",
    "mlproxy_inflight_requests",
    "mlproxy_queue_depth",
    "mlproxy_config_reloads_total",
    "mlproxy_rollout_status",
    "mlproxy_alerts_open",
    "mlproxy_admission_limit",
    "mlproxy_admission_waiting_requests",
    "mlproxy_refused_connections_total",
}

METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:])(?:mlproxy|process)_[a-z0-9_]+")
# Grafana's variables, replaced by values that make the query plain PromQL.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$instance": ".*",
    "$model": ".*",
    "$version": ".*",
}


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """promtool with `args` from the repository root; fails (never skips) when it is missing."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool missing: run tools/ensure-debs.sh", pytrace=False)
    return subprocess.run(
        [promtool, *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or any text), histogram series mapped to the family."""
    names = set()
    for name in METRIC_NAME.findall(expr):
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
                name = name.removesuffix(suffix)
        names.add(name)
    return names


def load_dashboard() -> dict[str, Any]:
    with (ROOT / DASHBOARD).open(encoding="utf-8") as f:
        dashboard: dict[str, Any] = json.load(f)
    return dashboard


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def panel_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel and annotation."""
    exprs = [
        (panel["title"], target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]
    exprs += [
        (f"annotation {a['name']}", a["expr"])
        for a in dashboard["annotations"]["list"]
        if "expr" in a
    ]
    return exprs


def as_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr!r}"
    return expr


# --------------------------------------------------------------------------- alerting rules


def test_alert_rules_pass_promtool_check() -> None:
    assert_ok(run_promtool("check", "rules", str(ALERTS)))


def test_alert_rules_pass_their_unit_tests() -> None:
    assert_ok(run_promtool("test", "rules", str(ALERTS_TEST)))


def test_example_prometheus_config_is_valid() -> None:
    assert_ok(run_promtool("check", "config", str(PROMETHEUS_CONFIG)))


def test_alert_rules_reference_only_exported_metrics() -> None:
    names = metric_names((ROOT / ALERTS).read_text(encoding="utf-8"))
    assert names, "no metric names found in the rules"
    assert names <= METRICS, f"not exported by mlproxy: {sorted(names - METRICS)}"


def test_every_alert_is_tested_firing_and_quiet() -> None:
    alerts = set(
        re.findall(r"^\s*- alert: (\w+)", (ROOT / ALERTS).read_text(encoding="utf-8"), re.M)
    )
    fired: set[str] = set()
    quiet: set[str] = set()
    # One block per alert_rule_test entry, from its eval_time to the next one.
    for block in re.split(r"\beval_time:", (ROOT / ALERTS_TEST).read_text(encoding="utf-8"))[1:]:
        match = re.search(r"\balertname:\s*(\w+)", block)
        assert match is not None, f"an alert_rule_test without alertname: {block[:200]!r}"
        if re.search(r"\bexp_alerts:\s*\[\]", block):
            quiet.add(match[1])
        elif "exp_labels:" in block:
            fired.add(match[1])
    assert len(alerts) >= 10, f"too few alerts found in {ALERTS}: {sorted(alerts)}"
    assert alerts - fired == set(), f"never tested firing: {sorted(alerts - fired)}"
    assert alerts - quiet == set(), f"never tested quiet: {sorted(alerts - quiet)}"
    assert (fired | quiet) - alerts == set(), (
        f"tests of unknown alerts: {sorted((fired | quiet) - alerts)}"
    )


# --------------------------------------------------------------------------- dashboard


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = load_dashboard()
    queried: set[str] = set()
    for title, expr in panel_exprs(dashboard):
        names = metric_names(expr)
        # ALERTS: Prometheus's own series of the rules' alerts.
        assert names or "ALERTS{" in expr, f"panel {title!r} queries no mlproxy metric: {expr}"
        unknown = names - METRICS
        assert not unknown, f"panel {title!r} queries metrics mlproxy does not export: {unknown}"
        queried |= names
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            names = metric_names(variable["definition"])
            assert names and names <= METRICS, f"variable {variable['name']}: {names}"
    missing = DASHBOARD_MUST_SHOW - queried
    assert not missing, f"the dashboard shows nothing of {sorted(missing)}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses rule expressions: each query becomes a recording rule.
    exprs = panel_exprs(load_dashboard())
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(exprs):
        lines += [
            f"      - record: dashboard:query_{i}",
            f"        expr: {json.dumps(as_promql(expr))}",
        ]
    rules = tmp_path / "dashboard_rules.yml"
    rules.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert_ok(run_promtool("check", "rules", str(rules)))


def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] == "mlproxy"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"model", "version"} <= variables.keys()
    assert "label_values(mlproxy_requests_total" in variables["model"]["definition"]

    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    taken: set[tuple[int, int]] = set()
    for panel in panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), f"panel {panel['title']!r} repeats a refId"
