"""Tests for the reverse gateway, in memory: routing, refusals, limits, audit, deadlines,
keep-alive, back-pressure, and mutual TLS with real handshakes over iosim."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    TimeoutError,
)
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from promgate.audit import AuditEvent, MemoryAuditSink
from promgate.config.model import (
    Admin,
    Audit,
    CertMatch,
    Config,
    Identity,
    Limits,
    Listener,
    Route,
    Target,
    TLSFiles,
)
from promgate.http.server import DownstreamProtocol, HTTPListenerFactory
from promgate.http.upstream import UpstreamPool
from promgate.http.wire import MAX_HEAD
from promgate.identity import Recognition
from promgate.listeners.scrape import ReverseGateway
from promgate.metrics import Metrics
from promgate.ratelimit import RateLimiter
from promgate.testing import PendingUpstreams, TestPKI
from promgate.tls import server_tls

NODE = Target("10.0.0.5:9100", {"az": "a"})
OTHER_NODE = Target("10.0.0.6:9100")
PROMETHEUS = Identity(
    "prometheus",
    cert=(CertMatch(uri="spiffe://promgate.local/prometheus"),),
    roles=frozenset({"scraper"}),
)
OPS = Identity("ops", cert=(CertMatch(cn="ops"),), roles=frozenset({"admin"}))
ROUTES = {
    "node": Route(
        "node",
        (NODE, OTHER_NODE),
        paths=("/metrics", "/metrics/extra"),
        allow=("role:scraper",),
        timeout=10.0,
        labels={"team": "infra"},
    ),
    "blackbox": Route(
        "blackbox",
        (Target("127.0.0.1:9115"),),
        metrics_path="/probe",
        paths=("/probe",),
        params=("module", "target_url"),
        allow=("prometheus",),
    ),
    "admin": Route("admin", (Target("127.0.0.1:9099"),), allow=("ops",)),
    "limited": Route(
        "limited",
        (NODE,),
        allow=("role:scraper",),
        limits=Limits(rate=1.0, burst=2, per="identity"),
    ),
    "single": Route(
        "single",
        (NODE,),
        allow=("role:scraper",),
        limits=Limits(max_concurrent=1),
    ),
}
SCRAPE = b"/scrape?route=node&target=10.0.0.5%3A9100"
UPSTREAM_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: 10.0.0.5:9100\r\n\r\n"
METRICS = b"# TYPE up gauge\nup 1\n"
OK_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
    b"Content-Length: %d\r\n\r\n" % len(METRICS)
) + METRICS


def make_config(
    tls: TLSFiles | None = None, on_failure: str = "deny", **listener: Any
) -> tuple[Listener, Config]:
    """A listener and a whole configuration around ROUTES."""
    lst = Listener("scrape", "http", "tcp:9443", tls, **listener)
    config = Config(
        source=Path("promgate.yaml"),
        listeners=(lst,),
        identities={"prometheus": PROMETHEUS, "ops": OPS},
        routes=ROUTES,
        admin=Admin(),
        audit=Audit(Path("audit.jsonl"), Path("audit.key"), on_failure=on_failure),
    )
    return lst, config


def get(target: bytes, *headers: bytes, method: bytes = b"GET", version: bytes = b"1.1") -> bytes:
    """A request head as Prometheus would send it."""
    lines = [b"%s %s HTTP/%s" % (method, target, version)]
    if version == b"1.1":
        lines.append(b"Host: gate.example.org:9443")
    lines.extend(headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


@attrs.frozen
class Response:
    """One HTTP response as the client saw it."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes
    raw: bytes


def parse_responses(data: bytes) -> list[Response]:
    """Split what the client received into complete responses (Content-Length or chunked)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            assert name.lower() not in headers, line
            headers[name.lower()] = value.strip()
        if b"content-length" in headers:
            n = int(headers[b"content-length"])
            body, data = rest[:n], rest[n:]
            raw_len = len(head) + 4 + n
        elif headers.get(b"transfer-encoding") == b"chunked":
            body, pos = b"", 0
            while True:
                size_line, _, _ = rest[pos:].partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                pos += len(size_line) + 2
                if size == 0:
                    pos = rest.index(b"\r\n\r\n", pos - 2) + 4
                    break
                body += rest[pos : pos + size]
                pos += size + 2
            data = rest[pos:]
            raw_len = len(head) + 4 + pos
        else:
            body, data = rest, b""
            raw_len = len(head) + 4 + len(rest)
        out.append(Response(status, headers, body, (head + b"\r\n\r\n" + rest)[:raw_len]))
    return out


class GatewayTestCase(SynchronousTestCase):
    """A ReverseGateway with the real upstream pool on a memory reactor (whose connection
    attempts the test completes), a clock, an in-memory audit sink."""

    tls: TLSFiles | None = None
    on_failure = "deny"

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)
        self.audit = MemoryAuditSink()
        self.limiter = RateLimiter(self.clock)
        self.metrics = Metrics()
        self.pool = UpstreamPool(self.clock)
        self.upstreams = PendingUpstreams(self.clock)
        self.listener, self.config = make_config(self.tls, self.on_failure)
        self.gateway = ReverseGateway(
            self.listener,
            self.config,
            clock=self.clock,
            limiter=self.limiter,
            audit=self.audit,
            metrics=self.metrics,
            pool=self.pool,
        )

    # -- a plain-text client connection -----------------------------------------------------

    def client(
        self, identity: Identity | None = PROMETHEUS, reason: str = "ok"
    ) -> tuple[DownstreamProtocol, StringTransport]:
        """A downstream connection whose caller is already recognised as ``identity``."""
        proto = HTTPListenerFactory(self.gateway.http).buildProtocol(None)
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "192.0.2.1", 9443),
            peerAddress=IPv4Address("TCP", "198.51.100.7", 40000),
        )
        proto.makeConnection(transport)
        proto.recognition = Recognition(identity, reason if identity is None else "ok")
        return proto, transport

    def assertNoUpstreamAttempt(self) -> None:
        """No upstream connection is being asked for, nor was given up."""
        self.assertEqual((self.upstreams.pending, self.upstreams.cancelled), ([], []))

    def responses(self, transport: StringTransport) -> list[Response]:
        return parse_responses(transport.value())

    def response(self, transport: StringTransport) -> Response:
        (response,) = self.responses(transport)
        return response

    def requests(self) -> list[AuditEvent]:
        return [e for e in self.audit.events if e.event == "request"]

    def scrape(
        self, target: bytes = SCRAPE, *headers: bytes, **kw: Any
    ) -> tuple[DownstreamProtocol, StringTransport]:
        proto, transport = self.client()
        proto.dataReceived(get(target, *headers, **kw))
        return proto, transport

    def assertRefused(
        self,
        transport: StringTransport,
        status: int,
        reason: str,
        *,
        route: str | None = None,
        body: bytes | None = None,
    ) -> Response:
        """One response with ``status``, audited as a deny with ``reason``; no upstream."""
        response = self.response(transport)
        self.assertEqual(response.status, status)
        if body is not None:
            self.assertEqual(response.body, body)
        (event,) = self.requests()
        self.assertEqual(
            (event.decision, event.reason, event.status, event.route),
            ("deny", reason, status, route),
        )
        self.assertEqual(event.bytes_out, len(response.raw))
        self.assertNoUpstreamAttempt()
        for name in ROUTES:
            self.assertEqual(self.limiter.in_flight(name), 0)
        return response


class ScrapeTests(GatewayTestCase):
    """GET /scrape relays one scrape from the upstream, byte for byte, and audits it."""

    def test_exchanges_counted_while_relayed(self) -> None:
        """The gateway counts a scrape as in flight (what shutdown drains) from its start
        until its response is written, success or failure."""
        self.scrape()
        self.assertEqual(self.gateway.http.exchanges, 1)
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(OK_RESPONSE)
        self.assertEqual(self.gateway.http.exchanges, 0)
        _, transport = self.scrape()  # never connected: ends at the scrape timeout
        self.assertEqual(self.gateway.http.exchanges, 1)
        self.clock.advance(60)
        self.assertEqual(self.response(transport).status, 504)
        self.assertEqual(self.gateway.http.exchanges, 0)

    def test_happy_path(self) -> None:
        """A scrape relays the body byte for byte and audits who, what, allow and bytes."""
        _, transport = self.scrape()
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.upstreams.pending, [NODE.address])
        upstream, upstream_transport = self.upstreams.accept()
        self.assertEqual(upstream.key, ("node", NODE.address))
        self.assertEqual(upstream_transport.value(), UPSTREAM_REQUEST)
        self.clock.advance(0.5)
        upstream.dataReceived(OK_RESPONSE)
        response = self.response(transport)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, METRICS)
        self.assertEqual(response.headers[b"content-type"], b"text/plain; version=0.0.4")
        self.assertEqual(response.headers[b"connection"], b"keep-alive")
        (event,) = self.audit.events
        self.assertEqual(
            event,
            AuditEvent(
                event="request",
                listener="scrape",
                peer="198.51.100.7:40000",
                identity="prometheus",
                route="node",
                target="10.0.0.5:9100",
                method="GET",
                path="/metrics",
                decision="allow",
                reason="ok",
                status=200,
                bytes_in=len(get(SCRAPE)),
                bytes_out=len(transport.value()),
                duration=0.5,
            ),
        )
        self.assertEqual(self.limiter.in_flight("node"), 0)
        self.assertEqual(self.pool.idle_count(), 1)
        self.assertFalse(transport.disconnecting)

    def test_chunked_reframed(self) -> None:
        """A chunked upstream body reaches an HTTP/1.1 client in chunks of the gateway's
        own, one per upstream read: no extension, no trailer of the upstream's."""
        _, transport = self.scrape()
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        upstream.dataReceived(b"5;x=y\r\nhello\r\n3\r\n, w\r\n")
        upstream.dataReceived(b'2;q="a"\r\n!!\r\n0\r\nX-T: 1\r\n\r\n')
        self.assertTrue(
            transport.value().endswith(
                b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
                b"8\r\nhello, w\r\n2\r\n!!\r\n0\r\n\r\n"
            ),
            transport.value(),
        )
        self.assertEqual(self.response(transport).body, b"hello, w!!")
        (event,) = self.requests()
        self.assertEqual((event.status, event.reason), (200, "ok"))
        self.assertEqual(event.bytes_out, len(transport.value()))
        self.assertEqual(self.pool.idle_count(), 1)

    def test_chunked_malformed_mid_body(self) -> None:
        """Malformed chunk framing after the head was relayed: the chunks already decoded
        went out, the rest never does, the client connection is reset (never a clean end),
        and the audit record says upstream_malformed with the precise problem."""
        _, transport = self.scrape()
        upstream, upstream_transport = self.upstreams.accept()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        upstream.dataReceived(b"5\r\nhello\r\n")
        upstream.dataReceived(b"5;a=b\rc\r\nworld\r\n0\r\n\r\n")
        self.assertTrue(transport.value().endswith(b"\r\n\r\n5\r\nhello\r\n"))
        self.assertNotIn(b"world", transport.value())
        self.assertTrue(transport.disconnected, "client connection not cut")
        self.assertTrue(upstream_transport.disconnected)
        (event,) = self.requests()
        self.assertEqual(
            (event.decision, event.reason, event.status), ("allow", "upstream_malformed", 200)
        )
        self.assertEqual(event.detail, "chunked body: malformed chunk-size line '5;a=b\\rc'")
        self.assertEqual(self.pool.idle_count(), 0)

    def test_chunked_one_byte_at_a_time(self) -> None:
        """Fed one byte at a time, the client still gets exactly the payload, well framed."""
        _, transport = self.scrape()
        upstream, _ = self.upstreams.accept()
        body = b"5;x=y\r\nhello\r\n3\r\n, w\r\n0\r\nX-T: 1\r\n\r\n"
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(len(body)):
            upstream.dataReceived(body[i : i + 1])
        self.assertEqual(self.response(transport).body, b"hello, w")
        self.assertNotIn(b"x=y", transport.value())
        self.assertNotIn(b"X-T", transport.value())
        self.assertEqual(self.requests()[0].reason, "ok")

    def test_close_delimited_rechunked(self) -> None:
        """A close-delimited upstream body is sent chunked to an HTTP/1.1 client."""
        _, transport = self.scrape()
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nabc")
        upstream.dataReceived(b"def")
        upstream.connectionLost(Failure(ConnectionDone()))
        response = self.response(transport)
        self.assertEqual((response.status, response.body), (200, b"abcdef"))
        self.assertTrue(transport.value().endswith(b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"))
        self.assertEqual(self.requests()[0].reason, "ok")

    def test_http10_client(self) -> None:
        """An HTTP/1.0 client gets a chunked upstream's payload, close-delimited."""
        _, transport = self.scrape(SCRAPE, version=b"1.0")
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        self.assertEqual(transport.value(), b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc")
        self.assertTrue(transport.disconnecting)

    def test_head(self) -> None:
        """HEAD goes upstream as HEAD; the client gets the headers without a body."""
        _, transport = self.scrape(SCRAPE, method=b"HEAD")
        upstream, upstream_transport = self.upstreams.accept()
        self.assertTrue(upstream_transport.value().startswith(b"HEAD /metrics HTTP/1.1\r\n"))
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n")
        self.assertEqual(
            transport.value(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\nConnection: keep-alive\r\n\r\n",
        )
        self.assertEqual(self.pool.idle_count(), 1)

    def test_upstream_status_passed(self) -> None:
        """An upstream error status is relayed, audited as allowed with that status."""
        _, transport = self.scrape()
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(b"HTTP/1.1 500 Oops\r\nContent-Length: 3\r\n\r\nbad")
        response = self.response(transport)
        self.assertEqual((response.status, response.body), (500, b"bad"))
        self.assertTrue(response.raw.startswith(b"HTTP/1.1 500 Oops\r\n"))
        self.assertEqual(self.requests()[0].status, 500)

    def test_other_path_and_params(self) -> None:
        """path= picks another allowed path; the route's params pass upstream, encoded."""
        target = b"/scrape?route=blackbox&target=127.0.0.1%3A9115&module=http_2xx&target_url=a%20b"
        self.scrape(target)
        _, upstream_transport = self.upstreams.accept()
        self.assertEqual(
            upstream_transport.value().split(b"\r\n")[0],
            b"GET /probe?module=http_2xx&target_url=a+b HTTP/1.1",
        )
        self.audit.events.clear()
        self.scrape(SCRAPE + b"&path=%2Fmetrics%2Fextra")
        _, upstream_transport = self.upstreams.accept()
        self.assertTrue(upstream_transport.value().startswith(b"GET /metrics/extra HTTP/1.1\r\n"))

    def test_headers_passed_and_withheld(self) -> None:
        """Accept*, User-Agent, scrape timeout pass; credentials and cookies never do.

        (An Authorization header is the caller's credential: it must verify, and is then
        withheld too; see tests/test_credentials.py.)"""
        self.scrape(
            SCRAPE,
            b"Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
            b"Accept-Encoding: gzip",
            b"User-Agent: Prometheus/2.42.0",
            b"X-Prometheus-Scrape-Timeout-Seconds: 10",
            b"Cookie: session=secret",
            b"Proxy-Authorization: Basic c2VjcmV0",
            b"Proxy-Connection: keep-alive",
            b"X-Forwarded-For: 10.9.9.9",
            b"Connection: keep-alive",
        )
        _, upstream_transport = self.upstreams.accept()
        self.assertEqual(
            upstream_transport.value(),
            b"GET /metrics HTTP/1.1\r\n"
            b"Host: 10.0.0.5:9100\r\n"
            b"Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n"
            b"Accept-Encoding: gzip\r\n"
            b"User-Agent: Prometheus/2.42.0\r\n"
            b"X-Prometheus-Scrape-Timeout-Seconds: 10\r\n\r\n",
        )

    def test_set_cookie_not_relayed(self) -> None:
        """Hop-by-hop and cookie headers from the upstream do not reach the client."""
        _, transport = self.scrape()
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=b\r\nKeep-Alive: timeout=5\r\n"
            b"Content-Encoding: gzip\r\nContent-Length: 2\r\n\r\nok"
        )
        headers = self.response(transport).headers
        self.assertNotIn(b"set-cookie", headers)
        self.assertNotIn(b"keep-alive", headers)
        self.assertEqual(headers[b"content-encoding"], b"gzip")

    def test_on_failure_allow(self) -> None:
        """With on_failure: allow, an unhealthy audit log does not stop traffic."""
        self.listener, self.config = make_config(None, "allow")
        self.gateway = ReverseGateway(
            self.listener,
            self.config,
            clock=self.clock,
            limiter=self.limiter,
            audit=self.audit,
            metrics=self.metrics,
            pool=self.pool,
        )
        self.audit.healthy = False
        self.scrape()
        self.assertEqual(self.upstreams.pending, [NODE.address])

    def test_metrics(self) -> None:
        """A scrape is counted by listener, route and code."""
        self.scrape()
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(OK_RESPONSE)
        value = self.metrics.registry.get_sample_value(
            "promgate_requests_total",
            {"listener": "scrape", "route": "node", "identity": "prometheus", "code": "200"},
        )
        self.assertEqual(value, 1.0)


class RelayPropertyTests(GatewayTestCase):
    """Hypothesis: whatever the body and however it arrives, the client gets it unchanged."""

    @settings(max_examples=100)
    @given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=5), st.booleans())
    def test_body_byte_for_byte(self, body: bytes, cuts: list[int], chunked: bool) -> None:
        """Content-Length or chunked, any split: the client's body is the upstream's body."""
        self.setUp()  # a fresh gateway and pool for each example
        _, transport = self.scrape()
        upstream, _ = self.upstreams.accept()
        if chunked:
            framed = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
            response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed
        else:
            response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        points = sorted({0, len(response), *(min(c, len(response)) for c in cuts)})
        for a, b in itertools.pairwise(points):
            upstream.dataReceived(response[a:b])
        (received,) = self.responses(transport)
        self.assertEqual(received.body, body)
        (event,) = self.requests()
        self.assertEqual(
            (event.status, event.reason, event.bytes_out), (200, "ok", len(transport.value()))
        )


class RefusalTests(GatewayTestCase):
    """Requests the gateway answers itself, each with its status, reason and audit record."""

    def test_missing_params(self) -> None:
        """route and target are both required."""
        for target in (
            b"/scrape",
            b"/scrape?route=node",
            b"/scrape?target=a%3A1",
            b"/scrape?route=&target=x",
        ):
            self.audit.events.clear()
            _, transport = self.scrape(target)
            self.assertRefused(transport, 400, "bad_request", body=b"bad request\n")

    def test_duplicate_params(self) -> None:
        """A parameter given twice is refused rather than guessed at."""
        _, transport = self.scrape(SCRAPE + b"&route=admin")
        self.assertRefused(transport, 400, "bad_request", body=b"bad request\n")

    def test_bad_query(self) -> None:
        """A query string that is not ASCII is 400."""
        _, transport = self.scrape(SCRAPE + b"&x=\xff")
        self.assertRefused(transport, 400, "bad_request")

    def test_400_closes(self) -> None:
        """After a 400 the connection is closed."""
        _, transport = self.scrape(b"/scrape")
        self.assertEqual(self.response(transport).headers[b"connection"], b"close")
        self.assertTrue(transport.disconnecting)

    def test_404_indistinguishable(self) -> None:
        """An unknown route and a target outside the route get identical 404 responses."""
        _, unknown_route = self.scrape(b"/scrape?route=nope&target=10.0.0.5%3A9100")
        self.assertRefused(unknown_route, 404, "not_found", body=b"not found\n")
        self.audit.events.clear()
        _, unknown_target = self.scrape(b"/scrape?route=node&target=10.0.0.99%3A9100")
        self.assertRefused(unknown_target, 404, "not_found", route="node")
        self.assertEqual(unknown_route.value(), unknown_target.value())

    def test_target_of_another_route(self) -> None:
        """A target that belongs to another route is still outside this one."""
        _, transport = self.scrape(b"/scrape?route=node&target=127.0.0.1%3A9115")
        self.assertRefused(transport, 404, "not_found", route="node")

    def test_identity_not_allowed(self) -> None:
        """An identity the route does not allow gets 403 authz_denied."""
        _, transport = self.scrape(b"/scrape?route=admin&target=127.0.0.1%3A9099")
        self.assertRefused(transport, 403, "authz_denied", route="admin", body=b"forbidden\n")
        self.assertEqual(self.requests()[0].identity, "prometheus")

    def test_unknown_identity(self) -> None:
        """A caller no identity matches gets 403 with the recognition's reason."""
        for reason in ("unknown_identity", "identity_ambiguous", "no_credentials"):
            self.audit.events.clear()
            proto, transport = self.client(None, reason)
            proto.dataReceived(get(SCRAPE))
            self.assertRefused(transport, 403, reason, route="node", body=b"forbidden\n")
            self.assertIsNone(self.requests()[0].identity)

    def test_path_not_in_route(self) -> None:
        """A canonical path= outside the route's paths is 403, a path trick is 400 (see
        tests/test_policy.py), both path_refused, and nothing goes upstream."""
        for path in (b"%2Fother", b"%2Fmetrics%2F"):
            self.audit.events.clear()
            _, transport = self.scrape(SCRAPE + b"&path=" + path)
            self.assertRefused(transport, 403, "path_refused", route="node")
        for path in (b"%2Fmetrics%2F..%2Fadmin", b"metrics"):
            self.audit.events.clear()
            _, transport = self.scrape(SCRAPE + b"&path=" + path)
            self.assertRefused(transport, 400, "path_refused", route="node")

    def test_param_not_in_route(self) -> None:
        """A query parameter the route does not pass is 400."""
        _, transport = self.scrape(SCRAPE + b"&module=x")
        self.assertRefused(transport, 400, "param_refused", route="node")

    def test_post(self) -> None:
        """POST is 405 with an Allow header."""
        _, transport = self.scrape(SCRAPE, method=b"POST")
        response = self.assertRefused(transport, 405, "method_not_allowed")
        self.assertEqual(response.headers[b"allow"], b"GET, HEAD")

    def test_unknown_path(self) -> None:
        """Anything but /scrape and /sd is 404."""
        _, transport = self.scrape(b"/metrics")
        self.assertRefused(transport, 404, "not_found", body=b"not found\n")

    def test_head_refusal_has_no_body(self) -> None:
        """A refused HEAD request gets the head only."""
        _, transport = self.scrape(b"/nope", method=b"HEAD")
        self.assertTrue(transport.value().endswith(b"Connection: keep-alive\r\n\r\n"))
        self.assertIn(b"Content-Length: 10\r\n", transport.value())

    def test_malformed_head(self) -> None:
        """A malformed request head is 400, audited, and the connection closes."""
        proto, transport = self.client()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        response = self.assertRefused(transport, 400, "bad_request")
        self.assertEqual(response.body, b"bad request\n")
        self.assertEqual(self.requests()[0].detail, "duplicate host header")
        self.assertTrue(transport.disconnecting)

    def test_request_line_too_long(self) -> None:
        """A request line that never ends within 8KiB is 414 without waiting for the rest."""
        proto, transport = self.client()
        proto.dataReceived(b"GET /" + b"a" * 9000)
        self.assertRefused(transport, 414, "bad_request")

    def test_head_too_large(self) -> None:
        """A head that never ends within 16KiB is 431."""
        proto, transport = self.client()
        proto.dataReceived(b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 3000)
        self.assertRefused(transport, 431, "bad_request")

    def test_rate_limited(self) -> None:
        """Past the burst, 429 with Retry-After; after waiting, admitted again."""
        target = b"/scrape?route=limited&target=10.0.0.5%3A9100"
        self.scrape(target)
        upstream, upstream_transport = self.upstreams.accept()
        upstream.dataReceived(OK_RESPONSE)
        self.scrape(target)  # on the pooled upstream connection
        upstream.dataReceived(OK_RESPONSE)
        self.audit.events.clear()
        _, transport = self.scrape(target)
        response = self.assertRefused(transport, 429, "rate_limited", route="limited")
        self.assertEqual(response.headers[b"retry-after"], b"1")
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "promgate_rate_limited_total", {"route": "limited", "reason": "rate_limited"}
            ),
            1.0,
        )
        self.clock.advance(1)
        self.scrape(target)
        self.assertEqual(upstream_transport.value().count(b"GET /metrics"), 3)

    def test_concurrency_limited(self) -> None:
        """Past max_concurrent in-flight scrapes, 429; once one finishes, admitted again."""
        target = b"/scrape?route=single&target=10.0.0.5%3A9100"
        self.scrape(target)
        _, transport = self.scrape(target)
        response = self.response(transport)
        self.assertEqual((response.status, response.headers[b"retry-after"]), (429, b"1"))
        (event,) = self.requests()
        self.assertEqual((event.reason, event.decision), ("concurrency_limited", "deny"))
        self.assertEqual(self.limiter.in_flight("single"), 1)
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(OK_RESPONSE)
        self.assertEqual(self.limiter.in_flight("single"), 0)
        self.scrape(target)
        self.assertEqual(self.limiter.in_flight("single"), 1)

    def test_audit_unavailable(self) -> None:
        """With on_failure: deny, an unhealthy audit log means 503 and nothing upstream."""
        self.audit.healthy = False
        _, transport = self.scrape()
        response = self.response(transport)
        self.assertEqual((response.status, response.body), (503, b"audit log unavailable\n"))
        self.assertEqual(response.headers[b"connection"], b"close")
        self.assertNoUpstreamAttempt()
        self.assertEqual(self.limiter.in_flight("node"), 0)
        self.audit.healthy = True
        _, transport = self.client()
        self.assertEqual(self.audit.events, [])


class UpstreamFailureTests(GatewayTestCase):
    """Upstream failures become 502/504 before the head, and an aborted client after."""

    def test_connect_refused(self) -> None:
        """A refused upstream connect is 502 upstream_refused."""
        _, transport = self.scrape()
        self.upstreams.fail(ConnectionRefusedError())
        response = self.response(transport)
        self.assertEqual(response.status, 502)
        (event,) = self.requests()
        self.assertEqual(
            (event.decision, event.reason, event.status), ("allow", "upstream_refused", 502)
        )
        self.assertEqual(self.limiter.in_flight("node"), 0)

    def test_failure_logged(self) -> None:
        """An upstream failure is logged with the route, target and reason as fields."""
        observer = EventLoggingObserver()
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.scrape()
        self.upstreams.fail(ConnectionRefusedError())
        (event,) = [e for e in observer if e.get("reason") == "upstream_refused"]
        self.assertEqual((event["route"], event["target"]), ("node", "10.0.0.5:9100"))
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "promgate_upstream_errors_total", {"route": "node", "reason": "upstream_refused"}
            ),
            1.0,
        )

    def test_connect_timeout(self) -> None:
        """An upstream connect timeout is 504."""
        _, transport = self.scrape()
        self.upstreams.fail(TimeoutError())
        self.assertEqual(self.response(transport).status, 504)
        self.assertEqual(self.requests()[0].reason, "upstream_timeout")

    def test_no_answer(self) -> None:
        """An upstream that never answers gets a 504 at the route's timeout, not before."""
        _, transport = self.scrape()
        _, upstream_transport = self.upstreams.accept()
        self.clock.advance(9.99)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.01)
        response = self.response(transport)
        self.assertEqual(response.status, 504)
        self.assertEqual(self.requests()[0].reason, "upstream_timeout")
        self.assertTrue(upstream_transport.disconnected)
        self.assertEqual(self.pool.idle_count(), 0)
        self.assertEqual(self.limiter.in_flight("node"), 0)

    def test_no_connection(self) -> None:
        """A connect still pending at the timeout is cancelled and answered 504."""
        _, transport = self.scrape()
        self.clock.advance(10)
        self.assertEqual(self.response(transport).status, 504)
        self.assertEqual(self.requests()[0].reason, "upstream_timeout")
        self.assertEqual((self.upstreams.pending, self.upstreams.cancelled), ([], [NODE.address]))

    def test_scrape_timeout_header_shortens(self) -> None:
        """X-Prometheus-Scrape-Timeout-Seconds shortens the wait, answering just before it."""
        _, transport = self.scrape(SCRAPE, b"X-Prometheus-Scrape-Timeout-Seconds: 2")
        self.upstreams.accept()
        self.clock.advance(1.74)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.01)
        self.assertEqual(self.response(transport).status, 504)

    def test_bad_timeout_header_ignored(self) -> None:
        """An unusable scrape timeout header leaves the route's timeout in force."""
        for value in (b"nan", b"-1", b"0", b"x", b"inf"):
            self.audit.events.clear()
            _, transport = self.scrape(SCRAPE, b"X-Prometheus-Scrape-Timeout-Seconds: " + value)
            self.upstreams.accept()
            self.clock.advance(9.9)
            self.assertEqual(transport.value(), b"", value)
            self.clock.advance(0.1)
            self.assertEqual(self.response(transport).status, 504)

    def test_malformed_upstream(self) -> None:
        """A malformed upstream response is 502 upstream_malformed."""
        _, transport = self.scrape()
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.assertEqual(self.response(transport).status, 502)
        self.assertEqual(self.requests()[0].reason, "upstream_malformed")

    def test_too_large(self) -> None:
        """A Content-Length over the route's cap is 502 response_too_large."""
        _, transport = self.scrape()
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (65 * 2**20))
        self.assertEqual(self.response(transport).status, 502)
        self.assertEqual(self.requests()[0].reason, "response_too_large")

    def assertCutShort(self, transport: StringTransport, written: bytes) -> None:
        """The client got ``written`` and then the connection ended; the framing of what it
        got shows it is incomplete, or (where it cannot) the connection was aborted."""
        self.assertEqual(transport.value(), written)
        self.assertTrue(transport.disconnecting, "client connection left open")
        self.assertNotEqual(self.pool.idle_count(), 1)
        (event,) = self.requests()
        self.assertEqual(event.decision, "allow")
        self.assertNotEqual(event.reason, "ok")
        self.assertEqual(event.bytes_out, len(written))
        self.assertEqual(self.limiter.in_flight("node"), 0)

    def test_mid_body_failure_content_length(self) -> None:
        """A reset mid-body ends the client short of its Content-Length: never clean."""
        _, transport = self.scrape()
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        upstream.connectionLost(Failure(ConnectionLost()))
        self.assertCutShort(
            transport,
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\npartial",
        )
        self.assertEqual(self.requests()[0].reason, "upstream_reset")
        self.assertEqual(self.requests()[0].status, 200)

    def test_mid_body_failure_chunked(self) -> None:
        """A chunked body cut mid-way never gets its last chunk."""
        _, transport = self.scrape()
        upstream, _ = self.upstreams.accept()
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        upstream.dataReceived(head + b"3\r\nabc\r\n")
        upstream.connectionLost(Failure(ConnectionDone()))
        self.assertCutShort(
            transport,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
            b"3\r\nabc\r\n",
        )

    def test_mid_body_failure_rechunked(self) -> None:
        """A close-delimited body re-chunked for the client gets no last chunk on reset."""
        _, transport = self.scrape()
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nabc")
        upstream.connectionLost(Failure(ConnectionLost()))
        self.assertCutShort(
            transport,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
            b"3\r\nabc\r\n",
        )

    def test_mid_body_failure_close_delimited_client(self) -> None:
        """An HTTP/1.0 client's body is close-delimited, so only an abort can say it was cut."""
        _, transport = self.scrape(SCRAPE, version=b"1.0")
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        upstream.connectionLost(Failure(ConnectionLost()))
        self.assertCutShort(transport, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc")
        self.assertTrue(transport.disconnected, "close-delimited body ended cleanly")

    def test_mid_body_too_large(self) -> None:
        """A body crossing the route's size cap mid-way is cut short."""
        _, transport = self.scrape(b"/scrape?route=limited&target=10.0.0.5%3A9100")
        upstream, _ = self.upstreams.accept()
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        upstream.dataReceived(head)
        chunk = b"100000\r\n" + b"x" * 0x100000 + b"\r\n"
        for _ in range(64):
            upstream.dataReceived(chunk)
        self.assertFalse(transport.disconnecting)
        upstream.dataReceived(b"1\r\n")
        upstream.dataReceived(b"x")
        self.assertTrue(transport.disconnecting)
        self.assertNotIn(b"0\r\n\r\n", transport.value()[-10:])
        self.assertEqual(self.requests()[0].reason, "response_too_large")

    def test_mid_body_timeout(self) -> None:
        """The scrape timeout striking mid-body cuts the response short too."""
        _, transport = self.scrape()
        upstream, upstream_transport = self.upstreams.accept()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        self.clock.advance(10)
        self.assertCutShort(
            transport,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
            b"3\r\nabc\r\n",
        )
        self.assertTrue(upstream_transport.disconnected)
        self.assertEqual(self.requests()[0].reason, "upstream_timeout")

    def test_pooled_connection_retried(self) -> None:
        """A pooled connection found closed before answering is retried once on a new one."""
        self.scrape()
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(OK_RESPONSE)
        self.assertEqual(self.pool.idle_count(), 1)
        _, transport = self.scrape()
        upstream.connectionLost(Failure(ConnectionDone()))
        fresh, fresh_transport = self.upstreams.accept()
        self.assertEqual(fresh_transport.value(), UPSTREAM_REQUEST)
        fresh.dataReceived(OK_RESPONSE)
        self.assertEqual(self.response(transport).body, METRICS)

    def test_client_gone(self) -> None:
        """A client that goes away mid-scrape ends the exchange and frees the upstream."""
        proto, _ = self.scrape()
        _, upstream_transport = self.upstreams.accept()
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(upstream_transport.disconnected)
        self.assertEqual(self.requests()[0].reason, "client_aborted")
        self.assertEqual(self.limiter.in_flight("node"), 0)

    def test_client_gone_while_connecting(self) -> None:
        """A client that goes away while the upstream connect is pending cancels it."""
        proto, _ = self.scrape()
        self.assertEqual(self.upstreams.pending, [NODE.address])
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual((self.upstreams.pending, self.upstreams.cancelled), ([], [NODE.address]))
        self.assertEqual(self.requests()[0].reason, "client_aborted")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ConnectionTests(GatewayTestCase):
    """Keep-alive, pipelining, deadlines and back-pressure on the client connection."""

    def test_keep_alive(self) -> None:
        """Two requests on one connection; the second reuses the pooled upstream."""
        proto, transport = self.scrape()
        upstream, upstream_transport = self.upstreams.accept()
        upstream.dataReceived(OK_RESPONSE)
        proto.dataReceived(get(SCRAPE))
        self.assertNoUpstreamAttempt()
        self.assertEqual(upstream_transport.value(), UPSTREAM_REQUEST * 2)
        upstream.dataReceived(OK_RESPONSE)
        self.assertEqual([r.body for r in self.responses(transport)], [METRICS, METRICS])
        self.assertEqual(len(self.requests()), 2)
        self.assertFalse(transport.disconnecting)

    def test_connection_close(self) -> None:
        """Connection: close from the client closes after the response."""
        _, transport = self.scrape(SCRAPE, b"Connection: close")
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(OK_RESPONSE)
        self.assertEqual(self.response(transport).headers[b"connection"], b"close")
        self.assertTrue(transport.disconnecting)

    def test_pipelined(self) -> None:
        """A pipelined second request waits until the first is answered, then is served."""
        proto, transport = self.client()
        proto.dataReceived(get(SCRAPE) + get(b"/scrape?route=node&target=10.0.0.6%3A9100"))
        self.assertEqual(self.upstreams.pending, [NODE.address])
        # A little pipelined data is held without pausing the socket (no syscalls spent).
        self.assertEqual(transport.producerState, "producing")
        first, _ = self.upstreams.accept()
        self.assertEqual(transport.value(), b"")
        first.dataReceived(OK_RESPONSE)
        self.assertEqual(len(self.responses(transport)), 1)
        self.assertEqual(
            self.upstreams.pending, [OTHER_NODE.address], "pipelined request not served"
        )
        second, second_transport = self.upstreams.accept()
        self.assertEqual(second_transport.value().split(b"\r\n")[1], b"Host: 10.0.0.6:9100")
        second.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
        self.assertEqual([r.body for r in self.responses(transport)], [METRICS, b"two"])
        self.assertEqual(transport.producerState, "producing")

    def test_pipelined_flood_pauses_reading(self) -> None:
        """More than a request head's worth of bytes behind an in-flight scrape stops
        reading from the client until that scrape is answered."""
        proto, transport = self.scrape()
        proto.dataReceived(get(b"/sd") * (MAX_HEAD // len(get(b"/sd")) + 1))
        self.assertEqual(transport.producerState, "paused")
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(OK_RESPONSE)
        self.assertEqual(transport.producerState, "producing")

    def test_pipelined_later_read(self) -> None:
        """A second request read while the first is in flight is held, then served."""
        proto, transport = self.scrape()
        proto.dataReceived(get(b"/sd"))
        self.assertEqual(self.audit.events, [])
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(OK_RESPONSE)
        self.assertEqual([r.status for r in self.responses(transport)], [200, 200])
        self.assertEqual([e.path for e in self.requests()], ["/metrics", "/sd"])

    def test_half_close_answered(self) -> None:
        """A client that half-closes after its request (``printf ... | nc -N``) still gets
        the answer, audited as allowed, and then the connection closes."""
        proto, transport = self.scrape()
        proto.readConnectionLost()
        self.assertFalse(transport.disconnecting)
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(OK_RESPONSE)
        self.assertEqual(self.response(transport).body, METRICS)
        self.assertTrue(transport.disconnecting)
        (event,) = self.requests()
        self.assertEqual((event.decision, event.reason, event.status), ("allow", "ok", 200))

    def test_half_close_pipelined(self) -> None:
        """Every complete request sent before the FIN is answered, in order; an unfinished
        one behind them is audited, then the connection closes."""
        proto, transport = self.client()
        proto.dataReceived(get(SCRAPE) + get(b"/nope") + b"GET /scr")
        proto.readConnectionLost()
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(OK_RESPONSE)
        self.assertEqual([r.status for r in self.responses(transport)], [200, 404])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(
            [e.reason for e in self.requests()], ["ok", "not_found", "client_closed_mid_request"]
        )

    def test_half_close_idle(self) -> None:
        """A FIN on an idle connection closes it; nothing to audit."""
        proto, transport = self.client()
        proto.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.requests(), [])

    def test_pipelined_refusals(self) -> None:
        """Many pipelined requests answered at once are answered in order."""
        proto, transport = self.client()
        proto.dataReceived(get(b"/nope") * 500)
        self.assertEqual([r.status for r in self.responses(transport)], [404] * 500)

    def test_head_deadline(self) -> None:
        """A request head not complete within 10s gets 408 and the connection closes."""
        proto, transport = self.client()
        proto.dataReceived(b"GET /scrape HTTP/1.1\r\n")
        self.clock.advance(5)
        proto.dataReceived(b"Host: a\r\n")  # progress does not extend a deadline
        self.clock.advance(4.9)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.1)
        response = self.response(transport)
        self.assertEqual(response.status, 408)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.requests()[0].reason, "request_timeout")

    def test_silent_client(self) -> None:
        """A client that sends nothing is closed at the head deadline without a response."""
        _, transport = self.client()
        self.clock.advance(10)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

    def test_keepalive_idle_deadline(self) -> None:
        """An idle keep-alive connection closes after 120s; a request before then is served."""
        proto, transport = self.scrape(b"/nope")
        self.clock.advance(119)
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(get(b"/nope"))
        self.assertEqual(len(self.responses(transport)), 2)
        self.clock.advance(119.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.requests()), 2)  # closing an idle connection is not audited

    def test_idle_then_partial_head(self) -> None:
        """The first byte of the next request starts a fresh head deadline."""
        proto, transport = self.scrape(b"/nope")
        self.clock.advance(100)
        proto.dataReceived(b"GET /no")
        self.clock.advance(9.9)
        self.assertEqual(len(self.responses(transport)), 1)
        self.clock.advance(0.1)
        self.assertEqual([r.status for r in self.responses(transport)], [404, 408])

    def test_no_deadline_during_exchange(self) -> None:
        """While a scrape is in progress only the scrape timeout applies."""
        _, transport = self.scrape()
        upstream, _ = self.upstreams.accept()
        self.clock.advance(9)
        upstream.dataReceived(OK_RESPONSE)
        self.assertEqual(self.response(transport).status, 200)
        self.assertFalse(transport.disconnecting)

    def test_back_pressure(self) -> None:
        """When the client's transport pauses us, the upstream is paused, and resumed after."""
        proto, transport = self.scrape()
        self.assertIs(transport.producer, proto)
        self.assertTrue(transport.streaming)
        upstream, upstream_transport = self.upstreams.accept()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
        proto.pauseProducing()
        self.assertEqual(upstream_transport.producerState, "paused")
        proto.resumeProducing()
        self.assertEqual(upstream_transport.producerState, "producing")
        proto.pauseProducing()
        upstream.dataReceived(b"def")
        self.assertEqual(self.response(transport).body, b"abcdef")
        # Back in the pool, reading again (so that a close is noticed).
        self.assertEqual(upstream_transport.producerState, "producing")
        self.assertEqual(self.pool.idle_count(), 1)

    def test_back_pressure_before_connect(self) -> None:
        """An upstream connected while the client is paused starts paused."""
        proto, _ = self.scrape()
        proto.pauseProducing()
        _, upstream_transport = self.upstreams.accept()
        self.assertEqual(upstream_transport.producerState, "paused")
        proto.resumeProducing()
        self.assertEqual(upstream_transport.producerState, "producing")


class ServiceDiscoveryTests(GatewayTestCase):
    """GET /sd lists the targets this caller may scrape, as Prometheus http_sd JSON."""

    def sd(self, identity: Identity | None, *headers: bytes) -> Response:
        proto, transport = self.client(identity, "unknown_identity")
        proto.dataReceived(get(b"/sd", *headers))
        return self.response(transport)

    def test_only_allowed_routes(self) -> None:
        """Prometheus sees every route but admin; ops sees only admin."""
        response = self.sd(PROMETHEUS)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers[b"content-type"], b"application/json")
        groups = json.loads(response.body)
        self.assertEqual(
            [(g["labels"]["__param_route"], g["labels"]["__param_target"]) for g in groups],
            [
                ("blackbox", "127.0.0.1:9115"),
                ("limited", "10.0.0.5:9100"),
                ("node", "10.0.0.5:9100"),
                ("node", "10.0.0.6:9100"),
                ("single", "10.0.0.5:9100"),
            ],
        )
        self.assertEqual(groups[2]["targets"], ["gate.example.org:9443"])
        self.assertEqual(groups[2]["labels"]["az"], "a")
        self.assertEqual(groups[2]["labels"]["team"], "infra")
        self.assertEqual(groups[2]["labels"]["__scheme__"], "http")
        self.assertEqual(groups[2]["labels"]["__metrics_path__"], "/scrape")
        (event,) = self.requests()
        self.assertEqual(
            (event.decision, event.status, event.identity), ("allow", 200, "prometheus")
        )
        self.audit.events.clear()
        groups = json.loads(self.sd(OPS).body)
        self.assertEqual([g["labels"]["__param_route"] for g in groups], ["admin"])

    def test_advertise(self) -> None:
        """The listener's advertise address wins over the Host header."""
        self.listener, self.config = make_config(advertise="gate.example.net:443")
        self.gateway = ReverseGateway(
            self.listener,
            self.config,
            clock=self.clock,
            limiter=self.limiter,
            audit=self.audit,
            metrics=self.metrics,
            pool=self.pool,
        )
        groups = json.loads(self.sd(PROMETHEUS).body)
        self.assertEqual(groups[0]["targets"], ["gate.example.net:443"])

    def test_bad_host_header(self) -> None:
        """A Host header that is not a host[:port] is not echoed; the local address is used."""
        proto, transport = self.client()
        proto.dataReceived(b'GET /sd HTTP/1.1\r\nHost: evil/path"x\r\n\r\n')
        groups = json.loads(self.response(transport).body)
        self.assertEqual(groups[0]["targets"], ["192.0.2.1:9443"])

    def test_unknown_caller(self) -> None:
        """An unrecognised caller gets 403."""
        response = self.sd(None)
        self.assertEqual(response.status, 403)
        self.assertEqual(self.requests()[0].reason, "unknown_identity")

    def test_audit_unavailable(self) -> None:
        """/sd is refused too when the audit log is down and on_failure is deny."""
        self.audit.healthy = False
        self.assertEqual(self.sd(PROMETHEUS).status, 503)


class _Client(Protocol):
    """A test client: collects what it receives and how its connection ended."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.lost = reason


_PKI: TestPKI | None = None


def _pki(base: Path) -> TestPKI:
    """One test PKI for the whole module (issuing certificates is the slow part)."""
    global _PKI
    if _PKI is None:
        _PKI = TestPKI(base)
        _PKI.client("prometheus")
        _PKI.client("prometheus", expired=True)
        _PKI.foreign_client("prometheus")
        _PKI.client("stranger")
    return _PKI


def _server_transport(proto: Any) -> iosim.FakeTransport:
    return iosim.FakeTransport(
        proto,
        True,
        hostAddress=IPv4Address("TCP", "192.0.2.1", 9443),
        peerAddress=IPv4Address("TCP", "198.51.100.7", 40000),
    )


class MutualTLSTests(GatewayTestCase):
    """Real TLS handshakes in memory: certificates map to identities; refused handshakes are
    audited with their reason."""

    def setUp(self) -> None:
        self.pki = _pki(Path(self.mktemp()).resolve())
        self.tls = TLSFiles(self.pki.gate_cert, self.pki.gate_key, self.pki.ca_cert)
        super().setUp()
        self.server_factory = TLSMemoryBIOFactory(
            server_tls(self.tls), False, HTTPListenerFactory(self.gateway.http), clock=self.clock
        )

    def connect(
        self, cert: tuple[Path, Path] | None, *, tls: bool = True
    ) -> tuple[_Client, Any, iosim.IOPump]:
        """Connect a client presenting ``cert`` (or none); returns client, server, pump."""
        client = _Client()
        if tls:
            trust = Certificate.loadPEM(self.pki.ca_cert.read_bytes())
            options: dict[str, Any] = {}
            if cert is not None:
                options["clientCertificate"] = PrivateCertificate.loadPEM(
                    cert[0].read_bytes() + cert[1].read_bytes()
                )
            creator = optionsForClientTLS("localhost", trustRoot=trust, **options)
            client_factory = TLSMemoryBIOFactory(
                creator, True, ClientFactory.forProtocol(lambda: client), clock=self.clock
            )
            make_client: Any = lambda: client_factory.buildProtocol(None)  # noqa: E731
        else:
            make_client = lambda: client  # noqa: E731
        client_wire, server_wire, pump = iosim.connectedServerAndClient(
            lambda: self.server_factory.buildProtocol(None),
            make_client,
            serverTransportFactory=_server_transport,
            greet=False,
            clock=self.clock,
        )
        self.client_wire = client_wire
        return client, server_wire.wrappedProtocol, pump

    def handshake_failures(self) -> list[AuditEvent]:
        return [e for e in self.audit.events if e.event == "tls_handshake_failed"]

    def test_certificate_maps_to_identity(self) -> None:
        """A client certificate maps to its identity; the audit has TLS and cert details."""
        client, server, pump = self.connect(self.pki.client("prometheus"))
        pump.flush()
        self.assertIsInstance(server, DownstreamProtocol)
        self.assertEqual(server.recognition.identity, PROMETHEUS)
        self.client_wire.write(get(SCRAPE))
        pump.flush()
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(OK_RESPONSE)
        pump.flush()
        (response,) = parse_responses(client.data)
        self.assertEqual(response.body, METRICS)
        (event,) = self.requests()
        self.assertEqual(
            (event.identity, event.decision, event.peer),
            ("prometheus", "allow", "198.51.100.7:40000"),
        )
        self.assertIn(event.tls_version, ("TLSv1.2", "TLSv1.3"))
        self.assertTrue(event.tls_cipher)
        self.assertEqual(event.cert_subject, "CN=prometheus")
        self.assertEqual(len(event.cert_sha256 or ""), 64)
        self.assertIsNone(client.lost)

    def test_unknown_identity(self) -> None:
        """A valid certificate no identity names handshakes, then gets 403 unknown_identity."""
        client, _, pump = self.connect(self.pki.client("stranger"))
        pump.flush()
        self.client_wire.write(get(SCRAPE))
        pump.flush()
        self.assertEqual(parse_responses(client.data)[0].status, 403)
        self.assertEqual(self.requests()[0].reason, "unknown_identity")

    def test_connection_close_over_tls(self) -> None:
        """A response that closes the connection really closes it over TLS."""
        client, _, pump = self.connect(self.pki.client("prometheus"))
        pump.flush()
        self.client_wire.write(get(b"/nope", b"Connection: close"))
        pump.flush()
        self.assertEqual(parse_responses(client.data)[0].status, 404)
        self.assertIsNotNone(client.lost, "connection left open after Connection: close")

    def test_sd_over_tls(self) -> None:
        """/sd over TLS advertises __scheme__ https."""
        client, _, pump = self.connect(self.pki.client("prometheus"))
        pump.flush()
        self.client_wire.write(get(b"/sd"))
        pump.flush()
        groups = json.loads(parse_responses(client.data)[0].body)
        self.assertEqual({g["labels"]["__scheme__"] for g in groups}, {"https"})

    def assertHandshakeRefused(
        self, cert: tuple[Path, Path] | None, reason: str, *, subject: str | None = None
    ) -> AuditEvent:
        client, _, pump = self.connect(cert)
        pump.flush()
        if client.lost is None:
            # With TLS 1.3 the client may think the handshake done; its first write finds out.
            self.client_wire.write(get(SCRAPE))
            pump.flush()
        self.assertIsNotNone(client.lost)
        self.assertEqual(self.requests(), [])
        self.assertNoUpstreamAttempt()
        (event,) = self.handshake_failures()
        self.assertEqual(
            (event.listener, event.peer, event.decision, event.reason),
            ("scrape", "198.51.100.7:40000", "deny", reason),
        )
        self.assertEqual(event.cert_subject, subject)
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "promgate_tls_handshake_failures_total", {"listener": "scrape", "reason": reason}
            ),
            1.0,
        )
        return event

    def test_no_client_certificate(self) -> None:
        """A client without a certificate fails the handshake: no_client_certificate."""
        self.assertHandshakeRefused(None, "no_client_certificate")

    def test_expired_certificate(self) -> None:
        """An expired client certificate fails the handshake: certificate_expired."""
        event = self.assertHandshakeRefused(
            self.pki.client("prometheus", expired=True),
            "certificate_expired",
            subject="CN=prometheus",
        )
        self.assertEqual(len(event.cert_sha256 or ""), 64)

    def test_unknown_ca(self) -> None:
        """A client certificate from another CA fails the handshake: unknown_ca."""
        self.assertHandshakeRefused(
            self.pki.foreign_client("prometheus"), "unknown_ca", subject="CN=prometheus"
        )

    def test_plain_http(self) -> None:
        """Plain HTTP to a TLS listener is refused and audited as plain_http."""
        client, _, pump = self.connect(None, tls=False)
        client.transport.write(get(SCRAPE))  # type: ignore[union-attr]
        pump.flush()
        self.assertIsNotNone(client.lost)
        (event,) = self.handshake_failures()
        self.assertEqual(event.reason, "plain_http")

    def test_handshake_deadline(self) -> None:
        """A client that never completes the handshake is cut off after 10s and audited."""
        client, _, pump = self.connect(None, tls=False)
        pump.flush()
        self.clock.advance(9.9)
        pump.flush(advanceClock=False)
        self.assertIsNone(client.lost)
        self.clock.advance(0.1)
        pump.flush()
        self.assertIsNotNone(client.lost)
        (event,) = self.handshake_failures()
        self.assertEqual(event.reason, "handshake_timeout")
