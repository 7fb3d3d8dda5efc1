"""Live reload of the real ``twistd promgate``: SIGHUP with an invalid configuration keeps
the running one (``promgate_config_last_reload_successful`` 1 -> 0), then ``POST
/-/reload`` with a valid one that adds a listener and removes an identity's access applies
it (0 -> 1), while scrapes go on."""

from __future__ import annotations

import http.client
import signal
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from promgate.testing import FakeExporter, GatewayProcess, TestPKI, https_get
from promgate.testing.integration import (
    closed_port,
    eventually,
    metric_samples,
    q,
    scrape_path,
    workdir,
)


def config(pki: TestPKI, audit_log: Path, upstream: str, *, extra: int | None = None) -> str:
    listeners = '  - {name: scrape, endpoint: "tcp:0:interface=127.0.0.1"}\n'
    if extra is not None:
        listeners += f'  - {{name: extra, endpoint: "tcp:{extra}:interface=127.0.0.1"}}\n'
    return f"""
tls: {{certificate: {q(pki.gate_cert)}, key: {q(pki.gate_key)}, client_ca: {q(pki.ca_cert)}}}
admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
listeners:
{listeners}identities:
  prometheus: {{cert: {{uri: "spiffe://promgate.local/prometheus"}}, roles: [scraper]}}
  ops: {{cert: {{cn: ops}}, roles: [scraper]}}
routes:
  node: {{allow: ["role:scraper"], paths: [/metrics], targets: {{static: ["{upstream}"]}}}}
audit: {{path: {q(audit_log)}, key_file: {q(pki.audit_key)}}}
"""


class ReloadProcessTests(SynchronousTestCase):
    def test_sighup_invalid_then_post_valid(self) -> None:
        directory = workdir("reload")
        pki = TestPKI(directory / "pki")
        exporter = FakeExporter({"/metrics": b"up 1\n"})
        self.addCleanup(exporter.stop)
        audit_log = directory / "audit.jsonl"
        gateway = GatewayProcess(directory / "gw", config(pki, audit_log, exporter.address))
        self.addCleanup(gateway.stop)
        gateway.start()
        prometheus = pki.client_context("prometheus")
        path = scrape_path("node", exporter.address)

        def reload_metric() -> float:
            text = https_get(gateway.address("admin"), "/metrics", None).body.decode()
            ((_, value),) = metric_samples(text, "promgate_config_last_reload_successful")
            return value

        self.assertEqual(gateway.get("scrape", path, prometheus).status, 200)
        self.assertEqual(reload_metric(), 1.0)

        # SIGHUP with a broken file: refused, audited, the old configuration serves on.
        gateway.config_path.write_text("listeners: [\n")
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGHUP)
        refused = gateway.wait_for_audit_record(audit_log, lambda r: r["event"] == "reload")
        self.assertEqual((refused["decision"], refused["reason"]), ("deny", "config_invalid"))
        self.assertIn(str(gateway.config_path), refused["detail"])
        self.assertEqual(reload_metric(), 0.0)
        self.assertEqual(gateway.get("scrape", path, prometheus).status, 200)

        # POST /-/reload with a valid file: a new listener, ops loses the route.
        port = closed_port()
        valid = config(pki, audit_log, exporter.address, extra=port)
        gateway.config_path.write_text(
            valid.replace("roles: [scraper]}\nroutes", "roles: [x]}\nroutes")
        )
        host, _, admin_port = gateway.address("admin").rpartition(":")
        conn = http.client.HTTPConnection(host, int(admin_port), timeout=10)
        conn.request("POST", "/-/reload")
        answer = conn.getresponse()
        body = answer.read().decode()
        self.assertEqual(answer.status, 200, body)
        self.assertIn("+extra", body)
        self.assertEqual(reload_metric(), 1.0)
        extra = https_get(f"127.0.0.1:{port}", path, prometheus)
        self.assertEqual(extra.status, 200)
        self.assertEqual(gateway.get("scrape", path, pki.client_context("ops")).status, 403)
        eventually(
            lambda: (
                [r for r in gateway.audit_records(audit_log) if r["event"] == "reload"][-1]
                if len([r for r in gateway.audit_records(audit_log) if r["event"] == "reload"]) >= 2
                else None
            ),
            "the applied reload to be audited",
        )
