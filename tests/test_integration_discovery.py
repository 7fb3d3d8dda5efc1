"""Integration: a real ``twistd promgate`` following file_sd files as they change.

The test adds, changes, corrupts and removes files while the gateway runs and watches
``/sd`` and ``/scrape`` follow, polling the gateway's own answers (bounded), never
sleeping a guessed time.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from promgate.testing import FakeExporter, GatewayProcess, TestPKI, https_get
from promgate.testing.integration import (
    IDENTITIES,
    cleanups,
    eventually,
    metric_samples,
    q,
    scrape_path,
    tls_section,
    workdir,
)


class FileSDGatewayTests(SynchronousTestCase):
    """/sd and /scrape follow file_sd files under a running gateway."""

    def setUp(self) -> None:
        self.dir = workdir("file-sd")
        self.pki = TestPKI(self.dir / "pki")
        self.targets = self.dir / "targets"
        self.targets.mkdir()
        self.one = FakeExporter({"/metrics": b"one 1\n"})
        self.two = FakeExporter({"/metrics": b"two 2\n"})
        for exporter in (self.one, self.two):
            self.addCleanup(exporter.stop)
        self.write("a.json", [{"targets": [self.one.address], "labels": {"job": "node"}}])
        config = (
            tls_section(self.pki)
            + 'admin: {endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + 'listeners:\n  - {name: scrape, endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + IDENTITIES
            + f"""
templates:
  exporter: {{allow: ["role:scraper"], labels: {{via: gate}}}}
routes:
  node:
    template: exporter
    targets:
      file_sd: {{files: [{q(self.targets / "*.json")}, {q(self.targets / "*.yml")}],
                poll_interval: 100ms}}
      match: {{job: "node|db"}}
audit: {{path: {q(self.dir / "audit.jsonl")}, key_file: {q(self.pki.audit_key)}}}
"""
        )
        self.gateway = GatewayProcess(self.dir / "gateway", config)
        cleanups.append(self.gateway.stop)
        self.addCleanup(self.gateway.stop)
        self.gateway.start()
        self.prometheus = self.pki.client_context("prometheus")

    def write(self, name: str, groups: Any) -> None:
        path = self.targets / name
        tmp = path.with_name(f".{name}.tmp")  # never glob-matched half written
        text = json.dumps(groups) if name.endswith(".json") else _yaml(groups)
        tmp.write_text(text)
        tmp.replace(path)

    def sd(self) -> dict[str, dict[str, str]]:
        resp = https_get(self.gateway.address("scrape"), "/sd", self.prometheus)
        assert resp.status == 200, resp
        return {g["labels"]["__param_target"]: g["labels"] for g in json.loads(resp.body)}

    def scrape(self, target: str) -> int:
        path = scrape_path("node", target)
        return https_get(self.gateway.address("scrape"), path, self.prometheus).status

    def until_sd(self, expected: set[str]) -> dict[str, dict[str, str]]:
        def probe() -> dict[str, dict[str, str]] | None:
            found = self.sd()
            return found if set(found) == expected else None

        return eventually(probe, f"/sd to list exactly {sorted(expected)}")

    def failures(self) -> float:
        text = https_get(self.gateway.address("admin"), "/metrics", None).body.decode()
        return sum(v for _, v in metric_samples(text, "promgate_discovery_failures_total") if v)

    def test_follows_files(self) -> None:
        one, two = self.one.address, self.two.address
        labels = self.until_sd({one})[one]
        self.assertEqual((labels["job"], labels["via"]), ("node", "gate"))
        self.assertNotIn("__meta_filepath", labels)
        self.assertEqual(self.scrape(one), 200)
        self.assertEqual(self.scrape(two), 404)

        # Added: a YAML file; the selector leaves out the job it does not match.
        self.write(
            "b.yml",
            [
                {"targets": [two], "labels": {"job": "db"}},
                {"targets": ["127.0.0.1:1"], "labels": {"job": "other"}},
            ],
        )
        self.until_sd({one, two})
        self.assertEqual(self.scrape(two), 200)
        self.assertEqual(self.scrape("127.0.0.1:1"), 404)

        # Changed: a.json no longer names the first exporter: refused from the next request.
        self.write("a.json", [{"targets": ["127.0.0.1:2"], "labels": {"job": "node"}}])
        self.until_sd({"127.0.0.1:2", two})
        self.assertEqual(self.scrape(one), 404)

        # Corrupted: its previous contents stay, and the failure is counted.
        (self.targets / "b.yml").write_text("- targets: [unclosed\n")
        eventually(lambda: self.failures() or None, "a discovery failure to be counted")
        self.assertEqual(set(self.sd()), {"127.0.0.1:2", two})
        self.assertEqual(self.scrape(two), 200)

        # Removed: its targets go with it.
        (self.targets / "b.yml").unlink()
        self.until_sd({"127.0.0.1:2"})
        self.assertEqual(self.scrape(two), 404)


def _yaml(groups: Any) -> str:
    import yaml

    text: str = yaml.safe_dump(groups)
    return text
