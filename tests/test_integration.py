"""Integration: the real ``twistd promgate`` on 127.0.0.1, real TLS, fake upstreams.

Each test class shares one gateway (started on first use, stopped at exit: trial has no
class-level fixtures), with its own PKI, fake exporters and audit log. Every wait is bounded
and waits for something the gateway does (its ready file, an audit record, a counter), never
for a guessed length of time. The audit-trail class runs its own scenario on its own gateway,
stops it, then verifies the log.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import ssl
from pathlib import Path
from typing import Any, TypeVar

from twisted.trial.unittest import SkipTest, SynchronousTestCase

import promgate
from promgate.testing import (
    FakeExporter,
    GatewayProcess,
    Response,
    TestPKI,
    https_connection,
    https_get,
    request,
)
from promgate.testing.integration import (
    IDENTITIES,
    Shared,
    attempt_handshake,
    cert_sha256,
    cleanups,
    closed_port,
    eventually,
    metric_samples,
    q,
    refused_handshake_from,
    run_cli,
    scrape_path,
    sha256,
    tls_section,
    workdir,
)

ROOT = Path(__file__).resolve().parent.parent
KiB = 1024
MiB = 1024 * KiB
SCRAPE_TIMEOUT = {"X-Prometheus-Scrape-Timeout-Seconds": "1"}

T = TypeVar("T")

# -- shared fixtures --------------------------------------------------------------------------


def get_cut_short(
    case: SynchronousTestCase, conn: http.client.HTTPConnection, path: str
) -> tuple[int, bytes]:
    """Request ``path``: the status line arrives, then the body breaks off before its end.

    Returns the status and the part of the body that arrived; fails on a complete response.
    """
    conn.request("GET", path)
    try:
        resp = conn.getresponse()
        try:
            body = resp.read()
        except http.client.IncompleteRead as e:
            return resp.status, e.partial
    finally:
        conn.close()
    raise case.failureException(
        f"a complete response ({resp.status}, {len(body)} bytes) instead of one cut short"
    )


def read_until_closed(address: str, context: ssl.SSLContext, raw_request: bytes) -> bytes:
    """Send ``raw_request`` over TLS, read until the gateway closes, and return what came.

    The close must be complete: the gateway's close_notify, then (once it has read ours)
    its end of the TCP connection. A gateway that leaves the connection open makes this
    raise TimeoutError (every read is bounded by the socket timeout).
    """
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        tls = context.wrap_socket(sock, server_hostname=host)
        tls.sendall(raw_request)
        received = b""
        while len(received) < 64 * MiB:  # bounded: a response is far smaller
            data = tls.recv(65536)
            if not data:
                break
            received += data
        else:
            raise AssertionError("the gateway sent far more than one response")
        raw = tls.unwrap()  # our close_notify, in answer to the gateway's
        if raw.recv(1) != b"":
            raise AssertionError("data after the gateway's close_notify")
        return received


# -- the main gateway: happy paths, refusals, upstream failures, /sd, admin ---------------------


class MainSetup:
    """One gateway with routes for every scenario, and the fake upstreams behind them."""

    def __init__(self) -> None:
        self.dir = workdir("main")
        self.pki = TestPKI(self.dir / "pki")
        self.bodies = {
            "/small": os.urandom(20 * KiB),
            "/big": os.urandom(5 * MiB),
            "/small-chunked": os.urandom(20 * KiB),
            "/big-chunked": os.urandom(5 * MiB),
            "/reset": os.urandom(64 * KiB),
        }
        self.exporter = FakeExporter(
            {
                "/small": self.bodies["/small"],
                "/big": self.bodies["/big"],
                "/small-chunked": "chunked:4096",
                "/big-chunked": "chunked:65536",
                "/hang": "hang",
                "/reset": "reset_mid_body",
            },
            self.bodies,
        )
        cleanups.append(self.exporter.stop)
        self.pooled = FakeExporter({"/metrics": b"pooled_up 1\n" * 100})
        cleanups.append(self.pooled.stop)
        self.capped = FakeExporter(
            {"/metrics": os.urandom(4 * KiB), "/chunked": "chunked:512"},
            {"/chunked": os.urandom(4 * KiB)},
        )
        cleanups.append(self.capped.stop)
        self.dead = f"127.0.0.1:{closed_port()}"
        self.audit_log = self.dir / "audit.jsonl"
        ex, pooled, capped = self.exporter.address, self.pooled.address, self.capped.address
        config = (
            tls_section(self.pki)
            + 'admin: {endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + 'listeners:\n  - {name: scrape, endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + IDENTITIES
            + f"""
routes:
  node:
    allow: ["role:scraper", ops]
    paths: [/small, /big, /small-chunked, /big-chunked, /hang, /reset]
    labels: {{team: infra}}
    targets: {{static: [{{targets: ["{ex}"], labels: {{service: node}}}}]}}
  pooled:
    allow: ["role:scraper"]
    targets: {{static: ["{pooled}"]}}
  restricted:
    allow: [prometheus]
    metrics_path: /small
    targets: {{static: ["{ex}"]}}
  limited:
    allow: ["role:scraper"]
    paths: [/small]
    limits: {{rate: "1/h", burst: 2, per: identity}}
    targets: {{static: ["{ex}"]}}
  dead:
    allow: ["role:scraper"]
    targets: {{static: ["{self.dead}"]}}
  capped:
    allow: ["role:scraper"]
    paths: [/chunked]
    max_response_size: 1KiB
    targets: {{static: ["{capped}"]}}
# Each refused handshake is looked for by its peer: an interval short enough that no
# two of them are folded into one counted record.
audit: {{path: {q(self.audit_log)}, key_file: {q(self.pki.audit_key)}, aggregate_interval: 1ms}}
"""
        )
        self.gateway = GatewayProcess(self.dir / "gateway", config)
        cleanups.append(self.gateway.stop)
        self.gateway.start()
        self.prometheus = self.pki.client_context("prometheus")
        self.ops = self.pki.client_context("ops")

    @property
    def scrape(self) -> str:
        return self.gateway.address("scrape")

    def get(self, path: str, context: ssl.SSLContext | None = None, **kw: Any) -> Response:
        return https_get(self.scrape, path, context or self.prometheus, **kw)

    def node(self, path: str) -> str:
        return scrape_path("node", self.exporter.address, path)


MAIN = Shared(MainSetup)


class MainGatewayTestCase(SynchronousTestCase):
    """Tests against the shared main gateway."""

    def setUp(self) -> None:
        self.m = MAIN.get()

    def assert_relayed(self, resp: Response, body: bytes, framing: str) -> None:
        self.assertEqual(resp.status, 200)
        self.assertEqual(sha256(resp.body), sha256(body))
        self.assertEqual(len(resp.body), len(body))
        if framing == "length":
            self.assertEqual(resp.headers.get("content-length"), str(len(body)))
        else:
            self.assertEqual(resp.headers.get("transfer-encoding"), "chunked")


class HappyPathTests(MainGatewayTestCase):
    """Scrapes that succeed arrive byte for byte, over kept-alive and pooled connections."""

    def test_small_content_length(self) -> None:
        """A 20 KiB Content-Length body arrives byte-identical."""
        resp = self.m.get(self.m.node("/small"))
        self.assert_relayed(resp, self.m.bodies["/small"], "length")

    def test_big_content_length(self) -> None:
        """A 5 MiB random Content-Length body arrives byte-identical."""
        resp = self.m.get(self.m.node("/big"))
        self.assert_relayed(resp, self.m.bodies["/big"], "length")

    def test_small_chunked(self) -> None:
        """A 20 KiB chunked body arrives byte-identical, still chunked."""
        resp = self.m.get(self.m.node("/small-chunked"))
        self.assert_relayed(resp, self.m.bodies["/small-chunked"], "chunked")

    def test_big_chunked(self) -> None:
        """A 5 MiB random chunked body arrives byte-identical, still chunked."""
        resp = self.m.get(self.m.node("/big-chunked"))
        self.assert_relayed(resp, self.m.bodies["/big-chunked"], "chunked")

    def test_keep_alive(self) -> None:
        """Several scrapes, small and big, either framing, succeed over one client connection."""
        conn = https_connection(self.m.scrape, self.m.prometheus)
        self.addCleanup(conn.close)
        local_addresses = set()
        for path in ["/small", "/big", "/small-chunked", "/big-chunked", "/small", "/big"]:
            resp = request(conn, self.m.node(path))
            framing = "chunked" if path.endswith("-chunked") else "length"
            self.assert_relayed(resp, self.m.bodies[path], framing)
            self.assertEqual(resp.headers.get("connection"), "keep-alive")
            assert conn.sock is not None
            local_addresses.add(conn.sock.getsockname())
        self.assertEqual(len(local_addresses), 1, "the client had to reconnect")

    def test_connection_close(self) -> None:
        """A scrape sent with ``Connection: close`` is answered, then the gateway closes."""
        raw = (
            f"GET {self.m.node('/small')} HTTP/1.1\r\nHost: gate\r\nConnection: close\r\n\r\n"
        ).encode()
        received = read_until_closed(self.m.scrape, self.m.prometheus, raw)
        head, _, body = received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b"\r\nConnection: close", head)
        self.assertEqual(sha256(body), sha256(self.m.bodies["/small"]))

    def test_upstream_pooling(self) -> None:
        """Many scrapes of one target reuse one upstream connection."""
        pooled = self.m.pooled
        path = scrape_path("pooled", pooled.address)
        before, connections_before = len(pooled.requests), pooled.connections
        conn = https_connection(self.m.scrape, self.m.prometheus)
        self.addCleanup(conn.close)
        for _ in range(15):
            self.assertEqual(request(conn, path).status, 200)
        for _ in range(5):
            self.assertEqual(self.m.get(path).status, 200)
        self.assertEqual(len(pooled.requests) - before, 20)
        self.assertGreaterEqual(pooled.connections, 1)
        self.assertLessEqual(pooled.connections - connections_before, 1)


class HandshakeRefusalTests(MainGatewayTestCase):
    """Clients without a valid certificate are refused at the handshake, and audited."""

    def assert_refused_and_audited(
        self, context: ssl.SSLContext, reason: str, cert: Path | None
    ) -> None:
        local, received, _ = attempt_handshake(self.m.scrape, context)
        self.assertEqual(received, b"")
        record = self.m.gateway.wait_for_audit_record(
            self.m.audit_log, refused_handshake_from(local)
        )
        self.assertEqual(record["reason"], reason)
        self.assertEqual(record["decision"], "deny")
        self.assertEqual(record["listener"], "scrape")
        if cert is not None:
            self.assertEqual(record["cert_sha256"], cert_sha256(cert))

    def test_no_client_certificate(self) -> None:
        """A client with no certificate is refused and audited as no_client_certificate."""
        self.assert_refused_and_audited(
            self.m.pki.client_context(None), "no_client_certificate", None
        )

    def test_certificate_from_another_ca(self) -> None:
        """A certificate from an untrusted CA is refused and audited as unknown_ca."""
        cert, key = self.m.pki.foreign_client("prometheus")
        context = self.m.pki.client_context(None)
        context.load_cert_chain(str(cert), str(key))
        self.assert_refused_and_audited(context, "unknown_ca", cert)

    def test_expired_certificate(self) -> None:
        """An expired certificate is refused and audited as certificate_expired."""
        context = self.m.pki.client_context("prometheus", expired=True)
        cert, _ = self.m.pki.client("prometheus", expired=True)
        self.assert_refused_and_audited(context, "certificate_expired", cert)


class RefusalTests(MainGatewayTestCase):
    """Policy and limits refuse what they must, with the status Prometheus should see."""

    def test_identity_not_allowed(self) -> None:
        """A known identity that the route does not allow gets 403."""
        resp = self.m.get(scrape_path("restricted", self.m.exporter.address), self.m.ops)
        self.assertEqual(resp.status, 403)
        allowed = self.m.get(scrape_path("restricted", self.m.exporter.address))
        self.assertEqual(allowed.status, 200)

    def test_target_outside_route(self) -> None:
        """A target outside the route is 404 with the same body as an unknown route."""
        outside = self.m.get(scrape_path("node", "127.0.0.1:1"))
        unknown = self.m.get(scrape_path("no-such-route", self.m.exporter.address))
        self.assertEqual(outside.status, 404)
        self.assertEqual(unknown.status, 404)
        self.assertEqual(outside.body, unknown.body)
        self.assertEqual(outside.headers.get("content-type"), unknown.headers.get("content-type"))

    def test_malformed_request(self) -> None:
        """A malformed request gets 400, then the gateway closes the connection."""
        raw = b"GET /sd HTTP/1.1\r\nHost: gate\r\nBad Header: x\r\n\r\n"
        received = read_until_closed(self.m.scrape, self.m.prometheus, raw)
        self.assertTrue(received.startswith(b"HTTP/1.1 400 "), received[:200])
        self.assertIn(b"\r\nConnection: close\r\n", received)

    def test_burst_exceeded(self) -> None:
        """Past the route's burst, a scrape gets 429 with Retry-After in whole seconds."""
        path = scrape_path("limited", self.m.exporter.address, "/small")
        statuses = []
        for _ in range(3):  # burst 2: the third at the latest is refused
            resp = self.m.get(path)
            statuses.append(resp.status)
            if resp.status == 429:
                break
        self.assertEqual(statuses[-1], 429, statuses)
        self.assertTrue(all(status == 200 for status in statuses[:-1]), statuses)
        retry_after = resp.headers.get("retry-after", "")
        self.assertTrue(retry_after.isdigit() and int(retry_after) >= 1, retry_after)


class UpstreamFailureTests(MainGatewayTestCase):
    """Upstream failures become 502/504, or a response cut off, never a clean end."""

    def test_upstream_refused(self) -> None:
        """An upstream port with nothing listening gives 502."""
        resp = self.m.get(scrape_path("dead", self.m.dead))
        self.assertEqual(resp.status, 502)

    def test_upstream_hangs(self) -> None:
        """An upstream that never answers gives 504 within the scrape timeout header."""
        resp = self.m.get(self.m.node("/hang"), headers=SCRAPE_TIMEOUT, timeout=30)
        self.assertEqual(resp.status, 504)

    def test_upstream_reset_mid_body(self) -> None:
        """An upstream reset mid-body reaches the client as a response cut short."""
        conn = https_connection(self.m.scrape, self.m.prometheus)
        status, partial = get_cut_short(self, conn, self.m.node("/reset"))
        self.assertEqual(status, 200)
        body = self.m.bodies["/reset"]
        self.assertLess(len(partial), len(body))
        self.assertEqual(partial, body[: len(partial)])

    def test_cut_short_then_closed(self) -> None:
        """After a response cut short, the gateway completes the close of the connection."""
        raw = f"GET {self.m.node('/reset')} HTTP/1.1\r\nHost: gate\r\n\r\n".encode()
        received = read_until_closed(self.m.scrape, self.m.prometheus, raw)
        head, _, body = received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertLess(len(body), len(self.m.bodies["/reset"]))

    def test_content_length_over_cap(self) -> None:
        """A Content-Length over the route's size cap gives 502 before any byte is relayed."""
        resp = self.m.get(scrape_path("capped", self.m.capped.address))
        self.assertEqual(resp.status, 502)

    def test_chunked_over_cap(self) -> None:
        """A chunked body that crosses the size cap reaches the client incomplete."""
        conn = https_connection(self.m.scrape, self.m.prometheus)
        path = scrape_path("capped", self.m.capped.address, "/chunked")
        status, partial = get_cut_short(self, conn, path)
        self.assertEqual(status, 200)
        self.assertLessEqual(len(partial), 1 * KiB)
        self.assertEqual(partial, self.m.capped.bodies["/chunked"][: len(partial)])


class ServiceDiscoveryTests(MainGatewayTestCase):
    """``/sd`` lists exactly what the caller may scrape, rewritten to go through the gateway."""

    def sd(self, context: ssl.SSLContext) -> list[dict[str, Any]]:
        resp = self.m.get("/sd", context)
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.headers.get("content-type"), "application/json")
        groups: list[dict[str, Any]] = json.loads(resp.body)
        return groups

    def test_prometheus_groups(self) -> None:
        """The prometheus identity gets every route it may use, as http_sd JSON."""
        groups = self.sd(self.m.prometheus)
        ex = self.m.exporter.address
        expected = {
            ("node", ex),
            ("pooled", self.m.pooled.address),
            ("restricted", ex),
            ("limited", ex),
            ("dead", self.m.dead),
            ("capped", self.m.capped.address),
        }
        got = {(g["labels"]["__param_route"], g["labels"]["__param_target"]) for g in groups}
        self.assertEqual(got, expected)
        for group in groups:
            self.assertEqual(group["targets"], [self.m.scrape])
            labels = group["labels"]
            self.assertEqual(labels["__metrics_path__"], "/scrape")
            self.assertEqual(labels["__scheme__"], "https")
            self.assertEqual(labels["instance"], labels["__param_target"])
        (node,) = [g for g in groups if g["labels"]["__param_route"] == "node"]
        self.assertEqual(node["labels"]["team"], "infra")
        self.assertEqual(node["labels"]["service"], "node")

    def test_other_identity_sees_fewer(self) -> None:
        """Another identity is offered only the routes it may use."""
        ops = self.sd(self.m.ops)
        prometheus = self.sd(self.m.prometheus)
        self.assertEqual([g["labels"]["__param_route"] for g in ops], ["node"])
        self.assertLess(len(ops), len(prometheus))


class AdminTests(MainGatewayTestCase):
    """The admin listener serves promgate's own metrics, health and readiness."""

    def admin(self, path: str) -> Response:
        return https_get(self.m.gateway.address("admin"), path, None)

    def test_health_and_readiness(self) -> None:
        """``/-/healthy`` and ``/-/ready`` answer 200 on a running gateway."""
        self.assertEqual(self.admin("/-/healthy").status, 200)
        self.assertEqual(self.admin("/-/ready").status, 200)

    def test_metrics(self) -> None:
        """``/metrics`` counts requests by route, refused handshakes, audit records, build."""
        self.assertEqual(self.m.get(self.m.node("/small")).status, 200)
        attempt_handshake(self.m.scrape, self.m.pki.client_context(None))

        def handshake_failures() -> str | None:
            text = self.admin("/metrics").body.decode()
            samples = metric_samples(text, "promgate_tls_handshake_failures_total")
            if any(labels.get("reason") == "no_client_certificate" for labels, _ in samples):
                return text
            return None

        text = eventually(handshake_failures, "a counted handshake failure")
        resp = self.admin("/metrics")
        self.assertEqual(resp.status, 200)
        self.assertTrue(resp.headers["content-type"].startswith("text/plain"))
        requests = metric_samples(text, "promgate_requests_total")
        self.assertIn(
            (
                {"listener": "scrape", "route": "node", "identity": "prometheus", "code": "200"},
                True,
            ),
            [(labels, value >= 1) for labels, value in requests],
        )
        ((_, records),) = metric_samples(text, "promgate_audit_records_total")
        self.assertGreaterEqual(records, 1)
        ((build, value),) = metric_samples(text, "promgate_build_info")
        self.assertEqual((build["version"], value), (promgate.__version__, 1.0))


# -- the audit trail: a scenario of every kind of decision, then stop and verify ---------------


class AuditScenario:
    """A gateway that sees one of every decision, then is stopped so its log is complete."""

    def __init__(self) -> None:
        self.dir = workdir("audit")
        self.pki = TestPKI(self.dir / "pki")
        self.exporter = FakeExporter({"/metrics": b"up 1\n", "/hang": "hang"})
        cleanups.append(self.exporter.stop)
        self.dead = f"127.0.0.1:{closed_port()}"
        self.audit_log = self.dir / "audit.jsonl"
        ex = self.exporter.address
        config = (
            tls_section(self.pki)
            + 'admin: {endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + 'listeners:\n  - {name: scrape, endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + IDENTITIES
            + f"""
routes:
  node: {{allow: ["role:scraper"], paths: [/hang], targets: {{static: ["{ex}"]}}}}
  restricted: {{allow: [prometheus], targets: {{static: ["{ex}"]}}}}
  limited:
    allow: ["role:scraper"]
    limits: {{rate: "1/h", burst: 1, per: identity}}
    targets: {{static: ["{ex}"]}}
  dead: {{allow: ["role:scraper"], targets: {{static: ["{self.dead}"]}}}}
audit: {{path: {q(self.audit_log)}, key_file: {q(self.pki.audit_key)}}}
"""
        )
        gateway = self.gateway = GatewayProcess(self.dir / "gateway", config)
        self.config_path = gateway.config_path
        cleanups.append(gateway.stop)
        gateway.start()
        scrape = gateway.address("scrape")
        prometheus = self.pki.client_context("prometheus")
        ops = self.pki.client_context("ops")

        def get(path: str, context: ssl.SSLContext = prometheus, **kw: Any) -> int:
            return https_get(scrape, path, context, **kw).status

        #: (status seen by the client, identity, route, reason) per request, in order.
        self.requests: list[tuple[int, str, str | None, str]] = [
            (get(scrape_path("node", ex)), "prometheus", "node", "ok"),
            (get(scrape_path("restricted", ex), ops), "ops", "restricted", "authz_denied"),
            (get(scrape_path("node", "127.0.0.1:1")), "prometheus", "node", "not_found"),
            (get(scrape_path("limited", ex)), "prometheus", "limited", "ok"),
            (get(scrape_path("limited", ex)), "prometheus", "limited", "rate_limited"),
            (get(scrape_path("dead", self.dead)), "prometheus", "dead", "upstream_refused"),
            (
                get(scrape_path("node", ex, "/hang"), headers=SCRAPE_TIMEOUT),
                "prometheus",
                "node",
                "upstream_timeout",
            ),
            (get("/sd"), "prometheus", None, "ok"),
        ]
        foreign_cert, foreign_key = self.pki.foreign_client("prometheus")
        foreign = self.pki.client_context(None)
        foreign.load_cert_chain(str(foreign_cert), str(foreign_key))
        expired_cert, _ = self.pki.client("prometheus", expired=True)
        #: (our address, reason, certificate fingerprint) per refused handshake.
        self.handshakes: list[tuple[str, str, str | None]] = []
        for context, reason, cert in [
            (self.pki.client_context(None), "no_client_certificate", None),
            (foreign, "unknown_ca", cert_sha256(foreign_cert)),
            (
                self.pki.client_context("prometheus", expired=True),
                "certificate_expired",
                cert_sha256(expired_cert),
            ),
        ]:
            local, _, _ = attempt_handshake(scrape, context)
            self.handshakes.append((local, reason, cert))
            # Written when the gateway sees the refused connection close: wait for it, so
            # that stopping the gateway below cannot race it.
            gateway.wait_for_audit_record(self.audit_log, refused_handshake_from(local))
        self.exit_code = gateway.stop()
        self.records = gateway.audit_records(self.audit_log)


AUDIT = Shared(AuditScenario)


class AuditTrailTests(SynchronousTestCase):
    """After a scenario of every decision and a stop, the audit log is complete and verifies."""

    def setUp(self) -> None:
        self.s = AUDIT.get()

    def test_verify_with_key_file(self) -> None:
        """``promgate audit verify --key-file KEY LOG`` accepts the log, ending cleanly."""
        code, out, err = run_cli(
            "audit", "verify", "--key-file", str(self.s.pki.audit_key), str(self.s.audit_log)
        )
        self.assertEqual(code, 0, err)
        self.assertIn(f"OK: {len(self.s.records)} record(s) verified", out)
        self.assertIn("clean stop", out)

    def test_verify_with_config(self) -> None:
        """``promgate audit verify --config CONFIG`` finds key and log itself and accepts them."""
        code, out, err = run_cli("audit", "verify", "--config", str(self.s.config_path))
        self.assertEqual(code, 0, err)
        self.assertIn("clean stop", out)

    def test_edit_detected(self) -> None:
        """The same verification refuses a copy of the log with one record edited."""
        lines = self.s.audit_log.read_bytes().splitlines(keepends=True)
        lines[2] = lines[2].replace(b'"status":', b'"status":1', 1)
        edited = self.s.dir / "edited.jsonl"
        edited.write_bytes(b"".join(lines))
        code, _, err = run_cli(
            "audit", "verify", "--key-file", str(self.s.pki.audit_key), str(edited)
        )
        self.assertEqual(code, 1)
        self.assertIn("edited.jsonl:3", err)

    def test_bracketed_by_start_and_stop(self) -> None:
        """The log opens with a start record and closes with a stop record, seq 1 to N."""
        records = self.s.records
        self.assertEqual(records[0]["event"], "start")
        self.assertEqual(records[-1]["event"], "stop")
        self.assertEqual([r["seq"] for r in records], list(range(1, len(records) + 1)))
        self.assertIsNotNone(self.s.exit_code)

    def test_request_records(self) -> None:
        """Each scenario request has its record, with identity, route, reason and status."""
        requests = [r for r in self.s.records if r["event"] == "request"]
        seen = [
            (r.get("status"), r.get("identity"), r.get("route"), r.get("reason")) for r in requests
        ]
        self.assertEqual(seen, self.s.requests)
        self.assertEqual(
            [status for status, *_ in self.s.requests], [200, 403, 404, 200, 429, 502, 504, 200]
        )
        for record in requests:
            self.assertEqual(record["listener"], "scrape")
            refused = record["status"] in (403, 404, 429)
            self.assertEqual(record["decision"], "deny" if refused else "allow")

    def test_handshake_records(self) -> None:
        """Each refused handshake has its record: peer, reason and certificate fingerprint."""
        failures = [r for r in self.s.records if r["event"] == "tls_handshake_failed"]
        self.assertEqual(
            [(r["peer"], r["reason"], r.get("cert_sha256")) for r in failures], self.s.handshakes
        )
        self.assertEqual({r["decision"] for r in failures}, {"deny"})


# -- configurations: invalid, an unwritable audit log, the shipped example ---------------------


class InvalidConfigurationTests(SynchronousTestCase):
    """An invalid configuration keeps ``twistd promgate`` from starting, and says why."""

    def test_same_errors_as_check_config(self) -> None:
        """twistd exits non-zero printing the same FILE:LINE: key: message as check-config."""
        directory = workdir("invalid")
        pki = TestPKI(directory / "pki")
        config = (
            tls_section(pki)
            + 'listeners:\n  - {name: scrape, endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + IDENTITIES
            + f"""
routes:
  node:
    allow: [nobody]
    colour: blue
    targets: {{static: ["127.0.0.1:9100"]}}
audit: {{path: {q(directory / "audit.jsonl")}, key_file: {q(directory / "missing.key")}}}
"""
        )
        gateway = GatewayProcess(directory / "gateway", config)
        self.addCleanup(gateway.stop)
        code, _, err = run_cli("check-config", str(gateway.config_path))
        self.assertEqual(code, 1)
        where = re.compile(re.escape(str(gateway.config_path)) + r":\d+: [\w.\[\]]+: .+")
        errors = [line for line in err.splitlines() if where.fullmatch(line)]
        self.assertEqual(len(errors), 3, err)
        self.assertRaises(RuntimeError, gateway.start)
        assert gateway.process is not None
        self.assertNotEqual(gateway.process.returncode, 0)
        log = gateway.log()
        for line in errors:
            self.assertIn(line, log)
        self.assertFalse(gateway.ready_file.exists())


class UnwritableAuditTests(SynchronousTestCase):
    """With ``on_failure: deny``, a gateway that cannot write its audit log serves nothing."""

    def test_every_scrape_refused(self) -> None:
        """With the audit log on /dev/full (ENOSPC), every scrape and /sd gets 503."""
        if not os.path.exists("/dev/full"):
            raise SkipTest("needs /dev/full (Linux)")
        directory = workdir("deny")
        pki = TestPKI(directory / "pki")
        exporter = FakeExporter({"/metrics": b"up 1\n"})
        self.addCleanup(exporter.stop)
        config = (
            tls_section(pki)
            + 'admin: {endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + 'listeners:\n  - {name: scrape, endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + IDENTITIES
            + f"""
routes:
  node: {{allow: ["role:scraper"], targets: {{static: ["{exporter.address}"]}}}}
audit: {{path: /dev/full, key_file: {q(pki.audit_key)}, on_failure: deny}}
"""
        )
        gateway = GatewayProcess(directory / "gateway", config)
        self.addCleanup(gateway.stop)
        gateway.start()
        context = pki.client_context("prometheus")
        path = scrape_path("node", exporter.address)
        statuses = [gateway.get("scrape", path, context).status for _ in range(3)]
        statuses.append(gateway.get("scrape", "/sd", context).status)
        self.assertEqual(statuses, [503] * 4)
        self.assertEqual(exporter.requests, [])


class ShippedExample:
    """A copy of the shipped etc/ with a development PKI made by ``promgate pki init``."""

    def __init__(self) -> None:
        self.dir = workdir("example")
        self.etc = self.dir / "etc"
        shutil.copytree(ROOT / "etc", self.etc, ignore=shutil.ignore_patterns("pki", "audit.*"))
        code, out, err = run_cli(
            "pki", "init", str(self.etc / "pki"), "--identity", "prometheus", "--identity", "ops"
        )
        if code != 0:
            raise RuntimeError(f"promgate pki init failed ({code}):\n{out}{err}")


EXAMPLE = Shared(ShippedExample)


def replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise AssertionError(f"expected {old!r} exactly once in the shipped example")
    return text.replace(old, new)


class ShippedExampleTests(SynchronousTestCase):
    """The example configuration in etc/ works as shipped, after ``promgate pki init``."""

    def setUp(self) -> None:
        self.example = EXAMPLE.get()

    def test_check_config(self) -> None:
        """``promgate check-config etc/promgate.yaml`` accepts the shipped example."""
        code, out, err = run_cli("check-config", str(self.example.etc / "promgate.yaml"))
        self.assertEqual(code, 0, err)
        self.assertIn(": OK:", out)

    def test_scrape_self_through_gateway(self) -> None:
        """The shipped ``self`` route serves promgate's own metrics to the prometheus cert."""
        etc = workdir("example-run") / "etc"
        shutil.copytree(self.example.etc, etc)
        admin = closed_port()
        main = (etc / "promgate.yaml").read_text()
        main = replace_once(
            main, '"tcp:9099:interface=127.0.0.1"', f'"tcp:{admin}:interface=127.0.0.1"'
        )
        main = replace_once(main, '"tcp:9443:interface=127.0.0.1"', '"tcp:0:interface=127.0.0.1"')
        drop_in = etc / "promgate.d" / "self.yaml"
        drop_in.write_text(
            replace_once(drop_in.read_text(), '"127.0.0.1:9099"', f'"127.0.0.1:{admin}"')
        )
        gateway = GatewayProcess(etc, main, name="promgate.yaml")
        self.addCleanup(gateway.stop)
        gateway.start()
        self.assertEqual(gateway.address("admin"), f"127.0.0.1:{admin}")
        pki = etc / "pki"
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        context.load_cert_chain(str(pki / "prometheus.pem"), str(pki / "prometheus-key.pem"))
        resp = gateway.get("scrape", scrape_path("self", f"127.0.0.1:{admin}"), context)
        self.assertEqual(resp.status, 200, resp.body)
        text = resp.body.decode()
        ((build, _),) = metric_samples(text, "promgate_build_info")
        self.assertEqual(build["version"], promgate.__version__)
        self.assertTrue(metric_samples(text, "promgate_connections_total"))


class ShutdownTests(SynchronousTestCase):
    """SIGTERM stops accepting, lets in-flight scrapes finish, and audits what it cuts."""

    def test_drain_then_audit_cut_connections(self) -> None:
        """An in-flight scrape still gets its answer after SIGTERM; a half-sent request
        is cut and audited as gateway_shutdown; the log then verifies and ends in stop."""
        import signal
        import threading

        directory = workdir("shutdown")
        pki = TestPKI(directory / "pki")
        exporter = FakeExporter({"/hang": "hang"})
        self.addCleanup(exporter.stop)
        audit_log = directory / "audit.jsonl"
        config = (
            tls_section(pki)
            + 'admin: {endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + 'listeners:\n  - {name: scrape, endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + IDENTITIES
            + f"""
routes:
  node: {{allow: ["role:scraper"], paths: [/hang], targets: {{static: ["{exporter.address}"]}}}}
audit: {{path: {q(audit_log)}, key_file: {q(pki.audit_key)}}}
"""
        )
        gateway = GatewayProcess(directory / "gateway", config)
        self.addCleanup(gateway.stop)
        gateway.start()
        context = pki.client_context("prometheus")
        answers: list[Response | BaseException] = []

        def scrape() -> None:
            try:
                answers.append(
                    gateway.get(
                        "scrape",
                        scrape_path("node", exporter.address, "/hang"),
                        context,
                        headers={"X-Prometheus-Scrape-Timeout-Seconds": "2"},
                    )
                )
            except BaseException as e:  # reported through the assertion below
                answers.append(e)

        worker = threading.Thread(target=scrape, daemon=True)
        worker.start()
        eventually(lambda: exporter.requests or None, "the scrape to reach the upstream")

        host, _, port = gateway.address("scrape").rpartition(":")
        raw = socket.create_connection((host, int(port)), timeout=10)
        self.addCleanup(raw.close)
        half = context.wrap_socket(raw, server_hostname="localhost")
        half.sendall(b"GET /sd HTTP/1.1\r\nHost: localhost\r\n")  # the head never ends
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGTERM)
        worker.join(30)
        self.assertEqual(len(answers), 1)
        answer = answers[0]
        assert isinstance(answer, Response), answer
        self.assertEqual(answer.status, 504)
        gateway.process.wait(30)

        records = gateway.audit_records(audit_log)
        self.assertEqual(records[-1]["event"], "stop")
        reasons = [r.get("reason") for r in records if r["event"] == "request"]
        self.assertIn("upstream_timeout", reasons)
        self.assertIn("gateway_shutdown", reasons)
        code, out, err = run_cli(
            "audit", "verify", "--key-file", str(pki.audit_key), str(audit_log)
        )
        self.assertEqual(code, 0, err)
        self.assertIn("clean stop", out)


class HTTPSUpstreamTests(SynchronousTestCase):
    """``scheme: https`` upstreams are verified with service_identity against the route's CA."""

    def test_verified_wrong_name_and_unknown_ca(self) -> None:
        """The right CA and name relay the body; a wrong expected name or a CA that did not
        sign the upstream's certificate is a 502 upstream_tls_failed, and nothing is sent."""
        directory = workdir("https-upstream")
        pki = TestPKI(directory / "pki")
        other = TestPKI(directory / "other-pki")
        body = os.urandom(16 * KiB)
        exporter = FakeExporter({"/metrics": body}, tls=pki.server_context())
        self.addCleanup(exporter.stop)
        audit_log = directory / "audit.jsonl"
        target = exporter.address
        config = (
            tls_section(pki)
            + 'admin: {endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + 'listeners:\n  - {name: scrape, endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + IDENTITIES
            + f"""
templates:
  secure: {{scheme: https, allow: ["role:scraper"]}}
routes:
  good:
    template: secure
    tls: {{ca: {q(pki.ca_cert)}}}
    targets: {{static: ["{target}"]}}
  wrong-name:
    template: secure
    tls: {{ca: {q(pki.ca_cert)}, server_name: metrics.example.org}}
    targets: {{static: ["{target}"]}}
  unknown-ca:
    template: secure
    tls: {{ca: {q(other.ca_cert)}}}
    targets: {{static: ["{target}"]}}
audit: {{path: {q(audit_log)}, key_file: {q(pki.audit_key)}}}
"""
        )
        gateway = GatewayProcess(directory / "gateway", config)
        self.addCleanup(gateway.stop)
        gateway.start()
        context = pki.client_context("prometheus")

        good = gateway.get("scrape", scrape_path("good", target), context)
        self.assertEqual((good.status, sha256(good.body)), (200, sha256(body)))
        for route in ("wrong-name", "unknown-ca"):
            resp = gateway.get("scrape", scrape_path(route, target), context)
            self.assertEqual(resp.status, 502, route)
        self.assertEqual(len(exporter.requests), 1)
        gateway.stop()
        failed = [
            r
            for r in gateway.audit_records(audit_log)
            if r.get("route") in ("wrong-name", "unknown-ca")
        ]
        self.assertEqual([r["reason"] for r in failed], ["upstream_tls_failed"] * 2)


class PathPolicyTests(SynchronousTestCase):
    """On one route, /metrics passes while /debug/pprof never reaches the exporter."""

    def test_pprof_refused_metrics_passes(self) -> None:
        """Over real TLS: the listed path is relayed; an unlisted one is 403, a dot-segment
        trick toward it is 400, and the exporter only ever sees /metrics."""
        directory = workdir("path-policy")
        pki = TestPKI(directory / "pki")
        exporter = FakeExporter({"/metrics": b"up 1\n", "/debug/pprof": b"secret profile\n"})
        self.addCleanup(exporter.stop)
        audit_log = directory / "audit.jsonl"
        config = (
            tls_section(pki)
            + 'admin: {endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + 'listeners:\n  - {name: scrape, endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + IDENTITIES
            + f"""
routes:
  node: {{allow: ["role:scraper"], paths: [/metrics], targets: {{static: ["{exporter.address}"]}}}}
audit: {{path: {q(audit_log)}, key_file: {q(pki.audit_key)}}}
"""
        )
        gateway = GatewayProcess(directory / "gateway", config)
        self.addCleanup(gateway.stop)
        gateway.start()
        context = pki.client_context("prometheus")
        target = exporter.address

        def status(path: str | None) -> int:
            return gateway.get("scrape", scrape_path("node", target, path), context).status

        self.assertEqual(status(None), 200)
        self.assertEqual(status("/metrics"), 200)
        self.assertEqual(status("/debug/pprof"), 403)
        for trick in ("/metrics/../debug/pprof", "/metrics/%2e%2e/debug/pprof", "//debug/pprof"):
            self.assertEqual(status(trick), 400, trick)
        self.assertEqual({t.split("?")[0] for t, _ in exporter.requests}, {"/metrics"})
        gateway.stop()
        reasons = [
            (r["status"], r["reason"])
            for r in gateway.audit_records(audit_log)
            if r["event"] == "request" and r["status"] != 200
        ]
        self.assertEqual(reasons, [(403, "path_refused")] + [(400, "path_refused")] * 3)
