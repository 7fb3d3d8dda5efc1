"""Integration: the forward proxy of the real ``twistd promgate`` on 127.0.0.1.

One gateway with two ``forward`` listeners: ``egress`` over mutual TLS (the caller is named
by its client certificate, as with an ``https://`` proxy_url) and ``egress-plain`` without
TLS (the caller is named by ``Proxy-Authorization``; ``tunnel_idle: 2s`` so that the idle
deadline can be seen quickly). Behind it, a plain and a TLS fake exporter. Every wait is
bounded and ends on something the gateway does (an answer, a close, an audit record).
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import time
from typing import Any

import bcrypt
from twisted.trial.unittest import SynchronousTestCase

from promgate.testing import FakeExporter, GatewayProcess, TestPKI, https_connection, request
from promgate.testing.integration import Shared, cleanups, q, tls_section, workdir

BODY = b"# TYPE plain_up gauge\nplain_up 1\n"
TLS_BODY = b"# TYPE tls_up gauge\ntls_up 1\n"
PASSWORD = b"s3cret"
BASIC = "Basic " + base64.b64encode(b"alice:" + PASSWORD).decode()
TUNNEL_IDLE = 2.0


class ForwardSetup:
    """The gateway, its PKI and the two exporters, shared by the tests below."""

    def __init__(self) -> None:
        self.dir = workdir("forward")
        self.pki = TestPKI(self.dir / "pki")
        self.plain = FakeExporter({"/metrics": BODY, "/secret": b"secret 1\n"})
        cleanups.append(self.plain.stop)
        self.tls = FakeExporter({"/metrics": TLS_BODY}, tls=self.pki.server_context())
        cleanups.append(self.tls.stop)
        self.audit_log = self.dir / "audit.jsonl"
        hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4)).decode()
        config = (
            tls_section(self.pki)
            + f"""
admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
listeners:
  - {{name: egress, protocol: forward, endpoint: "tcp:0:interface=127.0.0.1"}}
  - name: egress-plain
    protocol: forward
    endpoint: "tcp:0:interface=127.0.0.1"
    tls: false
    tunnel_idle: {TUNNEL_IDLE:g}s
identities:
  prometheus: {{cert: {{uri: "spiffe://promgate.local/prometheus"}}}}
  alice: {{basic: {{user: alice, bcrypt: {q(hashed)}}}}}
routes:
  node:
    allow: [prometheus, alice]
    targets: {{static: ["{self.plain.address}"]}}
  secure:
    scheme: https
    allow: [prometheus, alice]
    targets: {{static: ["{self.tls.address}"]}}
audit: {{path: {q(self.audit_log)}, key_file: {q(self.pki.audit_key)}}}
"""
        )
        self.gateway = GatewayProcess(self.dir / "gateway", config)
        cleanups.append(self.gateway.stop)
        self.gateway.start()
        self.prometheus = self.pki.client_context("prometheus")

    def address(self, listener: str) -> tuple[str, int]:
        host, _, port = self.gateway.address(listener).rpartition(":")
        return host, int(port)

    def record(self, predicate: Any) -> dict[str, Any]:
        return self.gateway.wait_for_audit_record(self.audit_log, predicate)


SETUP = Shared(ForwardSetup)


class InnerTLS:
    """A TLS client session carried inside another stream (a tunnel through the proxy),
    on memory BIOs: TLS in TLS, as Prometheus does through an ``https://`` proxy_url."""

    def __init__(self, outer: Any, context: ssl.SSLContext, hostname: str) -> None:
        self.outer = outer
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=hostname)

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.outer.sendall(data)

    def _fill(self) -> None:
        data = self.outer.recv(65536)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    def handshake(self) -> None:
        for _ in range(64):
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
            else:
                self._flush()
                return
        raise AssertionError("inner TLS handshake did not finish")

    def sendall(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def read_response(self) -> bytes:
        """One response with a Content-Length, read to its end."""
        received = b""
        for _ in range(1024):
            head, sep, body = received.partition(b"\r\n\r\n")
            if sep:
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                if len(body) >= length:
                    return received
            try:
                received += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        raise AssertionError(f"no complete response: {received[:200]!r}")


def read_head(sock: Any) -> bytes:
    """Read a response head (one byte at a time: what follows belongs to the tunnel)."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            raise AssertionError(f"closed after {head!r}")
        head += byte
    return head


def read_until_closed(sock: Any) -> bytes:
    received = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return received
        received += data


def connect_head(target: str, *headers: str) -> bytes:
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class AbsoluteFormTests(SynchronousTestCase):
    """Absolute-form GETs, allowed and refused, as Prometheus sends them for plain targets."""

    def test_allowed_over_mutual_tls(self) -> None:
        """The client certificate names the caller; the exporter gets origin-form, its own
        Host, and no proxy header."""
        s = SETUP.get()
        conn = https_connection(s.gateway.address("egress"), s.prometheus)
        url = f"http://{s.plain.address}/metrics"
        response = request(conn, url, headers={"Proxy-Connection": "keep-alive"})
        again = request(conn, url)  # the proxy connection is kept alive
        conn.close()
        self.assertEqual((response.status, response.body), (200, BODY))
        self.assertEqual((again.status, again.body), (200, BODY))
        target, headers = s.plain.requests[-1]
        self.assertEqual(target, "/metrics")
        self.assertEqual(headers["host"], s.plain.address)
        self.assertNotIn("proxy-connection", headers)
        record = s.record(
            lambda r: r.get("listener") == "egress" and r.get("status") == 200 and "path" in r
        )
        self.assertEqual(
            (record["identity"], record["route"], record["target"], record["path"]),
            ("prometheus", "node", s.plain.address, "/metrics"),
        )

    def test_refused_by_path(self) -> None:
        """A path the route does not list: 403, and the exporter never hears of it."""
        s = SETUP.get()
        seen = len(s.plain.requests)
        conn = https_connection(s.gateway.address("egress"), s.prometheus)
        response = request(conn, f"http://{s.plain.address}/secret")
        conn.close()
        self.assertEqual((response.status, response.body), (403, b"forbidden\n"))
        self.assertNotIn("/secret", [t for t, _ in s.plain.requests[seen:]])
        record = s.record(lambda r: r.get("reason") == "path_refused")
        self.assertEqual((record["identity"], record["route"]), ("prometheus", "node"))

    def test_basic_auth_and_407(self) -> None:
        """On the plain listener the caller is named by Proxy-Authorization; without it, 407
        with a challenge, never a 401."""
        s = SETUP.get()
        conn = https_connection(s.gateway.address("egress-plain"), None)
        url = f"http://{s.plain.address}/metrics"
        missing = request(conn, url)
        allowed = request(conn, url, headers={"Proxy-Authorization": BASIC})
        conn.close()
        self.assertEqual(missing.status, 407)
        self.assertIn("Basic", missing.headers["proxy-authenticate"])
        self.assertEqual((allowed.status, allowed.body), (200, BODY))
        self.assertNotIn("proxy-authorization", s.plain.requests[-1][1])
        record = s.record(lambda r: r.get("listener") == "egress-plain" and r.get("status") == 200)
        self.assertEqual(record["identity"], "alice")

    def test_not_a_proxy_for_anything_else(self) -> None:
        """Origin-form is not served (400); a URL outside every route is a bare 403."""
        s = SETUP.get()
        conn = https_connection(s.gateway.address("egress"), s.prometheus)
        outside = request(conn, "http://127.0.0.1:1/metrics")
        conn.close()
        origin = https_connection(s.gateway.address("egress"), s.prometheus)
        origin_form = request(origin, "/metrics")
        origin.close()
        self.assertEqual((outside.status, outside.body), (403, b"forbidden\n"))
        self.assertEqual(origin_form.status, 400)


class ConnectTests(SynchronousTestCase):
    """CONNECT tunnels, as Prometheus opens them for TLS targets."""

    def test_tls_through_tunnel(self) -> None:
        """The client speaks TLS with the exporter through the tunnel; one record at the end."""
        s = SETUP.get()
        host, port = s.address("egress-plain")
        conn = http.client.HTTPSConnection(
            host, port, context=s.pki.client_context(None), timeout=10
        )
        tls_host, _, tls_port = s.tls.address.rpartition(":")
        conn.set_tunnel(tls_host, int(tls_port), headers={"Proxy-Authorization": BASIC})
        response = request(conn, "/metrics")
        local = conn.sock.getsockname() if conn.sock is not None else None
        conn.close()
        self.assertEqual((response.status, response.body), (200, TLS_BODY))
        assert local is not None
        peer = f"{local[0]}:{local[1]}"
        record = s.record(lambda r: r.get("method") == "CONNECT" and r.get("peer") == peer)
        self.assertEqual(
            (record["identity"], record["route"], record["target"], record["status"]),
            ("alice", "secure", s.tls.address, 200),
        )
        self.assertEqual(record["reason"], "client_closed")
        self.assertGreater(record["bytes_in"], 0)
        self.assertGreater(record["bytes_out"], len(TLS_BODY))

    def test_tls_in_tls(self) -> None:
        """Over the mutual-TLS listener: the certificate names the caller, and the tunnel
        carries the inner TLS session inside the outer one."""
        s = SETUP.get()
        host, port = s.address("egress")
        raw = socket.create_connection((host, port), timeout=10)
        with s.prometheus.wrap_socket(raw, server_hostname=host) as outer:
            local = "{}:{}".format(*outer.getsockname()[:2])
            outer.sendall(connect_head(s.tls.address))
            head = read_head(outer)
            self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
            inner = InnerTLS(outer, s.pki.client_context(None), "127.0.0.1")
            inner.handshake()
            inner.sendall(f"GET /metrics HTTP/1.1\r\nHost: {s.tls.address}\r\n\r\n".encode())
            answer = inner.read_response()
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:100])
        self.assertTrue(answer.endswith(TLS_BODY))
        record = s.record(lambda r: r.get("method") == "CONNECT" and r.get("peer") == local)
        self.assertEqual((record["identity"], record["route"]), ("prometheus", "secure"))
        self.assertEqual(record["reason"], "client_closed")

    def test_refused_and_early_bytes_ignored(self) -> None:
        """A CONNECT to a plain-text target is refused with 403 and the connection closed;
        the absolute-form GET sent right behind its head is never served."""
        s = SETUP.get()
        seen = len(s.plain.requests)
        smuggled = (
            f"GET http://{s.plain.address}/metrics HTTP/1.1\r\nHost: {s.plain.address}\r\n"
            f"Proxy-Authorization: {BASIC}\r\n\r\n"
        ).encode()
        host, port = s.address("egress-plain")
        with socket.create_connection((host, port), timeout=10) as sock:
            local = "{}:{}".format(*sock.getsockname()[:2])
            sock.sendall(connect_head(s.plain.address, f"Proxy-Authorization: {BASIC}") + smuggled)
            received = read_until_closed(sock)
        self.assertTrue(received.startswith(b"HTTP/1.1 403 Forbidden\r\n"), received)
        self.assertEqual(received.count(b"HTTP/1.1 "), 1, received)
        self.assertIn(b"Connection: close\r\n", received)
        record = s.record(lambda r: r.get("peer") == local)
        self.assertEqual(
            (record["method"], record["decision"], record["reason"], record["identity"]),
            ("CONNECT", "deny", "not_found", "alice"),
        )
        # The gateway closed after the one record; nothing from this peer follows it.
        records = [r for r in s.gateway.audit_records(s.audit_log) if r.get("peer") == local]
        self.assertEqual(len(records), 1, records)
        self.assertEqual(len(s.plain.requests), seen)

    def test_idle_deadline(self) -> None:
        """A tunnel with nothing moving is closed after the listener's ``tunnel_idle``."""
        s = SETUP.get()
        host, port = s.address("egress-plain")
        with socket.create_connection((host, port), timeout=10 * TUNNEL_IDLE) as sock:
            local = "{}:{}".format(*sock.getsockname()[:2])
            opened = time.monotonic()
            sock.sendall(connect_head(s.tls.address, f"Proxy-Authorization: {BASIC}"))
            self.assertTrue(read_head(sock).startswith(b"HTTP/1.1 200 "))
            self.assertEqual(sock.recv(1), b"")  # blocks until the gateway closes
            waited = time.monotonic() - opened
        self.assertGreaterEqual(waited, TUNNEL_IDLE * 0.9)
        record = s.record(lambda r: r.get("method") == "CONNECT" and r.get("peer") == local)
        self.assertEqual((record["reason"], record["route"]), ("tunnel_idle_timeout", "secure"))
        self.assertGreaterEqual(record["duration"], TUNNEL_IDLE)
