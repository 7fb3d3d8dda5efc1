"""Integration: tcp listeners of the real ``twistd promgate`` on 127.0.0.1, with real TLS,
real sockets and upstreams written here with sockets and threads.

One gateway serves every test (started on first use, stopped at exit), with listeners in
both modes. Each upstream runs a script per accepted connection and reports what it saw on a
queue; every wait is bounded and waits for something to happen (a byte, an end of file, an
audit record), never for a guessed length of time.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import queue
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from promgate.net.proxyproto import (
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_PROMGATE_IDENTITY,
    PP2_TYPE_SSL,
    ProxyHeader,
    decode_ssl_tlv,
    decode_v2,
)
from promgate.testing import GatewayProcess, TestPKI, https_get
from promgate.testing.hello import python_client_hello

KiB = 1024
MiB = 1024 * KiB
TIMEOUT = 30.0

Script = Callable[[socket.socket, dict[str, Any]], None]


# -- upstreams ---------------------------------------------------------------------------------


class Backend:
    """A TCP server on 127.0.0.1 that runs ``script(sock, report)`` on each connection
    (over TLS if given a context) and puts the report on ``results``."""

    def __init__(self, script: Script, *, tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.tls = tls
        self.results: queue.Queue[dict[str, Any]] = queue.Queue()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        report: dict[str, Any] = {}
        conn.settimeout(TIMEOUT)
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            self.script(conn, report)
        except Exception as e:  # reported to the test, which fails with it
            report["error"] = f"{type(e).__name__}: {e}"
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            self.results.put(report)

    def result(self) -> dict[str, Any]:
        report = self.results.get(timeout=TIMEOUT)
        if "error" in report:
            raise AssertionError(f"upstream failed: {report['error']} ({report})")
        return report

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


def read_to_end(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(256 * KiB)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, have = [], 0
    while have < n:
        data = sock.recv(min(256 * KiB, n - have))
        if not data:
            raise AssertionError(f"end of file after {have} of {n} bytes")
        chunks.append(data)
        have += len(data)
    return b"".join(chunks)


def send_pieces(sock: socket.socket, data: bytes, piece: int) -> None:
    for i in range(0, len(data), piece):
        sock.sendall(data[i : i + piece])


def echo(sock: socket.socket, report: dict[str, Any]) -> None:
    """Send back whatever arrives, until end of file; then half-close and keep the count."""
    received = 0
    while True:
        data = sock.recv(256 * KiB)
        if not data:
            break
        received += len(data)
        sock.sendall(data)
    report["received"] = received
    sock.shutdown(socket.SHUT_WR)


def tiny_echo(sock: socket.socket, report: dict[str, Any]) -> None:
    """Echo one byte per write."""
    received = b""
    while True:
        data = sock.recv(4096)
        if not data:
            break
        received += data
        for i in range(len(data)):
            sock.sendall(data[i : i + 1])
    report["received"] = received
    sock.shutdown(socket.SHUT_WR)


def named(name: bytes) -> Script:
    """Say who this upstream is, then echo."""

    def script(sock: socket.socket, report: dict[str, Any]) -> None:
        sock.sendall(name + b"\n")
        echo(sock, report)
        report["name"] = name

    return script


def proxied(sock: socket.socket, report: dict[str, Any]) -> None:
    """Read the PROXY v2 header, report it, then echo."""
    buf = b""
    header: ProxyHeader | None = None
    while header is None:
        data = sock.recv(4096)
        if not data:
            raise AssertionError(f"end of file in the PROXY header after {buf!r}")
        buf += data
        header = decode_v2(buf)
    report["header"] = header
    rest = buf[header.size :]
    if rest:
        sock.sendall(rest)
    echo(sock, report)


class Scripted:
    """The script of the next connection is set by the test."""

    def __init__(self) -> None:
        self.next: Script = echo

    def __call__(self, sock: socket.socket, report: dict[str, Any]) -> None:
        self.next(sock, report)


# -- the shared gateway ------------------------------------------------------------------------


class World:
    """The PKI, upstreams and gateway every test in this module uses."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tcp-", dir=os.getcwd()))
        pki = self.pki = TestPKI(self.dir / "pki")
        # The gateway's certificate also names a. and b.example.org, for SNI in terminate mode.
        pki.ca.issue_server(
            ["localhost", "a.example.org", "b.example.org"], ["127.0.0.1", "::1"]
        ).write(pki.gate_cert, pki.gate_key)
        for name in ("prometheus", "ops", "stranger"):
            pki.client(name)
        self.scripted = Scripted()
        self.script = Backend(self.scripted)
        self.pass_echo = Backend(self.scripted)
        self.plain_a = Backend(named(b"plain-a"))
        self.plain_b = Backend(named(b"plain-b"))
        self.tls_a = Backend(named(b"tls-a"), tls=self.server_context("a.example.org"))
        self.tls_b = Backend(named(b"tls-b"), tls=self.server_context("b.example.org"))
        self.proxy = Backend(proxied)
        self.single = Backend(named(b"single"))
        self.ops = Backend(named(b"ops"))
        self.backends = [
            self.script,
            self.pass_echo,
            self.plain_a,
            self.plain_b,
            self.tls_a,
            self.tls_b,
            self.proxy,
            self.single,
            self.ops,
        ]
        self.audit = self.dir / "gate" / "audit.jsonl"
        self.gate = GatewayProcess(self.dir / "gate", self.config())
        self.gate.start()

    def server_context(self, name: str) -> ssl.SSLContext:
        cert, key = self.dir / f"{name}.pem", self.dir / f"{name}-key.pem"
        self.pki.ca.issue_server([name]).write(cert, key)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    def config(self) -> str:
        pki = self.pki
        cert, key, ca = (json.dumps(str(p)) for p in (pki.gate_cert, pki.gate_key, pki.ca_cert))
        return f"""\
tls: {{certificate: {cert}, key: {key}, client_ca: {ca}}}
admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
listeners:
  - {{name: terminate, protocol: tcp, endpoint: "tcp:0:interface=127.0.0.1", route: script}}
  - name: pass
    protocol: tcp
    mode: passthrough
    endpoint: "tcp:0:interface=127.0.0.1"
    sni: {{echo.example.org: pass-echo, a.example.org: tls-a, b.example.org: tls-b}}
  - name: by-name
    protocol: tcp
    endpoint: "tcp:0:interface=127.0.0.1"
    sni: {{a.example.org: plain-a, b.example.org: plain-b}}
  - {{name: proxied, protocol: tcp, endpoint: "tcp:0:interface=127.0.0.1", route: proxied,
     proxy_protocol: v2}}
  - {{name: limited, protocol: tcp, endpoint: "tcp:0:interface=127.0.0.1", route: single}}
  - {{name: ops-only, protocol: tcp, endpoint: "tcp:0:interface=127.0.0.1", route: ops-only}}
identities:
  prometheus: {{cert: {{uri: "spiffe://promgate.local/prometheus"}}, roles: [scraper]}}
  ops: {{cert: {{cn: ops}}}}
routes:
  script: {{allow: ["role:scraper"], targets: {{static: ["{self.script.address}"]}}}}
  pass-echo: {{allow: ["sni:echo.example.org"], targets: {{static: ["{self.pass_echo.address}"]}}}}
  tls-a: {{allow: ["sni:a.example.org"], targets: {{static: ["{self.tls_a.address}"]}}}}
  tls-b: {{allow: ["sni:*"], targets: {{static: ["{self.tls_b.address}"]}}}}
  plain-a: {{allow: [prometheus], targets: {{static: ["{self.plain_a.address}"]}}}}
  plain-b: {{allow: [prometheus], targets: {{static: ["{self.plain_b.address}"]}}}}
  proxied: {{allow: [prometheus], targets: {{static: ["{self.proxy.address}"]}}}}
  single:
    allow: [prometheus]
    limits: {{max_concurrent: 1}}
    targets: {{static: ["{self.single.address}"]}}
  ops-only: {{allow: [ops], targets: {{static: ["{self.ops.address}"]}}}}
audit: {{path: audit.jsonl, key_file: {json.dumps(str(pki.audit_key))}, fsync: always}}
"""

    def stop(self) -> None:
        self.gate.stop()
        for backend in self.backends:
            backend.stop()


_world: World | None = None


def world() -> World:
    global _world
    if _world is None:
        _world = World()
        atexit.register(_world.stop)
    return _world


# -- clients -----------------------------------------------------------------------------------


def address_of(listener: str) -> tuple[str, int]:
    host, _, port = world().gate.address(listener).rpartition(":")
    return host, int(port)


@contextlib.contextmanager
def tls_client(
    listener: str, identity: str | None = "prometheus", server_name: str = "localhost"
) -> Iterator[ssl.SSLSocket]:
    """A verified mutual-TLS connection to a terminate-mode listener."""
    ctx = world().pki.client_context(identity)
    raw = connect(listener)
    tls = ctx.wrap_socket(raw, server_hostname=server_name)
    try:
        yield tls
    finally:
        tls.close()


@contextlib.contextmanager
def plain_client(listener: str) -> Iterator[socket.socket]:
    sock = connect(listener)
    try:
        yield sock
    finally:
        sock.close()


#: The audit log's last sequence number just before each local address connected: the
#: kernel may hand an ephemeral port out again, so an older record can share the address.
_SEQ_AT_CONNECT: dict[str, int] = {}


def connect(listener: str) -> socket.socket:
    """A TCP connection to ``listener``, noting where the audit log stood before it."""
    w = world()
    mark = w.gate.last_audit_seq(w.audit)
    sock = socket.create_connection(address_of(listener), timeout=TIMEOUT)
    _SEQ_AT_CONNECT[local_address(sock)] = mark
    return sock


def local_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def connection_record(peer: str) -> dict[str, Any]:
    """The audit record of the connection from ``peer`` (written when it ends)."""
    w = world()
    after = _SEQ_AT_CONNECT.get(peer, 0)
    return w.gate.wait_for_audit_record(
        w.audit,
        lambda r: r["event"] == "connection" and r.get("peer") == peer and r["seq"] > after,
        timeout=TIMEOUT,
    )


def refused(sock: socket.socket) -> bool:
    """Reading a refused connection gives an end of file or a reset, never data."""
    try:
        return sock.recv(1) == b""
    except (ConnectionError, ssl.SSLError):
        return True


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the tests ---------------------------------------------------------------------------------


class TerminateTests(SynchronousTestCase):
    """Terminate mode: mutual TLS ends at the gateway, plaintext goes to the upstream."""

    def setUp(self) -> None:
        self.world = world()

    def exchange(self, upload: bytes, download: bytes, piece: int) -> None:
        """Upload, then download after the upstream has everything; the upstream's FIN
        reaches the client as close_notify, and the client can still write after it."""
        w = self.world

        def script(sock: socket.socket, report: dict[str, Any]) -> None:
            report["upload"] = read_exactly(sock, len(upload))
            send_pieces(sock, download, piece)
            sock.shutdown(socket.SHUT_WR)
            report["after"] = read_to_end(sock)

        w.scripted.next = script
        with tls_client("terminate") as tls:
            peer = local_address(tls)
            send_pieces(tls, upload, piece)
            received = read_to_end(tls)  # until the gateway's close_notify
            self.assertEqual((len(received), sha(received)), (len(download), sha(download)))
            tls.sendall(b"written after the upstream's FIN")
            tls.unwrap()
        report = w.script.result()
        self.assertEqual(sha(report["upload"]), sha(upload))
        self.assertEqual(report["after"], b"written after the upstream's FIN")
        record = connection_record(peer)
        self.assertEqual(
            (record["identity"], record["route"], record["decision"], record["reason"]),
            ("prometheus", "script", "allow", "upstream_closed"),
        )
        self.assertEqual(
            (record["bytes_in"], record["bytes_out"]), (len(upload) + 32, len(download))
        )
        self.assertEqual(record["target"], w.script.address)
        self.assertEqual(record["cert_subject"], "CN=prometheus")
        self.assertEqual(record["server_name"], "localhost")

    def test_large_both_ways(self) -> None:
        """Several MB of random bytes up and down, byte exact."""
        self.exchange(os.urandom(5 * MiB + 17), os.urandom(3 * MiB + 5), 64 * KiB)

    def test_tiny_writes_both_ways(self) -> None:
        """One-byte writes up and down, byte exact."""
        self.exchange(os.urandom(300), os.urandom(300), 1)

    def test_client_closes_first(self) -> None:
        """The client's close_notify: the upstream gets everything sent, then a FIN."""
        w = self.world
        w.scripted.next = lambda sock, report: report.update(received=read_to_end(sock))
        payload = os.urandom(2 * MiB)
        with tls_client("terminate") as tls:
            peer = local_address(tls)
            tls.sendall(payload)
            tls.unwrap()
        self.assertEqual(sha(w.script.result()["received"]), sha(payload))
        record = connection_record(peer)
        self.assertEqual((record["reason"], record["bytes_in"]), ("client_closed", len(payload)))

    def test_sni_routing(self) -> None:
        """The server name of the handshake picks the route."""
        for name, expected in (("a.example.org", b"plain-a\n"), ("b.example.org", b"plain-b\n")):
            with tls_client("by-name", server_name=name) as tls:
                self.assertEqual(read_exactly(tls, len(expected)), expected)
                peer = local_address(tls)
                tls.unwrap()
            record = connection_record(peer)
            self.assertEqual(record["server_name"], name)

    def test_client_offering_alpn(self) -> None:
        """A client offering ALPN (Go's HTTP client offers h2 and http/1.1) is served; the
        gateway selects no protocol: what is relayed is the client's business."""
        ctx = self.world.pki.client_context("ops")
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        with (
            socket.create_connection(address_of("ops-only"), timeout=TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            self.assertEqual(read_exactly(tls, 4), b"ops\n")
            self.assertIsNone(tls.selected_alpn_protocol())

    def test_unknown_identity_refused(self) -> None:
        """A valid certificate that names no identity: closed at once, audited."""
        with tls_client("terminate", "stranger") as tls:
            peer = local_address(tls)
            self.assertTrue(refused(tls))
        record = connection_record(peer)
        self.assertEqual((record["decision"], record["reason"]), ("deny", "unknown_identity"))
        self.assertEqual(record["cert_subject"], "CN=stranger")

    def test_not_allowed_refused(self) -> None:
        """A known identity the route does not allow: closed at once, authz_denied."""
        with tls_client("ops-only", "prometheus") as tls:
            peer = local_address(tls)
            self.assertTrue(refused(tls))
        record = connection_record(peer)
        self.assertEqual(
            (record["decision"], record["reason"], record["route"]),
            ("deny", "authz_denied", "ops-only"),
        )
        with tls_client("ops-only", "ops") as tls:
            self.assertEqual(read_exactly(tls, 4), b"ops\n")

    def test_concurrency_limit_refused(self) -> None:
        """max_concurrent: 1 holds one tunnel; the next connection is closed, audited."""
        with tls_client("limited") as first:
            self.assertEqual(read_exactly(first, 7), b"single\n")
            with tls_client("limited") as second:
                peer = local_address(second)
                self.assertTrue(refused(second))
            record = connection_record(peer)
            self.assertEqual(
                (record["decision"], record["reason"], record["route"]),
                ("deny", "concurrency_limited", "single"),
            )
            first.unwrap()
        self.world.single.result()

    def test_proxy_header(self) -> None:
        """The upstream gets a PROXY v2 header: the client's address, the listener's, the
        verified certificate (PP2_TYPE_SSL) and the identity (0xE0), then the bytes."""
        w = self.world
        with tls_client("proxied") as tls:
            tls.sendall(b"ping")
            self.assertEqual(read_exactly(tls, 4), b"ping")
            client = tls.getsockname()[:2]
            tls.unwrap()
        header: ProxyHeader = w.proxy.result()["header"]
        host, port = address_of("proxied")
        self.assertEqual(header.source, (client[0], client[1]))
        self.assertEqual(header.destination, (host, port))
        self.assertEqual(header.tlv(PP2_TYPE_PROMGATE_IDENTITY), b"prometheus")
        self.assertEqual(header.tlv(PP2_TYPE_AUTHORITY), b"localhost")
        ssl_value = header.tlv(PP2_TYPE_SSL)
        assert ssl_value is not None
        flags, verify, subs = decode_ssl_tlv(ssl_value)
        self.assertEqual((flags, verify), (0x03, 0))
        self.assertIn((0x22, b"prometheus"), subs)

    def test_metrics(self) -> None:
        """Connections and bytes are counted per route on the admin listener."""
        with tls_client("ops-only", "ops") as tls:
            self.assertEqual(read_exactly(tls, 4), b"ops\n")
            peer = local_address(tls)
            tls.unwrap()
        connection_record(peer)
        response = https_get(self.world.gate.address("admin"), "/metrics", None)
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.body.decode())
            for s in family.samples
        }
        closed = samples[
            (
                "promgate_tcp_connections_total",
                (
                    ("identity", "ops"),
                    ("listener", "ops-only"),
                    ("reason", "client_closed"),
                    ("route", "ops-only"),
                ),
            )
        ]
        self.assertGreaterEqual(closed, 1)
        out = samples[("promgate_bytes_total", (("direction", "out"), ("route", "ops-only")))]
        self.assertGreaterEqual(out, 4)


class PassthroughTests(SynchronousTestCase):
    """Passthrough: the client's TLS goes through untouched, routed by its ClientHello."""

    def setUp(self) -> None:
        self.world = world()

    def echo_through(self, payload: bytes, piece: int, script: Script) -> None:
        """A real ClientHello, then ``payload``, then a FIN; the echo comes back whole,
        then the upstream's FIN."""
        w = self.world
        w.scripted.next = script
        hello = python_client_hello("echo.example.org")
        sent = hello + payload
        with plain_client("pass") as sock:
            peer = local_address(sock)
            received: list[bytes] = []
            reader = threading.Thread(target=lambda: received.append(read_to_end(sock)))
            reader.start()
            sock.sendall(hello)
            send_pieces(sock, payload, piece)
            sock.shutdown(socket.SHUT_WR)
            reader.join(TIMEOUT)
            self.assertFalse(reader.is_alive(), "no end of file from the gateway")
        self.assertEqual((len(received[0]), sha(received[0])), (len(sent), sha(sent)))
        w.pass_echo.result()
        record = connection_record(peer)
        self.assertEqual(
            (record["route"], record["decision"], record["reason"], record["server_name"]),
            ("pass-echo", "allow", "client_closed", "echo.example.org"),
        )
        self.assertEqual((record["bytes_in"], record["bytes_out"]), (len(sent), len(sent)))
        self.assertNotIn("identity", record)

    def test_large_echo_with_half_close(self) -> None:
        """Several MB each way at once, byte exact, the FIN passed on both ways."""
        self.echo_through(os.urandom(6 * MiB + 3), 64 * KiB, echo)

    def test_tiny_writes(self) -> None:
        """One-byte writes both ways, byte exact."""
        self.echo_through(os.urandom(400), 1, tiny_echo)

    def test_sni_routing_to_tls_backends(self) -> None:
        """Each server name reaches its own TLS backend, whose certificate the client
        verifies end to end: the gateway never touched the TLS."""
        ctx = ssl.create_default_context(cafile=str(self.world.pki.ca_cert))
        for name, expected in (("a.example.org", b"tls-a\n"), ("b.example.org", b"tls-b\n")):
            with plain_client("pass") as raw, ctx.wrap_socket(raw, server_hostname=name) as tls:
                cert = tls.getpeercert()
                self.assertIn(("DNS", name), cert["subjectAltName"])
                self.assertEqual(read_exactly(tls, len(expected)), expected)
                tls.sendall(b"hello")
                self.assertEqual(read_exactly(tls, 5), b"hello")
                peer = local_address(tls)
            record = connection_record(peer)
            self.assertEqual(record["server_name"], name)

    def test_unknown_server_name_refused(self) -> None:
        """A server name the listener does not route is closed at once and audited."""
        with plain_client("pass") as sock:
            peer = local_address(sock)
            sock.sendall(python_client_hello("c.example.org"))
            self.assertTrue(refused(sock))
        record = connection_record(peer)
        self.assertEqual(
            (record["decision"], record["reason"], record["server_name"]),
            ("deny", "unknown_server_name", "c.example.org"),
        )

    def test_not_tls_refused(self) -> None:
        """Plain text to a passthrough listener is refused with the reason."""
        with plain_client("pass") as sock:
            peer = local_address(sock)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(refused(sock))
        self.assertEqual(connection_record(peer)["reason"], "plain_http")
