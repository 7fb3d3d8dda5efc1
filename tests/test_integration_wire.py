"""Integration: the real ``twistd promgate`` against an upstream whose responses are
malformed on purpose, on 127.0.0.1.

Chunk extensions with a bare CR, a chunk size followed by spaces, trailers without a
colon, folded trailers, a ``Content-Length`` trailer: Prometheus itself refuses these
("malformed MIME header"), so the gateway must never relay them as a good scrape. A
malformed head is a 502; a malformed body after the head was relayed cuts the connection.
Either way the audit record says ``upstream_malformed`` with the precise problem. The same
holds for the forward proxy's absolute-form GET, which shares the relay.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from promgate.testing import FakeExporter, GatewayProcess, TestPKI

CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
GOOD_BODY = b"# TYPE up gauge\nup 1\n" * 50

#: Response bodies whose chunked framing another parser reads differently: path, body,
#: what the audit record's detail says.
QUIRKS = {
    "/ext-bare-cr": (b"5;a=b\rc\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
    "/ext-nul": (b"5;a\x00\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
    "/size-spaces": (b"5   \r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
    "/trailer-no-colon": (b"5\r\nhello\r\n0\r\nnot a field\r\n\r\n", "malformed trailer field"),
    "/trailer-folded": (b"5\r\nhello\r\n0\r\nX-A: 1\r\n folded\r\n\r\n", "malformed trailer"),
    "/trailer-length": (b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n", "not allowed"),
    "/late-quirk": (
        b"1000\r\n" + b"a" * 0x1000 + b"\r\n" + b"5 \r\nhello\r\n0\r\n\r\n",
        "malformed chunk-size line",
    ),
}
#: Malformed response heads: path, head, what the detail says.
BAD_HEADS = {
    "/two-lengths": (b"Content-Length: 2\r\nContent-Length: 2", "more than one Content-Length"),
    "/gzip-coding": (b"Transfer-Encoding: gzip", "unsupported Transfer-Encoding"),
    "/length-and-chunked": (
        b"Content-Length: 2\r\nTransfer-Encoding: chunked",
        "both Content-Length and Transfer-Encoding",
    ),
    "/folded-header": (b"X-A: 1\r\n folded: 2\r\nContent-Length: 2", "malformed response header"),
}

_cleanups: list[Callable[[], object]] = []


@atexit.register
def _run_cleanups() -> None:
    while _cleanups:
        with contextlib.suppress(Exception):
            _cleanups.pop()()


class _Setup:
    """One gateway (an ``http`` and a ``forward`` listener, mutual TLS) and one upstream
    that answers each path with fixed raw bytes."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wire-", dir=os.getcwd()))
        self.pki = TestPKI(self.dir / "pki")
        routes: dict[str, str] = {}
        bodies: dict[str, bytes] = {}
        for path, (body, _) in QUIRKS.items():
            routes[path], bodies[path] = "raw", CHUNKED_HEAD + body
        for path, (fields, _) in BAD_HEADS.items():
            routes[path], bodies[path] = "raw", b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n\r\nok"
        good = b"".join(
            b'%x;ext="v"\r\n' % len(GOOD_BODY[i : i + 100]) + GOOD_BODY[i : i + 100] + b"\r\n"
            for i in range(0, len(GOOD_BODY), 100)
        )
        routes["/good"] = "raw"
        bodies["/good"] = CHUNKED_HEAD + good + b"0\r\nX-Trailer: t\r\n\r\n"
        self.upstream = FakeExporter(routes, bodies)
        _cleanups.append(self.upstream.stop)
        self.paths = sorted(routes)
        self.audit_log = self.dir / "audit.jsonl"
        pki = self.pki
        config = f"""
tls: {{certificate: {json.dumps(str(pki.gate_cert))}, key: {json.dumps(str(pki.gate_key))},
       client_ca: {json.dumps(str(pki.ca_cert))}}}
admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
listeners:
  - {{name: scrape, protocol: http, endpoint: "tcp:0:interface=127.0.0.1"}}
  - {{name: egress, protocol: forward, endpoint: "tcp:0:interface=127.0.0.1"}}
identities:
  prometheus: {{cert: {{uri: "spiffe://promgate.local/prometheus"}}}}
routes:
  quirky:
    allow: [prometheus]
    paths: {json.dumps(self.paths)}
    targets: {{static: ["{self.upstream.address}"]}}
audit: {{path: {json.dumps(str(self.audit_log))}, key_file: {json.dumps(str(pki.audit_key))}}}
"""
        self.gateway = GatewayProcess(self.dir / "gateway", config)
        _cleanups.append(self.gateway.stop)
        self.gateway.start()
        self.context = pki.client_context("prometheus")

    def exchange(self, listener: str, target: str) -> bytes:
        """Send one ``GET target`` with ``Connection: close``; everything that came back
        before the gateway closed or cut the connection."""
        host, _, port = self.gateway.address(listener).rpartition(":")
        raw = f"GET {target} HTTP/1.1\r\nHost: gate\r\nConnection: close\r\n\r\n".encode()
        received = b""
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            tls = self.context.wrap_socket(sock, server_hostname=host)
            tls.sendall(raw)
            while len(received) < 1 << 20:  # bounded: every answer here is far smaller
                try:
                    data = tls.recv(65536)
                except (ssl.SSLError, ConnectionError):
                    break
                if not data:
                    break
                received += data
        return received

    def scrape(self, path: str) -> bytes:
        address = self.upstream.address.replace(":", "%3A")
        return self.exchange("scrape", f"/scrape?route=quirky&target={address}&path={path}")

    def forward(self, path: str) -> bytes:
        return self.exchange("egress", f"http://{self.upstream.address}{path}")

    def record(self, listener: str, path: str) -> dict[str, Any]:
        """The audit record of the (only) request for ``path`` on ``listener``."""
        return self.gateway.wait_for_audit_record(
            self.audit_log,
            lambda r: r.get("listener") == listener and r.get("path") == path,
        )


_SETUP: list[_Setup] = []


def setup() -> _Setup:
    if not _SETUP:
        _SETUP.append(_Setup())
    return _SETUP[0]


def _complete_chunked(received: bytes) -> bool:
    """Whether ``received`` holds a whole chunked response (its last chunk arrived)."""
    return received.endswith(b"\r\n0\r\n\r\n") or received.endswith(b"\r\n\r\n0\r\n\r\n")


class MalformedBodyTests(SynchronousTestCase):
    """Malformed chunked framing is never relayed, and never audited as ``ok``."""

    def assertCut(self, received: bytes, listener: str, path: str, detail: str) -> None:
        self.assertFalse(_complete_chunked(received), received[-200:])
        body = QUIRKS[path][0]
        self.assertNotIn(body[body.rindex(b"hello") :], received)  # not relayed as sent
        record = setup().record(listener, path)
        self.assertEqual((record["decision"], record["reason"]), ("allow", "upstream_malformed"))
        self.assertIn("chunked body: ", record["detail"])
        self.assertIn(detail, record["detail"])

    def test_scrape(self) -> None:
        """Each quirk, through ``/scrape``: a cut connection, audited with its detail."""
        for path, (_, detail) in QUIRKS.items():
            self.assertCut(setup().scrape(path), "scrape", path, detail)

    def test_forward(self) -> None:
        """The same through the forward proxy's absolute-form GET."""
        for path, (_, detail) in QUIRKS.items():
            self.assertCut(setup().forward(path), "egress", path, detail)


class MalformedHeadTests(SynchronousTestCase):
    """A malformed response head is a 502 with a constant body; the detail is audited."""

    def test_scrape_and_forward(self) -> None:
        for path, (_, detail) in BAD_HEADS.items():
            for listener, received in (
                ("scrape", setup().scrape(path)),
                ("egress", setup().forward(path)),
            ):
                head, _, body = received.partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 502 "), (listener, path, head))
                self.assertEqual(body, b"malformed upstream response\n")
                record = setup().record(listener, path)
                self.assertEqual((record["status"], record["reason"]), (502, "upstream_malformed"))
                self.assertIn(detail, record["detail"])


class WellFormedTests(SynchronousTestCase):
    """A valid chunked body with extensions and trailers arrives whole, in the gateway's
    own chunks, without the upstream's extensions or trailers."""

    def test_reframed(self) -> None:
        for listener, received in (
            ("scrape", setup().scrape("/good")),
            ("egress", setup().forward("/good")),
        ):
            head, _, rest = received.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
            self.assertIn(b"\r\nTransfer-Encoding: chunked", head)
            self.assertTrue(rest.endswith(b"\r\n0\r\n\r\n"), rest[-50:])
            self.assertNotIn(b"ext=", rest)
            self.assertNotIn(b"X-Trailer", rest)
            payload, pos = b"", 0
            for _ in range(len(rest)):  # bounded: each step consumes at least a line
                line_end = rest.index(b"\r\n", pos)
                size = int(rest[pos:line_end], 16)
                pos = line_end + 2
                if size == 0:
                    break
                payload += rest[pos : pos + size]
                self.assertEqual(rest[pos + size : pos + size + 2], b"\r\n")
                pos += size + 2
            self.assertEqual(payload, GOOD_BODY)
            record = setup().record(listener, "/good")
            self.assertEqual((record["status"], record["reason"]), (200, "ok"))
