"""Tests for the http_sd documents ``GET /sd`` serves: shape, label precedence, stable order."""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from promgate.config.model import Route, Target
from promgate.sd import render_http_sd

ADVERTISE = "gate.example.org:9443"


def _render(routes: list[Route], scheme: str = "https") -> Any:
    return json.loads(render_http_sd(routes, ADVERTISE, scheme))


class RenderHTTPSDTests(SynchronousTestCase):
    """render_http_sd rewrites every target to go through the gateway."""

    def test_empty(self) -> None:
        """No routes (or routes without targets) render as an empty JSON list."""
        self.assertEqual(render_http_sd([], ADVERTISE, "https"), b"[]")
        self.assertEqual(render_http_sd([Route("r", ())], ADVERTISE, "https"), b"[]")

    def test_shape(self) -> None:
        """One group per target, addressed to the gateway, with the gateway's own labels."""
        route = Route("node", (Target("10.0.0.5:9100"),))
        self.assertEqual(
            _render([route]),
            [
                {
                    "targets": [ADVERTISE],
                    "labels": {
                        "instance": "10.0.0.5:9100",
                        "route": "node",
                        "__scheme__": "https",
                        "__metrics_path__": "/scrape",
                        "__param_route": "node",
                        "__param_target": "10.0.0.5:9100",
                    },
                }
            ],
        )

    def test_scheme(self) -> None:
        """A plain-text listener advertises __scheme__ http."""
        route = Route("node", (Target("10.0.0.5:9100"),))
        self.assertEqual(_render([route], "http")[0]["labels"]["__scheme__"], "http")

    def test_is_json_bytes(self) -> None:
        """The document is compact UTF-8 JSON bytes."""
        route = Route("node", (Target("h:1", {"x": "é"}),))
        body = render_http_sd([route], ADVERTISE, "https")
        self.assertIsInstance(body, bytes)
        self.assertNotIn(b"\n", body)
        self.assertEqual(json.loads(body.decode("utf-8"))[0]["labels"]["x"], "é")

    def test_route_and_target_labels(self) -> None:
        """Route labels apply to every target; a target's own labels win over the route's."""
        route = Route(
            "node",
            (Target("a:1", {"team": "b", "az": "1"}), Target("c:2")),
            labels={"team": "a", "env": "prod"},
        )
        groups = _render([route])
        self.assertEqual(
            {k: v for k, v in groups[0]["labels"].items() if not k.startswith("__")},
            {"instance": "a:1", "team": "b", "az": "1", "env": "prod", "route": "node"},
        )
        self.assertEqual(groups[1]["labels"]["team"], "a")

    def test_instance_overridable(self) -> None:
        """An operator may override ``instance`` with route or target labels."""
        route = Route("node", (Target("a:1", {"instance": "node-a"}),))
        self.assertEqual(_render([route])[0]["labels"]["instance"], "node-a")
        route = Route("node", (Target("a:1"),), labels={"instance": "shared"})
        self.assertEqual(_render([route])[0]["labels"]["instance"], "shared")

    def test_reserved_labels_not_overridable(self) -> None:
        """Labels cannot redirect the scrape: the gateway's __ labels always win."""
        evil = {
            "__scheme__": "http",
            "__metrics_path__": "/elsewhere",
            "__param_route": "other",
            "__param_target": "evil:1",
        }
        route = Route("node", (Target("a:1", dict(evil)),), labels=dict(evil))
        labels = _render([route], "https")[0]["labels"]
        self.assertEqual(labels["__scheme__"], "https")
        self.assertEqual(labels["__metrics_path__"], "/scrape")
        self.assertEqual(labels["__param_route"], "node")
        self.assertEqual(labels["__param_target"], "a:1")

    def test_sorted_and_stable(self) -> None:
        """Output is sorted by route, targets in order, keys sorted: same input, same bytes."""
        a = Route("alpha", (Target("z:1"), Target("a:1")))
        b = Route("beta", (Target("m:1"),))
        first = render_http_sd([b, a], ADVERTISE, "https")
        self.assertEqual(first, render_http_sd([a, b], ADVERTISE, "https"))
        groups = json.loads(first)
        self.assertEqual(
            [(g["labels"]["__param_route"], g["labels"]["__param_target"]) for g in groups],
            [("alpha", "z:1"), ("alpha", "a:1"), ("beta", "m:1")],
        )
        self.assertEqual(first, json.dumps(groups, sort_keys=True, separators=(",", ":")).encode())


class RouteLabelTests(SynchronousTestCase):
    """Every group's label set is unique per (route, target), so Prometheus keeps one
    series per route even where routes share a target."""

    def test_shared_target_two_label_sets(self) -> None:
        """Two routes with the same target: two groups whose visible labels differ."""
        routes = [Route("node", (Target("h:9100"),)), Route("node-tls", (Target("h:9100"),))]
        groups = _render(routes)
        visible = [
            tuple(sorted((k, v) for k, v in g["labels"].items() if not k.startswith("__")))
            for g in groups
        ]
        self.assertEqual(len(set(visible)), 2, visible)
        self.assertEqual([g["labels"]["route"] for g in groups], ["node", "node-tls"])

    def test_label_name_configurable(self) -> None:
        """The listener may name the label otherwise."""
        route = Route("node", (Target("h:9100"),))
        body = render_http_sd([route], ADVERTISE, "https", route_label="gate_route")
        labels = json.loads(body)[0]["labels"]
        self.assertEqual(labels["gate_route"], "node")
        self.assertNotIn("route", labels)

    def test_label_off(self) -> None:
        """``route_label=None`` adds no label (for operators who relabel themselves)."""
        route = Route("node", (Target("h:9100"),))
        body = render_http_sd([route], ADVERTISE, "https", route_label=None)
        self.assertNotIn("route", json.loads(body)[0]["labels"])

    def test_gateway_label_wins(self) -> None:
        """A discovered target's own ``route`` label cannot make two groups collide."""
        route = Route("node", (Target("h:9100", {"route": "other"}),))
        self.assertEqual(_render([route])[0]["labels"]["route"], "node")
