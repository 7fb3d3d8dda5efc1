"""Every PromQL expression shipped in etc/monitoring (the Grafana dashboard's panels and
variables, the recording and alerting rules) parses and evaluates on the real Prometheus,
after it scraped a running gateway that saw traffic of every kind.

Skipped when the Debian package ``prometheus`` is missing, unless ``CI`` is set.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from promgate.testing.monitoring import (
    PROMETHEUS,
    MonitoredGateway,
    PrometheusProcess,
    executable,
    wait_for,
)

MONITORING = Path(__file__).resolve().parent.parent / "etc" / "monitoring"
DASHBOARD = MONITORING / "promgate-dashboard.json"
RULE_FILES = [MONITORING / "promgate-rules.yaml", MONITORING / "promgate-alerts.yaml"]
#: What Grafana would put in place of its own variables.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
#: A dashboard variable with "All" selected becomes this regular expression.
ALL = ".*"


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expression) of every panel target and every query variable."""
    found = []
    for panel in _walk(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            found.append((f"panel {panel.get('title')!r} {target['refId']}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", text.strip(), re.S)
        if match is None:
            raise AssertionError(f"variable {variable['name']}: not label_values(): {text}")
        found.append((f"variable {variable['name']}", match.group(1)))
    return found


def rule_expressions() -> list[tuple[str, str]]:
    found = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                name = rule.get("record") or rule["alert"]
                found.append((f"{path.name} {name}", rule["expr"]))
    return found


def concrete(expr: str, variables: set[str]) -> str:
    """``expr`` with Grafana's and the dashboard's variables replaced by values."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in GRAFANA_VARIABLES:
            return GRAFANA_VARIABLES[name]
        if name in variables:
            return ALL
        raise AssertionError(f"unknown variable ${name} in {expr}")

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


class DashboardStructureTests(SynchronousTestCase):
    """The dashboard is Grafana JSON with what an operator looks for."""

    def test_structure(self) -> None:
        """Unique panel ids; a data source variable; every target's data source is it;
        dashboard variables used only as regular expressions (``=~``)."""
        dashboard = json.loads(DASHBOARD.read_text())
        ids = [p["id"] for p in _walk(dashboard["panels"]) if "gridPos" in p]
        self.assertEqual(len(ids), len(set(ids)))
        names = {v["name"] for v in dashboard["templating"]["list"]}
        self.assertLessEqual({"datasource", "job", "instance", "route", "identity"}, names)
        for where, expr in dashboard_expressions(dashboard):
            for name in re.findall(r"\$(?!__)(\w+)", expr):
                self.assertIn(f'=~"${name}"', expr, f"{where}: ${name} outside =~")
        rows = {p["title"] for p in dashboard["panels"] if p["type"] == "row"}
        self.assertLessEqual(
            {"Traffic", "Latency", "Denials", "Connections and tunnels", "Discovery", "Audit"},
            rows,
        )


class QueriesOnPrometheusTests(SynchronousTestCase):
    """The real Prometheus evaluates every shipped expression without error."""

    def setUp(self) -> None:
        if not executable(PROMETHEUS):
            message = f"not installed: {PROMETHEUS} (Debian package prometheus)"
            if os.environ.get("CI"):
                self.fail(f"{message}; CI is set, so the e2e prerequisites must be present")
            raise SkipTest(message)
        base = Path(self.mktemp()).absolute()
        self.world = MonitoredGateway(base / "world")
        self.addCleanup(self.world.stop)
        self.world.start()
        self.world.traffic()
        self.prometheus = PrometheusProcess(base / "prometheus", [self.world.admin], RULE_FILES)
        self.addCleanup(self.prometheus.stop)
        self.prometheus.start()

    def test_every_expression_evaluates(self) -> None:
        """Panels, variables and rules all evaluate; the traffic panels have data."""
        prometheus = self.prometheus
        try:
            prometheus.wait_for_samples("promgate_requests_total")
            # A rate needs two scrapes in its window.
            prometheus.wait_for_samples("rate(promgate_requests_total[1m])")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{prometheus.log()}\n{self.world.gate.log()}") from e
        dashboard = json.loads(DASHBOARD.read_text())
        variables = {v["name"] for v in dashboard["templating"]["list"]}
        expressions = dashboard_expressions(dashboard) + rule_expressions()
        failures, results = [], {}
        for where, expr in expressions:
            status, data = prometheus.query(concrete(expr, variables))
            if status != "success":
                failures.append(f"{where}: {data}\n    {expr}")
            else:
                results[where] = data["result"]
        self.assertEqual(failures, [], "\n".join(failures))
        by_identity = results["panel 'Requests per identity' A"]
        self.assertEqual(
            {r["metric"]["identity"] for r in by_identity}, {"prometheus", "unrecognised"}
        )
        self.assertTrue(results["panel 'Requests per route' A"])
        self.assertTrue(results["panel 'Denied by reason' A"])
        self.assertTrue(results["panel 'Ready' A"])

    def test_rules_loaded(self) -> None:
        """Prometheus loaded both rule files, and their groups evaluate without error."""
        status, data = self.prometheus.api("rules")
        self.assertEqual(status, "success", data)
        groups = {g["name"]: g for g in data["groups"]}
        self.assertLessEqual(
            {"promgate.rules", "promgate.identity.rules", "promgate.alerts"}, set(groups)
        )

        def evaluated() -> bool | None:
            _, now = self.prometheus.api("rules")
            rules = [r for g in now["groups"] for r in g["rules"]]
            if all(r.get("lastEvaluation", "").startswith("0001") for r in rules):
                return None
            return True

        wait_for("the rules to be evaluated", evaluated, 30.0, every=0.25)
        _, now = self.prometheus.api("rules")
        errors = [
            f"{r['name']}: {r['lastError']}"
            for g in now["groups"]
            for r in g["rules"]
            if r.get("lastError")
        ]
        self.assertEqual(errors, [])
