"""What refusals tell the caller: a short constant body per status and reason, on every
listener kind, with nothing of the request or of the gateway's internals in it; the
precise reason goes to the audit record's ``detail``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, DNSLookupError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
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
    UpstreamTLS,
)
from promgate.http.refusals import BODIES, refusal_body
from promgate.http.server import HTTPListenerFactory
from promgate.http.upstream import UpstreamPool, UpstreamProtocol
from promgate.identity import Recognition
from promgate.listeners.forward import ForwardGateway
from promgate.listeners.scrape import ReverseGateway
from promgate.metrics import Metrics
from promgate.ratelimit import RateLimiter
from promgate.testing import PendingUpstreams

#: Every case puts some of these in its request or in what the gateway learns upstream;
#: none may reach the caller.
MARKERS = (
    b"zq",
    b"10.0.0.5",
    b"9100",
    b"spiffe",
    b"verify",
    b"host header",
    b"/metrics",
    b"admin",
    b"scraper",
)
SCRAPER = Identity("prometheus", cert=(CertMatch(cn="prometheus"),), roles=frozenset({"scraper"}))
TOKEN_USER = Identity("zq-agent", bearer_sha256=(b"\x00" * 32,))
NODE = Target("10.0.0.5:9100")
ROUTES = {
    "node": Route(
        "node",
        (NODE,),
        paths=("/metrics", "/metrics/zq"),
        params=("module",),
        allow=("role:scraper",),
        timeout=10.0,
        max_response_size=1 << 20,
    ),
    "admin": Route("admin", (Target("127.0.0.1:9099"),), allow=("zq-agent",)),
    "limited": Route("limited", (NODE,), allow=("role:scraper",), limits=Limits(rate=1.0, burst=1)),
    "single": Route("single", (NODE,), allow=("role:scraper",), limits=Limits(max_concurrent=1)),
    # Its CA file cannot be read: connecting fails before any connection is attempted.
    "tls": Route(
        "tls",
        (Target("10.0.0.5:9443"),),
        scheme="https",
        allow=("role:scraper",),
        upstream_tls=UpstreamTLS(ca=Path("/nonexistent/zq/ca.pem")),
    ),
}
SCRAPE = b"/scrape?route=node&target=10.0.0.5%3A9100"


def _answer(upstreams: PendingUpstreams, *data: bytes) -> UpstreamProtocol:
    """Connect the oldest upstream attempt and feed it ``data`` as the upstream's bytes."""
    proto, _ = upstreams.accept()
    assert isinstance(proto, UpstreamProtocol), proto
    for piece in data:
        proto.dataReceived(piece)
    return proto


def _fail_connects(upstreams: PendingUpstreams) -> None:
    """Fail every upstream connect still waiting (a CONNECT tunnel's), with an address in
    the error."""
    for address in upstreams.pending:
        upstreams.fail(DNSLookupError(f"zq: no address for {address}"))


def _request(method: bytes, target: bytes, *headers: bytes) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (method, target), b"Host: gate.example.org", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _reset(upstreams: PendingUpstreams) -> None:
    _answer(upstreams).connectionLost(Failure(ConnectionLost("zq reset by 10.0.0.5:9100")))


def _tls_failed(upstreams: PendingUpstreams) -> None:
    _answer(upstreams).connectionLost(
        Failure(VerificationError(errors=["spiffe://zq.example/expected-exporter"]))
    )


def _ssl_failed(upstreams: PendingUpstreams) -> None:
    upstreams.fail(SSL.Error([("SSL routines", "", "certificate verify failed (zq)")]))


Action = Callable[[PendingUpstreams], Any] | None

#: (listener kind, request, identity, what the upstream does, status, reason)
CASES: list[tuple[str, bytes, Identity | None, Action, int, str]] = [
    ("http", _request(b"POST", SCRAPE + b"&zq=1"), SCRAPER, None, 405, "method_not_allowed"),
    ("http", _request(b"GET", b"/zq-unknown"), SCRAPER, None, 404, "not_found"),
    ("http", _request(b"GET", b"/scrape?route=zq-route&target=10.0.0.5%3A9100"), SCRAPER,
     None, 404, "not_found"),
    ("http", _request(b"GET", b"/scrape?route=node&target=10.0.0.5%3A9199"), SCRAPER, None,
     404, "not_found"),
    ("http", _request(b"GET", b"/scrape?route=node&route=zq"), SCRAPER, None, 400,
     "bad_request"),
    ("http", _request(b"GET", b"/scrape?zq=1"), SCRAPER, None, 400, "bad_request"),
    ("http", _request(b"GET", b"/scrape/\xffzq"), SCRAPER, None, 400, "bad_request"),
    ("http", _request(b"GET", SCRAPE, b"Host: zq.example"), SCRAPER, None, 400,
     "bad_request"),
    ("http", _request(b"GET", SCRAPE, b"X-Zq: a\x01b"), SCRAPER, None, 400, "bad_request"),
    ("http", b"GET /zq HTTP/2.0\r\nHost: zq\r\n\r\n", SCRAPER, None, 505, "bad_request"),
    ("http", _request(b"GET", b"/scrape?route=admin&target=127.0.0.1%3A9099"), SCRAPER,
     None, 403, "authz_denied"),
    ("http", _request(b"GET", SCRAPE + b"&path=/metrics/%2e%2e/zq"), SCRAPER, None, 400,
     "path_refused"),
    ("http", _request(b"GET", SCRAPE + b"&path=/zq-secret"), SCRAPER, None, 403,
     "path_refused"),
    ("http", _request(b"GET", SCRAPE + b"&zq-param=1"), SCRAPER, None, 400, "param_refused"),
    ("http", _request(b"GET", SCRAPE, b"Authorization: Bearer zq-wrong"), None, None, 401,
     "authn_failed"),
    ("http", _request(b"GET", SCRAPE), None, None, 401, "authn_missing"),
    ("http", _request(b"GET", b"/sd", b"Authorization: Bearer zq-wrong"), None, None, 401,
     "authn_failed"),
    ("http", _request(b"GET", SCRAPE), SCRAPER, lambda u: u.fail(ConnectionRefusedError(
        "10.0.0.5:9100: refused")), 502, "upstream_refused"),
    ("http", _request(b"GET", SCRAPE), SCRAPER, _ssl_failed, 502, "upstream_tls_failed"),
    ("http", _request(b"GET", b"/scrape?route=tls&target=10.0.0.5%3A9443"), SCRAPER,
     None, 502, "upstream_tls_failed"),
    ("http", _request(b"GET", SCRAPE), SCRAPER, _tls_failed, 502, "upstream_tls_failed"),
    ("http", _request(b"GET", SCRAPE), SCRAPER, lambda u: _answer(u,
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n"), 502,
     "upstream_malformed"),
    ("http", _request(b"GET", SCRAPE), SCRAPER, lambda u: _answer(u,
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n"), 502, "response_too_large"),
    ("http", _request(b"GET", SCRAPE), SCRAPER, _reset, 502, "upstream_reset"),
    ("forward", _request(b"GET", b"/zq"), SCRAPER, None, 400, "bad_request"),
    ("forward", _request(b"PUT", b"http://10.0.0.5:9100/metrics"), SCRAPER, None, 405,
     "method_not_allowed"),
    ("forward", _request(b"GET", b"https://10.0.0.5:9100/zq"), SCRAPER, None, 400,
     "bad_request"),
    ("forward", _request(b"GET", b"http://zq@10.0.0.5:9100/metrics"), SCRAPER, None, 400,
     "bad_request"),
    ("forward", _request(b"GET", b"http://10.0.0.5:9100/metrics?zq=1&zq=2"), SCRAPER, None,
     400, "bad_request"),
    ("forward", _request(b"GET", b"http://10.0.0.5:9100/metrics/%2e%2e/zq"), SCRAPER, None,
     400, "path_refused"),
    ("forward", _request(b"GET", b"http://10.0.0.5:9100/zq"), SCRAPER, None, 403,
     "path_refused"),
    ("forward", _request(b"GET", b"http://10.0.0.5:9100/metrics?zq=1"), SCRAPER, None, 400,
     "param_refused"),
    ("forward", _request(b"GET", b"http://zq.example:9100/metrics"), SCRAPER, None, 403,
     "not_found"),
    ("forward", _request(b"GET", b"http://10.0.0.5:9100/metrics"), None, None, 407,
     "authn_missing"),
    ("forward", _request(b"GET", b"http://10.0.0.5:9100/metrics"), SCRAPER, _tls_failed,
     502, "upstream_tls_failed"),
    ("forward", _request(b"GET", b"http://10.0.0.5:9100/metrics"), SCRAPER, lambda u:
     _answer(u, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: zq\r\n\r\n"), 502,
     "upstream_malformed"),
    ("forward", _request(b"CONNECT", b"zq-no-port"), SCRAPER, None, 400, "bad_request"),
    ("forward", _request(b"CONNECT", b"zq.example:443"), SCRAPER, None, 403, "not_found"),
    ("forward", _request(b"CONNECT", b"10.0.0.5:9443"), SCRAPER, None, 502,
     "upstream_refused"),
]  # fmt: skip


class RefusalBodyTests(SynchronousTestCase):
    """Walk a table of refusals on ``http`` and ``forward`` listeners (``tcp`` listeners
    refuse by closing, with no byte sent: see tests.test_tcp)."""

    def gateway(self, kind: str) -> tuple[ReverseGateway, PendingUpstreams, MemoryAuditSink]:
        clock = MemoryReactorClock()
        clock.advance(1000)
        pool = UpstreamPool(clock)
        audit = MemoryAuditSink()
        listener = Listener(kind, kind, "tcp:0", None)
        config = Config(
            source=Path("promgate.yaml"),
            listeners=(listener,),
            identities={"prometheus": SCRAPER, "zq-agent": TOKEN_USER},
            routes=ROUTES,
            admin=Admin(),
            audit=Audit(Path("audit.jsonl"), Path("audit.key")),
        )
        gateway_class = ForwardGateway if kind == "forward" else ReverseGateway
        extra: dict[str, Any] = {"reactor": clock} if kind == "forward" else {}
        gw = gateway_class(
            listener,
            config,
            clock=clock,
            limiter=RateLimiter(clock),
            audit=audit,
            metrics=Metrics(),
            pool=pool,
            **extra,
        )
        return gw, PendingUpstreams(clock), audit

    def exchange(
        self, kind: str, request: bytes, identity: Identity | None, action: Action
    ) -> tuple[bytes, list[AuditEvent]]:
        gw, upstreams, audit = self.gateway(kind)
        factory = HTTPListenerFactory(gw.http)
        proto = factory.buildProtocol(None)
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "192.0.2.1", 9443),
            peerAddress=IPv4Address("TCP", "198.51.100.7", 40000),
        )
        proto.makeConnection(transport)
        if identity is not None:
            proto.recognition = Recognition(identity, "ok")
        proto.dataReceived(request)
        if action is not None:
            action(upstreams)
        _fail_connects(upstreams)
        return transport.value(), [e for e in audit.events if e.event == "request"]

    def test_table(self) -> None:
        """Each refusal: its status, the constant body of its status and reason (one of a
        fixed set), none of the request's input, and an audit record with that reason."""
        for kind, request, identity, action, status, reason in CASES:
            case = (kind, request, reason)
            data, events = self.exchange(kind, request, identity, action)
            head, _, body = data.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 %d " % status), (case, head))
            self.assertEqual(body, refusal_body(status, reason), case)
            self.assertIn(body, BODIES, case)
            for marker in MARKERS:
                self.assertNotIn(marker.lower(), data.lower(), case)
            self.assertEqual(len(events), 1, case)
            self.assertEqual((events[0].status, events[0].reason), (status, reason), case)

    def test_upstream_failures_detailed(self) -> None:
        """What the caller is not told is in the audit record's ``detail``."""
        for kind, request, identity, action, _, reason in CASES:
            if not reason.startswith("upstream_"):
                continue
            _, (event,) = self.exchange(kind, request, identity, action)
            self.assertTrue(event.detail, (kind, request, reason))
        _, (event,) = self.exchange("http", _request(b"GET", SCRAPE), SCRAPER, _tls_failed)
        self.assertIn("spiffe://zq.example/expected-exporter", event.detail or "")
        _, (event,) = self.exchange("http", _request(b"GET", SCRAPE), SCRAPER, _ssl_failed)
        self.assertIn("certificate verify failed", event.detail or "")
        _, (event,) = self.exchange("http", _request(b"GET", SCRAPE, b"Host: x"), SCRAPER, None)
        self.assertEqual(event.detail, "duplicate host header")

    def test_limits(self) -> None:
        """429s say what happened, in constant words, and keep Retry-After."""
        for route, reason, body in (
            ("limited", "rate_limited", b"rate limited\n"),
            ("single", "concurrency_limited", b"too many concurrent requests\n"),
        ):
            gw, _, audit = self.gateway("http")
            request = _request(b"GET", b"/scrape?route=%s&target=10.0.0.5%%3A9100" % route.encode())
            transports = []
            for _ in range(2):
                proto = HTTPListenerFactory(gw.http).buildProtocol(None)
                transport = StringTransport(
                    hostAddress=IPv4Address("TCP", "192.0.2.1", 9443),
                    peerAddress=IPv4Address("TCP", "198.51.100.7", 40000),
                )
                proto.makeConnection(transport)
                proto.recognition = Recognition(SCRAPER, "ok")
                proto.dataReceived(request)
                transports.append(transport)
            head, _, refused = transports[1].value().partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 429 "), head)
            self.assertIn(b"\r\nRetry-After: ", head)
            self.assertEqual(refused, body)
            self.assertEqual(refusal_body(429, reason), body)
            self.assertEqual(audit.events[-1].reason, reason)

    def test_timeout(self) -> None:
        """A 504 says the upstream timed out, nothing about where."""
        gw, _, _ = self.gateway("http")
        proto = HTTPListenerFactory(gw.http).buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.recognition = Recognition(SCRAPER, "ok")
        proto.dataReceived(_request(b"GET", SCRAPE))
        assert isinstance(gw.http.clock, MemoryReactorClock)
        gw.http.clock.advance(10)
        _, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertEqual(body, b"upstream timed out\n")

    def test_fallback(self) -> None:
        """A status with no body of its own still gets a constant one."""
        self.assertEqual(refusal_body(418, "zq"), b"refused\n")
        self.assertEqual(refusal_body(403, "zq"), b"forbidden\n")
