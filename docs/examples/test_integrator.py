"""An integrator's test of a promgate setup, in memory: copy it into your project.

It writes a small configuration beside a throw-away PKI (``promgate.testing.TestPKI``),
checks what the configuration's policy allows, and scrapes once through the whole gateway
assembled from that configuration, with real TLS and a client certificate, against a
fake exporter. Nothing opens a socket: the test fails if anything tries.

Run it with trial, from any directory::

    python -m twisted.trial test_integrator.py

To test your own configuration, point ``MemoryGateway.from_config_file`` at it (and
``TestPKI`` certificates at the paths it names, or a ``trust_root`` for your own CA).
"""

from __future__ import annotations

import socket
import textwrap
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from promgate.testing import MemoryGateway, TestPKI

CONFIG = """\
tls: {certificate: pki/gate.pem, key: pki/gate-key.pem, client_ca: pki/ca.pem}
admin: {endpoint: "tcp:9099:interface=127.0.0.1"}
listeners:
  - {name: scrape, protocol: http, endpoint: "tcp:9443"}
identities:
  prometheus: {cert: {uri: "spiffe://promgate.local/prometheus"}, roles: [scraper]}
  intruder: {cert: {cn: intruder}}
routes:
  node:
    allow: ["role:scraper"]
    targets: {static: ["10.0.0.5:9100"]}
audit: {path: audit.jsonl, key_file: pki/audit.key}
"""

NODE_METRICS = b"# TYPE node_load1 gauge\nnode_load1 0.25\n"
SCRAPE = "/scrape?route=node&target=10.0.0.5%3A9100"


class IntegratorTests(SynchronousTestCase):
    """The configuration allows what it should, and a scrape goes through."""

    def setUp(self) -> None:
        self.forbid_sockets()
        root = Path(self.mktemp()).resolve()
        self.pki = TestPKI(root / "pki")  # CA, gateway certificate, audit key
        config_file = root / "promgate.yaml"
        config_file.write_text(textwrap.dedent(CONFIG))
        self.gateway = MemoryGateway.from_config_file(config_file)
        self.addCleanup(self.gateway.stop)

    def forbid_sockets(self) -> None:
        """Fail loudly if anything opens a socket, or leaves work on the global reactor."""

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("this test must not open a socket")

        for name in ("socket", "socketpair", "create_connection"):
            self.patch(socket, name, refuse)
        from twisted.internet import reactor  # installed by trial; only looked at here

        before = (
            set(reactor.getDelayedCalls()),  # type: ignore[attr-defined]
            set(reactor.getReaders()),  # type: ignore[attr-defined]
            set(reactor.getWriters()),  # type: ignore[attr-defined]
        )

        def untouched() -> None:
            after = (
                set(reactor.getDelayedCalls()),  # type: ignore[attr-defined]
                set(reactor.getReaders()),  # type: ignore[attr-defined]
                set(reactor.getWriters()),  # type: ignore[attr-defined]
            )
            if after != before:
                raise AssertionError("the test left work on the global reactor")

        self.addCleanup(untouched)

    def test_policy(self) -> None:
        """Prometheus may scrape the node; nobody else may, and no other target."""
        self.assertTrue(self.gateway.explain("prometheus", SCRAPE).decision.allowed)
        denied = self.gateway.explain("intruder", SCRAPE)
        self.assertEqual((denied.decision.allowed, denied.status), (False, 403))
        elsewhere = self.gateway.explain("prometheus", "/scrape?route=node&target=10.0.0.6%3A9100")
        self.assertEqual(elsewhere.status, 404)

    def test_scrape(self) -> None:
        """One scrape through the gateway, with Prometheus's client certificate."""
        exporter = self.gateway.upstream("10.0.0.5:9100", body=NODE_METRICS)
        response = self.gateway.get(SCRAPE, identity=self.pki.client("prometheus"))
        self.assertEqual((response.status, response.body), (200, NODE_METRICS))
        self.assertEqual([r.path for r in exporter.requests], ["/metrics"])
        (record,) = self.gateway.audit_records("request")
        self.assertEqual((record.identity, record.decision), ("prometheus", "allow"))
        self.assertIn("promgate_requests_total", self.gateway.metrics_text())
        self.successResultOf(self.gateway.stop())
        self.assertEqual(self.gateway.audit_records()[-1].event, "stop")
