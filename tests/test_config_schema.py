"""docs/promgate.schema.json, the JSON Schema of the configuration file: it is a valid
schema, every shipped example validates against it, it refuses what the loader refuses at
the level of keys and simple values, and it names exactly the keys the loader reads."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from promgate.config import (
    audit_section,
    identities,
    identity_providers,
    routes,
    sections,
    shared_limits,
    targets,
)
from promgate.config.model import JWT_ALGORITHMS
from promgate.config.tcp_listeners import TCP_KEYS

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "docs" / "promgate.schema.json"
#: Files in etc/ that are not configurations.
NOT_CONFIGS = {"policy-tests.yaml"}
MODELINE = "# yaml-language-server: $schema="


def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return loaded


def shipped_examples() -> list[tuple[str, Any]]:
    """(where, document) of every shipped configuration: etc/*.yaml and its drop-ins, and
    each YAML block in the docs whose keys are all top-level configuration sections."""
    top = set(schema()["properties"])
    found: list[tuple[str, Any]] = []
    etc = ROOT / "etc"
    for path in sorted([*etc.glob("*.yaml"), *(etc / "promgate.d").glob("*.yaml")]):
        if path.name not in NOT_CONFIGS:
            found.append((str(path.relative_to(ROOT)), yaml.safe_load(path.read_text())))
    for path in sorted([*(ROOT / "docs").glob("*.md"), ROOT / "README.md"]):
        text = path.read_text()
        for block in re.finditer(r"```yaml\n(.*?)```", text, re.S):
            try:
                document = yaml.safe_load(block.group(1))
            except yaml.YAMLError:
                continue
            if isinstance(document, dict) and document and set(document) <= top:
                line = text[: block.start()].count("\n") + 1
                found.append((f"{path.relative_to(ROOT)}:{line}", document))
    return found


class ValidationTests(SynchronousTestCase):
    """The schema, run by the ``jsonschema`` package (a test extra)."""

    def setUp(self) -> None:
        try:
            import jsonschema
        except ImportError:
            message = "the jsonschema package (test extra) is not installed"
            if os.environ.get("CI"):
                self.fail(f"{message}; CI installs the test extras")
            raise SkipTest(message) from None
        jsonschema.Draft202012Validator.check_schema(schema())
        self.validator = jsonschema.Draft202012Validator(schema())

    def errors(self, document: Any) -> list[str]:
        return [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in self.validator.iter_errors(document)
        ]

    def test_shipped_examples(self) -> None:
        """etc/promgate.yaml, its drop-ins and the docs' examples validate; among them the
        full example of docs/configuration.md."""
        examples = shipped_examples()
        full = [w for w, d in examples if {"listeners", "audit", "routes"} <= set(d)]
        self.assertIn("etc/promgate.yaml", [w for w, _ in examples])
        self.assertTrue([w for w in full if w.startswith("docs/configuration.md")], full)
        problems = {where: self.errors(doc) for where, doc in examples}
        self.assertEqual({w: p for w, p in problems.items() if p}, {})

    def test_refused(self) -> None:
        """Unknown keys, malformed durations, unknown protocols and inline secrets."""
        good: dict[str, Any] = yaml.safe_load((ROOT / "etc" / "promgate.yaml").read_text())
        route = {"targets": {"static": ["10.0.0.5:9100"]}}
        for bad in (
            {"listner": []},
            {"listeners": [{"name": "a", "endpoint": "tcp:1", "protocol": "udp"}]},
            {"listeners": [{"name": "a", "endpoint": "ssl:1"}]},
            {"routes": {"r": {**route, "timeout": "30"}}},
            {"routes": {"r": {**route, "metrics_pth": "/metrics"}}},
            {"routes": {"r": {**route, "basic_auth": {"username": "u", "password": "p"}}}},
            {"routes": {"r": {"scheme": "http"}}},
            {"audit": {"path": "a.jsonl"}},
            {"identities": {"x": {"bearer_sha256": "abc"}}},
        ):
            with self.subTest(bad=bad):
                self.assertTrue(self.errors({**good, **bad}), bad)


class KeyTests(SynchronousTestCase):
    """The schema and the loader agree on every section's keys (no jsonschema needed)."""

    def test_keys(self) -> None:
        props = schema()["properties"]

        def keys(node: dict[str, Any]) -> set[str]:
            return set(node["properties"])

        route_schema = props["routes"]["additionalProperties"]
        listener = props["listeners"]["items"]
        base_listener = {"name", "protocol", "endpoint", "advertise", "sd", "tls", "tunnel_idle"}
        self.assertEqual(set(props), sections._TOP_KEYS)
        self.assertEqual(keys(route_schema), routes._ROUTE_KEYS | {"template", "targets"})
        self.assertEqual(keys(props["templates"]["additionalProperties"]), routes._ROUTE_KEYS)
        self.assertEqual(
            keys(props["identities"]["additionalProperties"]), set(identities._IDENTITY_KEYS)
        )
        self.assertEqual(keys(props["audit"]), set(audit_section._AUDIT_KEYS))
        self.assertEqual(keys(props["shared_limits"]), set(shared_limits._KEYS))
        self.assertEqual(
            keys(props["shared_limits"]["properties"]["redis"]), set(shared_limits._REDIS_KEYS)
        )
        self.assertEqual(
            keys(props["shared_limits"]["properties"]["redis"]["properties"]["sentinel"]),
            set(shared_limits._SENTINEL_KEYS),
        )
        self.assertEqual(
            keys(props["identity_providers"]["additionalProperties"]),
            set(identity_providers._KEYS),
        )
        self.assertEqual(
            set(
                props["identity_providers"]["additionalProperties"]["properties"]["algorithms"][
                    "items"
                ]["enum"]
            ),
            set(JWT_ALGORITHMS),
        )
        self.assertEqual(keys(listener), base_listener | set(TCP_KEYS))
        self.assertEqual(
            keys(route_schema["properties"]["targets"]),
            set(targets._PROVIDERS) | set(targets._SELECTOR_KEYS),
        )

    def test_modeline(self) -> None:
        """etc/promgate.yaml names the schema for editors (yaml-language-server), by a
        path that exists."""
        first = (ROOT / "etc" / "promgate.yaml").read_text().splitlines()[0]
        self.assertTrue(first.startswith(MODELINE), first)
        target = (ROOT / "etc" / first[len(MODELINE) :].strip()).resolve()
        self.assertEqual(target, SCHEMA_PATH)
