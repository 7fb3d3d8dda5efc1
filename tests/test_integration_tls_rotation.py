"""Integration: the real ``twistd promgate`` on 127.0.0.1 has its certificate rotated ten
times while a keep-alive connection and new connections scrape without pause; not one
scrape fails, each new handshake soon sees the new certificate, the keep-alive connection
keeps the one it was made with, and the gateway's metrics count ten reloads.

Every wait is bounded: a rotation that is not served within ROTATION_TIMEOUT fails the
test; nothing waits on a fixed sleep.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from twisted.trial.unittest import SynchronousTestCase

from promgate.testing import FakeExporter, GatewayProcess, TestPKI
from promgate.testing.clients import https_connection, request
from promgate.testing.integration import metric_samples, q, scrape_path, workdir

ROTATIONS = 10
#: The watch looks every 2s and loads a change once it has stayed put for one look.
ROTATION_TIMEOUT = 30.0
BODY = b"# TYPE up gauge\nup 1\n"


def _fingerprint(der: bytes | None) -> str:
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` beside ``path``, then move it into place (as operators should)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class RotationUnderLoadTests(SynchronousTestCase):
    """Ten rotations under continuous keep-alive and new-connection scrapes."""

    def setUp(self) -> None:
        self.dir = workdir("rotation")
        self.pki = TestPKI(self.dir / "pki")
        self.pki.client("prometheus")
        self.exporter = FakeExporter({"/metrics": BODY})
        self.addCleanup(self.exporter.stop)
        config = (
            f"tls: {{certificate: {q(self.pki.gate_cert)}, key: {q(self.pki.gate_key)}, "
            f"client_ca: {q(self.pki.ca_cert)}}}\n"
            'admin: {endpoint: "tcp:0:interface=127.0.0.1"}\n'
            "listeners:\n"
            '  - {name: scrape, protocol: http, endpoint: "tcp:0:interface=127.0.0.1"}\n'
            "identities:\n"
            '  prometheus: {cert: {uri: "spiffe://promgate.local/prometheus"}}\n'
            "routes:\n"
            f"  node: {{allow: [prometheus], targets: {{static: [{q(self.exporter.address)}]}}}}\n"
            f"audit: {{path: {q(self.dir / 'audit.jsonl')}, key_file: {q(self.pki.audit_key)}}}\n"
        )
        self.gateway = GatewayProcess(self.dir, config).start()
        self.addCleanup(self.gateway.stop)
        self.context = self.pki.client_context("prometheus")
        self.path = scrape_path("node", self.exporter.address)
        self.failures: list[str] = []
        self.scrapes = 0

    def scrape(self, conn: http.client.HTTPConnection) -> None:
        self.scrapes += 1
        try:
            response = request(conn, self.path)
        except (OSError, http.client.HTTPException) as e:
            self.failures.append(f"scrape {self.scrapes}: {e!r}")
            return
        if response.status != 200 or response.body != BODY:
            self.failures.append(f"scrape {self.scrapes}: {response.status}")

    def new_connection_scrape(self) -> str | None:
        """One scrape on a new connection; the fingerprint of the certificate it saw."""
        conn = https_connection(self.gateway.address("scrape"), self.context, timeout=10)
        try:
            self.scrape(conn)
            sock = conn.sock
            return _fingerprint(sock.getpeercert(binary_form=True)) if sock else None
        finally:
            conn.close()

    def test_ten_rotations_no_failed_scrape(self) -> None:
        keepalive = https_connection(self.gateway.address("scrape"), self.context, timeout=10)
        self.addCleanup(keepalive.close)
        self.scrape(keepalive)
        assert keepalive.sock is not None
        first = _fingerprint(keepalive.sock.getpeercert(binary_form=True))
        served = [first]
        for _ in range(ROTATIONS):
            issued = self.pki.ca.issue_server(["localhost"], ["127.0.0.1", "::1"])
            _replace(self.pki.gate_key, issued.key_pem)
            _replace(self.pki.gate_cert, issued.cert_pem)
            expected = x509.load_pem_x509_certificate(issued.cert_pem).fingerprint(hashes.SHA256())
            deadline = time.monotonic() + ROTATION_TIMEOUT
            while True:
                self.scrape(keepalive)
                seen = self.new_connection_scrape()
                if seen == expected.hex():
                    break
                self.assertIn(seen, served)  # the previous certificate, until the swap
                self.assertLess(time.monotonic(), deadline, "rotation not served in time")
            served.append(expected.hex())
        self.scrape(keepalive)
        self.assertEqual(_fingerprint(keepalive.sock.getpeercert(binary_form=True)), first)
        self.assertEqual(self.failures, [])
        self.assertGreater(self.scrapes, 2 * ROTATIONS)
        metrics = self.gateway.get("admin", "/metrics", None).body.decode()
        self.assertEqual(
            metric_samples(metrics, "promgate_tls_reloads_total"),
            [({"listener": "scrape"}, float(ROTATIONS))],
        )
        self.assertEqual(
            metric_samples(metrics, "promgate_tls_reload_failures_total"),
            [({"listener": "scrape"}, 0.0)],
        )
        (expiry,) = metric_samples(metrics, "promgate_tls_certificate_expiry_timestamp_seconds")
        leaf = x509.load_pem_x509_certificate(self.pki.gate_cert.read_bytes())
        self.assertEqual(expiry[1], leaf.not_valid_after_utc.timestamp())
