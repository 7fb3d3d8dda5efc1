"""Integration: floods that cost the attacker nothing, against the real ``twistd promgate``.

Two bounded floods from 127.0.0.1, each while a legitimate client keeps scraping:
certificate-less TLS handshakes (the audit log must stay O(1) records per interval while
the metric counts every failure), and wrong basic-auth passwords on connections reset at
once (the bcrypt work must stay bounded and the gateway idle soon after). The legitimate
client's latencies are measured and written to the test log; no assertion is on time.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import socket
import ssl
import statistics
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from promgate.audit import load_key, verify_files
from promgate.testing import FakeExporter, GatewayProcess, TestPKI

#: SO_LINGER on, zero timeout: close() sends a TCP reset.
_RESET = struct.pack("ii", 1, 0)
HANDSHAKE_FLOOD = 300
PASSWORD_FLOOD = 400


def _q(value: Any) -> str:
    return json.dumps(str(value))


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _metric(gateway: GatewayProcess, name: str) -> float:
    """The sum over every sample called ``name`` on the gateway's /metrics."""
    conn = http.client.HTTPConnection(*_split(gateway.address("admin")), timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def _eventually(probe: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"not after {timeout}s: {what}")
        time.sleep(0.05)


class Legit(threading.Thread):
    """A legitimate client scraping in a loop (bounded) until told to stop; its latencies."""

    def __init__(self, once: Callable[[], int], limit: int = 20000) -> None:
        super().__init__(daemon=True)
        self.once = once
        self.limit = limit
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.statuses: list[int] = []

    def run(self) -> None:
        for _ in range(self.limit):
            if self.stop.is_set():
                return
            began = time.monotonic()
            self.statuses.append(self.once())
            self.latencies.append(time.monotonic() - began)

    def finish(self) -> None:
        self.stop.set()
        self.join(60)

    def summary(self) -> str:
        if not self.latencies:
            return "no requests"
        ms = sorted(x * 1000 for x in self.latencies)
        p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
        return (
            f"{len(ms)} requests, median {statistics.median(ms):.1f} ms, "
            f"p95 {p95:.1f} ms, max {ms[-1]:.1f} ms"
        )


def _report(line: str) -> None:
    """Figures go to the test log (and standard output), never into an assertion."""
    print(line)
    with open(os.path.join(os.getcwd(), "floods-figures.txt"), "a") as f:
        f.write(line + "\n")


class FloodTestCase(SynchronousTestCase):
    """A gateway with a mutual-TLS listener and a plain-text one, a bcrypt user."""

    aggregate_interval = "1h"

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="floods-", dir=os.getcwd()))
        self.pki = TestPKI(self.dir / "pki")
        self.exporter = FakeExporter({"/metrics": b"up 1\n"})
        self.addCleanup(self.exporter.stop)
        # Cost 10, the usual one: each wrong password costs the gateway a real bcrypt.
        hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=10)).decode()
        viewer = bcrypt.hashpw(b"viewer-pass", bcrypt.gensalt(rounds=10)).decode()
        (self.dir / "web-config.yml").write_text(
            f"basic_auth_users:\n  ops: {hashed}\n  viewer: {viewer}\n"
        )
        self.audit_log = self.dir / "audit.jsonl"
        pki = self.pki
        config = f"""\
tls: {{certificate: {_q(pki.gate_cert)}, key: {_q(pki.gate_key)}, client_ca: {_q(pki.ca_cert)}}}
admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
listeners:
  - {{name: scrape, endpoint: "tcp:0:interface=127.0.0.1"}}
  - {{name: plain, endpoint: "tcp:0:interface=127.0.0.1", tls: false}}
identities:
  prometheus: {{cert: {{uri: "spiffe://promgate.local/prometheus"}}, roles: [scraper]}}
web_configs:
  - {{path: {_q(self.dir / "web-config.yml")}, roles: [scraper]}}
routes:
  node: {{allow: ["role:scraper"], targets: {{static: ["{self.exporter.address}"]}}}}
audit:
  path: {_q(self.audit_log)}
  key_file: {_q(pki.audit_key)}
  aggregate_interval: {self.aggregate_interval}
"""
        self.gateway = GatewayProcess(self.dir / "gateway", config)
        self.addCleanup(self.gateway.stop)
        self.gateway.start()
        self.node = f"/scrape?route=node&target={self.exporter.address.replace(':', '%3A')}"

    def records(self) -> list[dict[str, Any]]:
        return self.gateway.audit_records(self.audit_log)


class HandshakeFloodTests(FloodTestCase):
    """Certificate-less TLS handshakes: every one counted, a bounded number written."""

    def test_handshake_flood(self) -> None:
        """300 refused handshakes from 127.0.0.1 while Prometheus scrapes: one record at
        once, one counted record at shutdown, the metric counts all 300, every
        legitimate scrape answered."""
        address = _split(self.gateway.address("scrape"))
        prometheus = self.pki.client_context("prometheus")
        nobody = self.pki.client_context(None)

        def scrape() -> int:
            conn = http.client.HTTPSConnection(*address, context=prometheus, timeout=30)
            try:
                conn.request("GET", self.node)
                resp = conn.getresponse()
                resp.read()
                return resp.status
            finally:
                conn.close()

        quiet = Legit(scrape, limit=20)
        quiet.run()
        legit = Legit(scrape)
        legit.start()
        began = time.monotonic()
        for _ in range(HANDSHAKE_FLOOD):
            with (
                socket.create_connection(address, timeout=10) as sock,
                contextlib.suppress(ssl.SSLError, OSError),
                nobody.wrap_socket(sock, server_hostname=address[0]) as tls,
            ):
                tls.sendall(b"GET /sd HTTP/1.1\r\nHost: gate\r\n\r\n")
                tls.recv(1024)
        flood_time = time.monotonic() - began
        legit.finish()
        _eventually(
            lambda: (
                _metric(self.gateway, "promgate_tls_handshake_failures_total") >= HANDSHAKE_FLOOD
            ),
            "every refused handshake counted",
        )
        self.assertEqual(
            _metric(self.gateway, "promgate_tls_handshake_failures_total"), HANDSHAKE_FLOOD
        )
        running = [r for r in self.records() if r["event"] == "tls_handshake_failed"]
        self.assertEqual([r.get("count") for r in running], [1])
        self.assertEqual(running[0]["reason"], "no_client_certificate")
        self.assertEqual(
            _metric(self.gateway, "promgate_audit_records_aggregated_total"),
            HANDSHAKE_FLOOD - 1,
        )
        self.assertEqual(set(legit.statuses) | set(quiet.statuses), {200})
        self.assertIsNotNone(self.gateway.stop())  # exited, its stop record written
        failures = [r for r in self.records() if r["event"] == "tls_handshake_failed"]
        self.assertEqual(len(failures), 2)
        summary = failures[1]
        self.assertEqual(
            (summary["peer"], summary["reason"], summary["count"]),
            ("127.0.0.0/24", "no_client_certificate", HANDSHAKE_FLOOD - 1),
        )
        self.assertEqual(self.records()[-1]["event"], "stop")
        self.assertLess(self.records().index(summary), len(self.records()) - 1)
        verified = verify_files(load_key(self.pki.audit_key), [self.audit_log])
        self.assertTrue(verified.ok, verified.message)
        _report(
            f"handshake flood: {HANDSHAKE_FLOOD} refused handshakes in {flood_time:.1f}s, "
            f"{len(failures)} audit records; legitimate mTLS scrape before: "
            f"{quiet.summary()}; during: {legit.summary()}"
        )


class PasswordFloodTests(FloodTestCase):
    """Wrong basic-auth passwords on connections reset at once: bcrypt work stays bounded."""

    def _get(self, user: str, password: str, source: str) -> int:
        conn = http.client.HTTPConnection(
            *_split(self.gateway.address("plain")), timeout=60, source_address=(source, 0)
        )
        try:
            conn.request("GET", self.node, headers={"Authorization": _basic(user, password)})
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def test_password_flood(self) -> None:
        """400 wrong passwords, each on a connection reset at once, while a logged-in
        client scrapes: every legitimate scrape answered, a bounded number of bcrypt
        checks run, the queue empty soon after; another user logs in from another
        network meanwhile."""
        address = _split(self.gateway.address("plain"))
        self.assertEqual(self._get("ops", "right", "127.0.0.1"), 200)  # now in the cache
        quiet = Legit(lambda: self._get("ops", "right", "127.0.0.1"), limit=20)
        quiet.run()
        legit = Legit(lambda: self._get("ops", "right", "127.0.0.1"))
        legit.start()
        request = (
            f"GET {self.node} HTTP/1.1\r\nHost: gate\r\n"
            f"Authorization: {_basic('ops', 'wrong')}\r\n\r\n"
        ).encode()
        began = time.monotonic()
        for i in range(PASSWORD_FLOOD):
            with socket.create_connection(address, timeout=10) as sock:
                sock.sendall(request)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            if i == PASSWORD_FLOOD // 2:
                other_began = time.monotonic()
                other = self._get("viewer", "viewer-pass", "127.0.1.1")
                other_latency = time.monotonic() - other_began
        flood_time = time.monotonic() - began
        legit.finish()
        _eventually(
            lambda: _metric(self.gateway, "promgate_auth_bcrypt_queue_length") == 0,
            "the bcrypt queue empty",
        )
        idle_after = time.monotonic() - began - flood_time
        checks = _metric(self.gateway, "promgate_auth_bcrypt_checks_total")
        throttled = _metric(self.gateway, "promgate_auth_rejections_total")
        self.assertEqual(set(legit.statuses) | set(quiet.statuses), {200})
        self.assertEqual(other, 200)
        # One for the first login, one for viewer, a few wrong ones before the backoff.
        self.assertLess(checks, PASSWORD_FLOOD / 4)
        self.assertGreaterEqual(checks, 2)
        self.assertGreater(throttled, 0)
        after = Legit(lambda: self._get("ops", "right", "127.0.0.1"), limit=5)
        after.run()
        self.assertEqual(set(after.statuses), {200})
        _report(
            f"password flood: {PASSWORD_FLOOD} wrong passwords (reset) in {flood_time:.1f}s; "
            f"bcrypt checks run {checks:.0f}, refused without bcrypt {throttled:.0f}; "
            f"queue empty {idle_after:.2f}s after the flood; cached login before: "
            f"{quiet.summary()}; during: {legit.summary()}; uncached login of another user "
            f"from another /24 during the flood: {other_latency * 1000:.0f} ms"
        )
