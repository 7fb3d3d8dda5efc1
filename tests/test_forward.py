"""Tests for the forward proxy, in memory: absolute-form parsing, the forward policy,
absolute-form relaying, refusals, and the CONNECT tunnel's state machine (back-pressure,
idle deadline, endings, bytes sent after a refused CONNECT)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import attrs
import bcrypt
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from twisted.internet.protocol import ClientFactory
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from promgate.addresses import canonical_address
from promgate.audit import AuditEvent, MemoryAuditSink
from promgate.authn import Authenticator
from promgate.config.loader import check_config
from promgate.config.model import (
    Admin,
    Audit,
    BasicCredential,
    CertMatch,
    Config,
    Deadlines,
    Identity,
    Limits,
    Listener,
    Route,
    Target,
    TLSFiles,
)
from promgate.http.refusals import BY_STATUS, decision_status
from promgate.http.server import DownstreamProtocol, HTTPListenerFactory
from promgate.http.targets import AbsoluteForm, parse_absolute_form, parse_authority_form
from promgate.http.upstream import UpstreamPool
from promgate.http.wire import HTTPError
from promgate.identity import Recognition
from promgate.listeners.forward import CONNECT_OK, ForwardGateway
from promgate.metrics import Metrics
from promgate.net.relay import MAX_PENDING
from promgate.policy import ForwardPolicy, Refusal
from promgate.ratelimit import RateLimiter
from promgate.testing import (
    Collector,
    PendingUpstreams,
    TestPKI,
    WireResponse,
    parse_responses,
    server_transport,
)
from promgate.tls import server_tls

METRICS = b"# TYPE up gauge\nup 1\n"
OK_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
    b"Content-Length: %d\r\n\r\n" % len(METRICS)
) + METRICS


class HalfCloseTransport(StringTransport):
    """A StringTransport that also records a half-close (TCP shutdown of writing)."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


#: Every refusal by policy says only this.
FORBIDDEN = BY_STATUS[403]
TOKEN = b"agent-token-0123456789"
PROMETHEUS = Identity(
    "prometheus",
    cert=(CertMatch(uri="spiffe://promgate.local/prometheus"),),
    roles=frozenset({"scraper"}),
)
OPS = Identity("ops", cert=(CertMatch(cn="ops"),))
AGENT = Identity(
    "agent", roles=frozenset({"scraper"}), bearer_sha256=(hashlib.sha256(TOKEN).digest(),)
)
ALICE = Identity(
    "alice",
    roles=frozenset({"scraper"}),
    basic=(BasicCredential("alice", bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4))),),
)
NODE = Target("10.0.0.5:9100")
ROUTES = {
    # Two http routes share NODE: "node" (first by name) allows /metrics, "node-extra" /extra.
    "node": Route(
        "node",
        (NODE, Target("10.0.0.6:9100")),
        paths=("/metrics", "/metrics/extra"),
        params=("collect[]",),
        allow=("role:scraper",),
    ),
    "node-extra": Route("node-extra", (NODE,), paths=("/extra",), allow=("role:scraper",)),
    "secure": Route(
        "secure",
        (
            Target("10.0.0.7:9443"),
            Target("Exporter.Example.org:9443"),
            Target("[2001:db8::1]:9443"),
        ),
        scheme="https",
        allow=("role:scraper",),
    ),
    "admin": Route("admin", (Target("127.0.0.1:9099"),), allow=("ops",)),
    "admin-tls": Route("admin-tls", (Target("127.0.0.1:9443"),), scheme="https", allow=("ops",)),
    "limited": Route(
        "limited",
        (Target("10.0.0.8:443"),),
        scheme="https",
        allow=("role:scraper",),
        limits=Limits(max_concurrent=1),
    ),
}
GET_NODE = b"http://10.0.0.5:9100/metrics"
TUNNEL_IDLE = 300.0


def make_config(tls: TLSFiles | None = None) -> tuple[Listener, Config]:
    listener = Listener(
        "egress", "forward", "tcp:3128", tls, deadlines=Deadlines(tunnel_idle=TUNNEL_IDLE)
    )
    config = Config(
        source=Path("promgate.yaml"),
        listeners=(listener,),
        identities={"prometheus": PROMETHEUS, "ops": OPS, "agent": AGENT, "alice": ALICE},
        routes=ROUTES,
        admin=Admin(),
        audit=Audit(Path("audit.jsonl"), Path("audit.key")),
    )
    return listener, config


def request(
    method: bytes,
    target: bytes,
    *headers: bytes,
    host: bytes | None = None,
    version: bytes = b"1.1",
) -> bytes:
    """A request head as Go's HTTP client sends it to a proxy."""
    lines = [b"%s %s HTTP/%s" % (method, target, version)]
    if version == b"1.1":
        if host is None:
            host = target.split(b"/")[2] if b"://" in target else target
        lines.append(b"Host: " + host)
    lines.extend(headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def bearer(token: bytes = TOKEN) -> bytes:
    return b"Proxy-Authorization: Bearer " + token


def basic(user: bytes, password: bytes) -> bytes:
    return b"Proxy-Authorization: Basic " + base64.b64encode(user + b":" + password)


def sync_thread(f: Any, *args: Any) -> Deferred[Any]:
    return succeed(f(*args))


# -- parsing ------------------------------------------------------------------------------------


class CanonicalAddressTests(SynchronousTestCase):
    """Addresses are compared in one spelling."""

    def test_spellings(self) -> None:
        """Names lose case and a trailing dot; IPv6 is compressed in brackets."""
        cases = {
            "10.0.0.5:9100": "10.0.0.5:9100",
            "Exporter.Example.ORG.:443": "exporter.example.org:443",
            "[2001:DB8:0:0::1]:9443": "[2001:db8::1]:9443",
            "localhost:09100": "localhost:9100",
        }
        for text, canonical in cases.items():
            self.assertEqual(canonical_address(text), canonical, text)

    def test_refused(self) -> None:
        """No port, bad ports, unbracketed IPv6, zone ids and junk are not addresses."""
        for text in [
            "10.0.0.5",
            "10.0.0.5:0",
            "10.0.0.5:65536",
            "2001:db8::1:443",
            "[fe80::1%eth0]:443",
            "a b:1",
            "exa%6dple.org:80",
            ":80",
            "1.2.3:80",
            "",
        ]:
            self.assertIsNone(canonical_address(text), text)

    def test_default_port(self) -> None:
        self.assertEqual(canonical_address("example.org", 80), "example.org:80")
        self.assertEqual(canonical_address("[::1]", 80), "[::1]:80")
        self.assertEqual(canonical_address("example.org:8080", 80), "example.org:8080")


class AbsoluteFormTests(SynchronousTestCase):
    """Absolute-form request targets are split strictly."""

    def test_split(self) -> None:
        self.assertEqual(
            parse_absolute_form(b"http://10.0.0.5:9100/metrics?a=1"),
            AbsoluteForm("10.0.0.5:9100", "/metrics", b"a=1"),
        )
        self.assertEqual(
            parse_absolute_form(b"HTTP://Node.Example.org?x"),
            AbsoluteForm("node.example.org:80", "/", b"x"),
        )
        self.assertEqual(
            parse_absolute_form(b"http://[::1]:9100/a/../b"),
            AbsoluteForm("[::1]:9100", "/a/../b", b""),
        )

    def test_refused(self) -> None:
        """Other schemes, userinfo, fragments, bad hosts and non-ASCII: 400."""
        for target in [
            b"https://10.0.0.5:9100/metrics",
            b"ftp://10.0.0.5/",
            b"http://user:pw@10.0.0.5:9100/metrics",
            b"http://10.0.0.5:9100/metrics#frag",
            b"http://10.0.0.5:99999/metrics",
            b"http:///metrics",
            b"http://exa%6dple.org/metrics",
            b"http://10.0.0.5:9100/m\xc3\xa9trics",
            b"10.0.0.5:9100",
        ]:
            error = self.assertRaises(HTTPError, parse_absolute_form, target)
            self.assertEqual((error.status, error.reason), (400, "bad_request"), target)

    @given(st.binary(max_size=64))
    def test_any_bytes(self, target: bytes) -> None:
        """Whatever arrives, the answer is a split URL or a 400, never another error."""
        try:
            form = parse_absolute_form(target)
        except HTTPError as e:
            self.assertEqual(e.status, 400)
        else:
            self.assertEqual(canonical_address(form.address), form.address)

    def test_authority_form(self) -> None:
        self.assertEqual(
            parse_authority_form(b"Exporter.example.org:443"), "exporter.example.org:443"
        )
        for target in [b"exporter.example.org", b"http://a:1/", b"/metrics", b"a:1/x", b"\xff:1"]:
            self.assertRaises(HTTPError, parse_authority_form, target)


class ForwardPolicyTests(SynchronousTestCase):
    """The pure decision: which route lets this caller reach this host:port."""

    policy = ForwardPolicy(ROUTES)
    ok = Recognition(PROMETHEUS, "ok")

    def test_first_route_allowing_the_path(self) -> None:
        """Several routes hold the target: the first by name that allows the path wins."""
        first = self.policy.decide_request(self.ok, "10.0.0.5:9100", "/metrics", ())
        second = self.policy.decide_request(self.ok, "10.0.0.5:9100", "/extra", ())
        assert first.route is not None and second.route is not None
        self.assertEqual((first.allowed, first.route.name, first.path), (True, "node", "/metrics"))
        self.assertEqual((second.allowed, second.route.name), (True, "node-extra"))
        self.assertEqual(first.target, NODE)

    def test_path_normalised_once(self) -> None:
        """The path is normalised, then compared: what is compared is what goes upstream."""
        decision = self.policy.decide_request(self.ok, "10.0.0.5:9100", "/metric%73", ())
        self.assertEqual((decision.allowed, decision.path), (True, "/metrics"))
        refused = self.policy.decide_request(self.ok, "10.0.0.5:9100", "/x/../metrics", ())
        self.assertEqual((decision_status(refused), refused.reason), (400, "path_refused"))

    def test_refusals_look_alike(self) -> None:
        """Unknown target, a route that does not allow the caller, a path not listed: the
        same 403 and body; only the audit reason tells them apart."""
        cases = [
            (self.ok, "10.9.9.9:9100", "/metrics", "not_found"),
            (self.ok, "127.0.0.1:9099", "/metrics", "authz_denied"),
            (self.ok, "10.0.0.5:9100", "/secret", "path_refused"),
            # An https route's target is reached with CONNECT, never by absolute-form GET.
            (self.ok, "10.0.0.7:9443", "/metrics", "not_found"),
        ]
        for recognition, address, path, reason in cases:
            decision = self.policy.decide_request(recognition, address, path, ())
            self.assertEqual(
                (decision_status(decision), decision.reason, decision.refusal),
                (403, reason, Refusal.FORBIDDEN),
            )

    def test_params(self) -> None:
        allowed = self.policy.decide_request(
            self.ok, "10.0.0.5:9100", "/metrics", (("collect[]", "cpu"),)
        )
        self.assertEqual(allowed.params, (("collect[]", "cpu"),))
        refused = self.policy.decide_request(self.ok, "10.0.0.5:9100", "/metrics", (("x", "1"),))
        self.assertEqual((decision_status(refused), refused.reason), (400, "param_refused"))

    def test_connect(self) -> None:
        """CONNECT reaches https routes only; names compare without case."""
        decision = self.policy.decide_connect(self.ok, "exporter.example.org:9443")
        assert decision.target is not None
        self.assertEqual(decision.target.address, "Exporter.Example.org:9443")
        self.assertTrue(self.policy.decide_connect(self.ok, "[2001:db8::1]:9443").allowed)
        # A plain-text target would let a tunnel bypass its route's paths.
        plain = self.policy.decide_connect(self.ok, "10.0.0.5:9100")
        self.assertEqual((decision_status(plain), plain.reason), (403, "not_found"))
        ops = self.policy.decide_connect(Recognition(OPS, "ok"), "10.0.0.7:9443")
        self.assertEqual((decision_status(ops), ops.reason), (403, "authz_denied"))

    def test_no_credentials(self) -> None:
        """Missing or failed credentials ask for Proxy-Authorization (407); an unknown
        certificate or a conflict is a 403."""
        for reason, status in [
            ("authn_missing", 407),
            ("authn_failed", 407),
            ("authn_conflict", 403),
            ("unknown_identity", 403),
            ("no_credentials", 403),
        ]:
            decision = self.policy.decide_connect(Recognition(None, reason), "10.0.0.7:9443")
            self.assertEqual((decision_status(decision), decision.reason), (status, reason))
        quiet = ForwardPolicy(ROUTES, challenge=False)
        decision = quiet.decide_connect(Recognition(None, "authn_missing"), "10.0.0.7:9443")
        self.assertEqual(decision_status(decision), 403)


# -- the gateway ---------------------------------------------------------------------------------


class ForwardTestCase(SynchronousTestCase):
    """A ForwardGateway on a memory reactor, a fake pool and an in-memory audit sink."""

    tls: TLSFiles | None = None

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)
        self.audit = MemoryAuditSink()
        self.limiter = RateLimiter(self.clock)
        self.metrics = Metrics()
        self.pool = UpstreamPool(self.clock)
        self.upstreams = PendingUpstreams(self.clock)
        self.listener, self.config = make_config(self.tls)
        self.threads: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []
        self.gateway = ForwardGateway(
            self.listener,
            self.config,
            reactor=self.clock,
            clock=self.clock,
            limiter=self.limiter,
            audit=self.audit,
            metrics=self.metrics,
            pool=self.pool,
            authenticator=Authenticator(self.config.identities, run_in_thread=self.run_later),
        )

    def run_later(self, f: Any, *args: Any) -> Deferred[Any]:
        """A thread runner the test completes by hand (see ``finish_threads``)."""
        d: Deferred[Any] = Deferred()
        self.threads.append((d, f, args))
        return d

    def finish_threads(self) -> None:
        while self.threads:
            d, f, args = self.threads.pop(0)
            d.callback(f(*args))

    def client(
        self, identity: Identity | None = PROMETHEUS
    ) -> tuple[DownstreamProtocol, StringTransport]:
        """A plain-text client connection; ``identity`` as if named by its certificate."""
        proto = HTTPListenerFactory(self.gateway.http).buildProtocol(None)
        transport = HalfCloseTransport(
            hostAddress=IPv4Address("TCP", "192.0.2.1", 3128),
            peerAddress=IPv4Address("TCP", "198.51.100.7", 40000),
        )
        proto.makeConnection(transport)
        if identity is not None:
            proto.recognition = Recognition(identity, "ok")
        return proto, transport

    def send(
        self, data: bytes, identity: Identity | None = PROMETHEUS
    ) -> tuple[DownstreamProtocol, StringTransport]:
        proto, transport = self.client(identity)
        proto.dataReceived(data)
        return proto, transport

    def requests(self) -> list[AuditEvent]:
        return [e for e in self.audit.events if e.event == "request"]

    def response(self, transport: StringTransport) -> WireResponse:
        """The one response the client got (a 407 repeats Proxy-Authenticate: folded)."""
        data = transport.value()
        head, _, _ = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        challenges = b" | ".join(
            line.split(b": ", 1)[1]
            for line in lines[1:]
            if line.lower().startswith(b"proxy-authenticate:")
        )
        kept = [line for line in lines if not line.lower().startswith(b"proxy-authenticate:")]
        folded = [*kept, b"X-Challenges: " + challenges]
        (response,) = parse_responses(data.replace(head, b"\r\n".join(folded), 1))
        return attrs.evolve(response, raw=data)

    def assertRefused(
        self, transport: StringTransport, status: int, reason: str, *, route: str | None = None
    ) -> WireResponse:
        """One response with ``status``, audited once as a deny; no upstream touched."""
        response = self.response(transport)
        self.assertEqual(response.status, status)
        (event,) = self.requests()
        self.assertEqual(
            (event.decision, event.reason, event.status, event.route),
            ("deny", reason, status, route),
        )
        self.assertEqual(self.upstreams.pending, [])
        self.assertEqual(self.clock.tcpClients, [])
        for name in ROUTES:
            self.assertEqual(self.limiter.in_flight(name), 0)
        return response


class AbsoluteFormRelayTests(ForwardTestCase):
    """Absolute-form GETs go through the same relay as /scrape, in origin-form."""

    def test_relayed_in_origin_form(self) -> None:
        """The upstream gets origin-form, its own Host, the pass-listed headers and never a
        proxy credential; the body comes back byte for byte, audited under the identity."""
        head = request(
            b"GET",
            GET_NODE + b"?collect%5B%5D=cpu",
            b"User-Agent: Prometheus/2.42.0",
            b"Accept-Encoding: gzip",
            b"X-Prometheus-Scrape-Timeout-Seconds: 10",
            bearer(),
            b"Proxy-Connection: keep-alive",
            b"Authorization: Bearer for-the-origin",
            host=b"spoofed.example:1",
        )
        _, transport = self.send(head, identity=None)
        self.assertEqual(self.upstreams.pending, [NODE.address])
        upstream, upstream_transport = self.upstreams.accept()
        self.assertEqual(upstream.key, ("node", NODE.address))
        self.assertEqual(
            upstream_transport.value(),
            b"GET /metrics?collect%5B%5D=cpu HTTP/1.1\r\n"
            b"Host: 10.0.0.5:9100\r\n"
            b"Accept-Encoding: gzip\r\n"
            b"User-Agent: Prometheus/2.42.0\r\n"
            b"X-Prometheus-Scrape-Timeout-Seconds: 10\r\n\r\n",
        )
        self.clock.advance(0.25)
        upstream.dataReceived(OK_RESPONSE)
        response = self.response(transport)
        self.assertEqual((response.status, response.body), (200, METRICS))
        (event,) = self.audit.events
        self.assertEqual(
            event,
            AuditEvent(
                event="request",
                listener="egress",
                peer="198.51.100.7:40000",
                identity="agent",
                route="node",
                target="10.0.0.5:9100",
                method="GET",
                path="/metrics",
                decision="allow",
                reason="ok",
                status=200,
                bytes_in=len(head),
                bytes_out=len(transport.value()),
                duration=0.25,
            ),
        )
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.limiter.in_flight("node"), 0)

    def test_keep_alive_and_second_route(self) -> None:
        """Requests follow one another on a connection; each picks its own route."""
        proto, _ = self.send(request(b"GET", GET_NODE))
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(OK_RESPONSE)
        proto.dataReceived(request(b"GET", b"http://10.0.0.5:9100/extra"))
        _, upstream_transport = self.upstreams.accept()
        self.assertTrue(upstream_transport.value().startswith(b"GET /extra HTTP/1.1\r\n"))
        self.assertEqual([e.route for e in self.requests()], ["node"])

    def test_canonical_path_upstream(self) -> None:
        """An escaped unreserved character is decoded: policy saw /metrics, upstream too."""
        self.send(request(b"GET", b"http://10.0.0.5:9100/metric%73"))
        _, upstream_transport = self.upstreams.accept()
        self.assertTrue(upstream_transport.value().startswith(b"GET /metrics HTTP/1.1\r\n"))

    def test_head(self) -> None:
        self.send(request(b"HEAD", GET_NODE))
        _, upstream_transport = self.upstreams.accept()
        self.assertTrue(upstream_transport.value().startswith(b"HEAD /metrics HTTP/1.1\r\n"))


class RefusalTests(ForwardTestCase):
    """What the forward listener refuses, and how; it is never an open proxy."""

    def test_path_refused(self) -> None:
        _, transport = self.send(request(b"GET", b"http://10.0.0.5:9100/debug/pprof"))
        response = self.assertRefused(transport, 403, "path_refused", route="node")
        self.assertEqual(response.body, FORBIDDEN)
        self.assertFalse(transport.disconnecting)

    def test_not_a_target(self) -> None:
        """Anything not in a route: 403 with the same body as any other refusal."""
        _, transport = self.send(request(b"GET", b"http://example.org/"))
        response = self.assertRefused(transport, 403, "not_found")
        self.assertEqual(response.body, FORBIDDEN)

    def test_not_allowed(self) -> None:
        _, transport = self.send(request(b"GET", b"http://127.0.0.1:9099/metrics"))
        self.assertRefused(transport, 403, "authz_denied", route="admin")

    def test_malformed_path(self) -> None:
        _, transport = self.send(request(b"GET", b"http://10.0.0.5:9100/metrics/%2e%2e/x"))
        self.assertRefused(transport, 400, "path_refused", route="node")

    def test_param_refused(self) -> None:
        _, transport = self.send(request(b"GET", GET_NODE + b"?debug=1"))
        self.assertRefused(transport, 400, "param_refused", route="node")

    def test_origin_form(self) -> None:
        """The listener is not a reverse gateway: origin-form gets 400, and closes."""
        _, transport = self.send(request(b"GET", b"/scrape?route=node&target=10.0.0.5%3A9100"))
        self.assertRefused(transport, 400, "bad_request")
        self.assertTrue(transport.disconnecting)

    def test_https_url(self) -> None:
        _, transport = self.send(request(b"GET", b"https://10.0.0.7:9443/metrics"))
        self.assertRefused(transport, 400, "bad_request")

    def test_method(self) -> None:
        _, transport = self.send(request(b"POST", GET_NODE))
        response = self.assertRefused(transport, 405, "method_not_allowed")
        self.assertEqual(response.headers[b"allow"], b"GET, HEAD, CONNECT")

    def test_proxy_authentication_required(self) -> None:
        """No credentials at all: 407 with a challenge for each configured scheme."""
        proto, transport = self.client(identity=None)
        proto.recognition = self.gateway.http.authenticator.for_connection(None)
        proto.dataReceived(request(b"GET", GET_NODE))
        response = self.assertRefused(transport, 407, "authn_missing")
        self.assertIn(b"Bearer", response.raw)
        self.assertIn(b"Proxy-Authenticate: Basic", response.raw)
        self.assertNotIn(b"WWW-Authenticate", response.raw)

    def test_wrong_token(self) -> None:
        _, transport = self.send(request(b"GET", GET_NODE, bearer(b"wrong")), identity=None)
        self.assertRefused(transport, 407, "authn_failed")

    def test_conflicting_credentials(self) -> None:
        """A certificate naming one identity and a token naming another: 403."""
        _, transport = self.send(request(b"GET", GET_NODE, bearer()), identity=PROMETHEUS)
        self.assertRefused(transport, 403, "authn_conflict")

    def test_basic_auth_in_a_thread(self) -> None:
        """Basic credentials (bcrypt, in a thread): no further request is read meanwhile."""
        proto, transport = self.client(identity=None)
        proto.dataReceived(
            request(b"GET", GET_NODE, basic(b"alice", b"s3cret"))
            + request(b"GET", b"http://10.0.0.5:9100/extra", basic(b"alice", b"s3cret"))
        )
        self.assertEqual((transport.value(), self.upstreams.pending), (b"", []))
        self.finish_threads()
        self.assertEqual(len(self.upstreams.pending), 1)
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(OK_RESPONSE)
        self.assertEqual(self.requests()[0].identity, "alice")
        # The pipelined request, now; its password was checked already (cached).
        self.assertEqual((len(self.upstreams.pending), self.threads), (1, []))

    def test_rate_limited(self) -> None:
        """The route's limits apply to CONNECT as to /scrape: 429 and, for CONNECT, close."""
        self.send(request(b"CONNECT", b"10.0.0.8:443"))
        self.assertEqual(len(self.clock.tcpClients), 1)
        _, transport = self.send(request(b"CONNECT", b"10.0.0.8:443"))
        response = self.response(transport)
        self.assertEqual((response.status, response.headers[b"retry-after"]), (429, b"1"))
        self.assertEqual(self.requests()[-1].reason, "concurrency_limited")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.clock.tcpClients), 1)


# -- CONNECT -------------------------------------------------------------------------------------


class TunnelTestCase(ForwardTestCase):
    """Helpers to open a tunnel whose upstream end is a StringTransport."""

    def open_tunnel(
        self, target: bytes = b"10.0.0.7:9443", early: bytes = b"", identity: Identity = PROMETHEUS
    ) -> tuple[DownstreamProtocol, StringTransport, Any, StringTransport]:
        head = request(b"CONNECT", target)
        proto, transport = self.send(head + early, identity=identity)
        self.assertEqual(transport.value(), b"")  # nothing until the upstream answers
        upstream, upstream_transport = self.accept_upstream()
        self.assertEqual(transport.value(), CONNECT_OK)
        transport.clear()
        return proto, transport, upstream, upstream_transport

    def accept_upstream(self) -> tuple[Any, StringTransport]:
        """Complete the oldest connect the tunnel started."""
        host, port, factory, timeout, _ = self.clock.tcpClients.pop(0)
        self.clock.connectors.pop(0)
        self.assertEqual(timeout, self.listener.deadlines.upstream_connect)
        upstream = factory.buildProtocol(IPv4Address("TCP", host, port))
        upstream_transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", host, port))
        upstream.makeConnection(upstream_transport)
        return upstream, upstream_transport

    def tunnel_record(self) -> AuditEvent:
        (event,) = self.requests()
        self.assertEqual(event.method, "CONNECT")
        return event


class TunnelTests(TunnelTestCase):
    """CONNECT: a byte-exact tunnel, audited once, at its end."""

    def test_bytes_both_ways(self) -> None:
        """Early bytes go first; then every byte, untouched, both ways; one record at the end
        with identity, route, target, bytes each way, duration and how it ended."""
        early = b"\x16\x03\x01 early client hello"
        head = request(b"CONNECT", b"10.0.0.7:9443")
        proto, transport, upstream, upstream_transport = self.open_tunnel(early=early)
        self.assertEqual(self.clock.tcpClients, [])
        self.assertEqual(upstream_transport.value(), early)
        self.assertEqual(self.audit.events, [])
        self.assertEqual(self.limiter.in_flight("secure"), 1)
        payload = bytes(range(256)) * 4 + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        proto.dataReceived(payload)
        upstream.dataReceived(payload[::-1])
        self.assertEqual(upstream_transport.value(), early + payload)
        self.assertEqual(transport.value(), payload[::-1])
        self.clock.advance(7)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(upstream_transport.disconnecting)
        self.assertEqual(self.requests(), [])  # recorded once both sides are gone
        upstream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            self.tunnel_record(),
            AuditEvent(
                event="request",
                listener="egress",
                peer="198.51.100.7:40000",
                identity="prometheus",
                route="secure",
                target="10.0.0.7:9443",
                method="CONNECT",
                decision="allow",
                reason="client_closed",
                status=200,
                bytes_in=len(head) + len(early) + len(payload),
                bytes_out=len(CONNECT_OK) + len(payload),
                duration=7.0,
            ),
        )
        self.assertEqual(self.limiter.in_flight("secure"), 0)

    def test_client_half_close_passed_on(self) -> None:
        """A client's FIN (plain TCP) is passed on as a FIN; the upstream's answer still
        comes back, and its close ends the tunnel, audited once as client_closed (the side
        that ended first)."""
        proto, transport, upstream, upstream_transport = self.open_tunnel()
        proto.dataReceived(b"ping")
        proto.readConnectionLost()
        self.assertEqual(upstream_transport.value(), b"ping")
        self.assertTrue(upstream_transport.write_closed)  # a FIN
        self.assertFalse(transport.disconnecting)
        upstream.dataReceived(b"pong")
        self.assertEqual(transport.value(), b"pong")
        upstream.readConnectionLost()
        self.assertTrue(transport.write_closed)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.requests(), [])
        proto.connectionLost(Failure(ConnectionDone()))
        upstream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.tunnel_record().reason, "client_closed")
        self.assertEqual(self.limiter.in_flight("secure"), 0)

    def test_upstream_closes(self) -> None:
        """The upstream ends the tunnel: the client gets what was sent, then a close."""
        proto, transport, upstream, _ = self.open_tunnel()
        upstream.dataReceived(b"last words")
        upstream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(transport.value(), b"last words")
        self.assertTrue(transport.disconnecting)
        proto.dataReceived(b"GET http://10.0.0.5:9100/metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.tunnel_record().reason, "upstream_closed")
        self.assertEqual(self.upstreams.pending, [])

    def test_upstream_resets(self) -> None:
        proto, transport, upstream, _ = self.open_tunnel()
        upstream.connectionLost(Failure(ConnectionLost("reset")))
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.tunnel_record().reason, "upstream_reset")

    def test_name_resolved_once(self) -> None:
        """A target configured by name is connected to by that name, resolved once, by the
        connect itself: the gateway never resolves what the client wrote."""
        resolver = _CountingResolver("10.1.2.3")
        self.clock.installNameResolver(resolver)
        self.send(request(b"CONNECT", b"EXPORTER.example.org:9443"))
        self.assertEqual(resolver.names, ["Exporter.Example.org"])
        host, port, *_ = self.clock.tcpClients[0]
        self.assertEqual((host, port), ("10.1.2.3", 9443))

    def test_connect_refused(self) -> None:
        """The upstream refuses: 502, audited as allowed with that status, and closed."""
        _, transport = self.send(request(b"CONNECT", b"10.0.0.7:9443") + b"early")
        _, _, factory, _, _ = self.clock.tcpClients[0]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        response = self.response(transport)
        self.assertEqual(response.status, 502)
        self.assertTrue(transport.disconnecting)
        (event,) = self.requests()
        self.assertEqual(
            (event.decision, event.reason, event.status, event.route, event.method),
            ("allow", "upstream_refused", 502, "secure", "CONNECT"),
        )
        self.assertEqual(self.limiter.in_flight("secure"), 0)

    def test_connect_timeout(self) -> None:
        _, transport = self.send(request(b"CONNECT", b"10.0.0.7:9443"))
        _, _, factory, _, _ = self.clock.tcpClients[0]
        factory.clientConnectionFailed(None, Failure(ConnectTimeoutError()))
        self.assertEqual(self.response(transport).status, 504)
        self.assertEqual(self.requests()[0].reason, "upstream_timeout")

    def test_client_gone_while_connecting(self) -> None:
        """The client leaves before the upstream answers: one record, nothing connected."""
        proto, _ = self.send(request(b"CONNECT", b"10.0.0.7:9443"))
        proto.connectionLost(Failure(ConnectionDone()))
        (event,) = self.requests()
        self.assertEqual(
            (event.reason, event.status, event.method), ("client_aborted", None, "CONNECT")
        )
        self.assertEqual(self.limiter.in_flight("secure"), 0)
        self.assertTrue(self.clock.connectors[0].stoppedConnecting)

    def test_revoked_while_connecting(self) -> None:
        """A reload revokes a CONNECT whose upstream is still being connected: the one
        record says policy_revoked, with the rule, not that the client went away."""
        proto, transport = self.send(request(b"CONNECT", b"10.0.0.7:9443"))
        assert proto.tunnel is not None
        proto.tunnel.revoke("reload: no rule allows it")
        self.assertTrue(transport.disconnecting or transport.disconnected)
        proto.connectionLost(Failure(ConnectionLost()))
        (event,) = self.requests()
        self.assertEqual(
            (event.reason, event.status, event.method, event.detail),
            ("policy_revoked", None, "CONNECT", "reload: no rule allows it"),
        )
        self.assertEqual(self.limiter.in_flight("secure"), 0)

    def test_shutdown(self) -> None:
        """The gateway stops: the tunnel is cut both ways and audited as such."""
        proto, _, upstream, upstream_transport = self.open_tunnel()
        self.assertEqual(self.gateway.http.shut_down_connections(), 1)
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(upstream_transport.disconnected)
        upstream.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.tunnel_record().reason, "gateway_shutdown")

    def test_metrics(self) -> None:
        proto, _, upstream, _ = self.open_tunnel()
        gauge = self.metrics.registry.get_sample_value
        self.assertEqual(gauge("promgate_open_tunnels", {"listener": "egress"}), 1.0)
        proto.connectionLost(Failure(ConnectionDone()))
        upstream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(gauge("promgate_open_tunnels", {"listener": "egress"}), 0.0)
        self.assertEqual(
            gauge(
                "promgate_tunnel_duration_seconds_count", {"listener": "egress", "route": "secure"}
            ),
            1.0,
        )
        self.assertEqual(
            gauge(
                "promgate_requests_total",
                {"listener": "egress", "route": "secure", "identity": "prometheus", "code": "200"},
            ),
            1.0,
        )


class TunnelIdleTests(TunnelTestCase):
    """A tunnel with nothing moving either way is closed after ``tunnel_idle``."""

    def test_idle(self) -> None:
        proto, transport, upstream, upstream_transport = self.open_tunnel()
        self.clock.advance(TUNNEL_IDLE - 1)
        proto.dataReceived(b"ping")
        self.clock.advance(TUNNEL_IDLE - 1)
        upstream.dataReceived(b"pong")
        self.clock.advance(TUNNEL_IDLE - 1)
        self.assertEqual(self.audit.events, [])
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        # Both sides are closed; the tunnel is audited once both are gone.
        self.assertTrue(transport.disconnecting)
        self.assertTrue(upstream_transport.disconnecting)
        proto.connectionLost(Failure(ConnectionDone()))
        upstream.connectionLost(Failure(ConnectionDone()))
        event = self.tunnel_record()
        self.assertEqual(
            (event.reason, event.duration), ("tunnel_idle_timeout", 3 * (TUNNEL_IDLE - 1) + 1)
        )
        self.assertEqual(self.limiter.in_flight("secure"), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class TunnelBackPressureTests(TunnelTestCase):
    """Producers registered both ways: neither side can make the gateway buffer."""

    def test_slow_client_pauses_upstream(self) -> None:
        _, transport, _, upstream_transport = self.open_tunnel()
        relay = transport.producer  # the relay's, registered once the tunnel opened
        self.assertIsNotNone(relay)
        relay.pauseProducing()  # the client's socket is full
        self.assertEqual(upstream_transport.producerState, "paused")
        relay.resumeProducing()
        self.assertEqual(upstream_transport.producerState, "producing")

    def test_slow_upstream_pauses_client(self) -> None:
        _, transport, _, upstream_transport = self.open_tunnel()
        tunnel = upstream_transport.producer
        self.assertIsNotNone(tunnel)
        tunnel.pauseProducing()  # the upstream's socket is full
        self.assertEqual(transport.producerState, "paused")
        tunnel.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_early_data_bounded(self) -> None:
        """While the upstream is being connected the client is not read; bytes that come
        anyway (a transport that ignores the pause) are held up to a bound, and go
        upstream first once it is there."""
        proto, transport = self.send(request(b"CONNECT", b"10.0.0.7:9443") + b"early")
        self.assertEqual(transport.producerState, "paused")
        chunk = b"x" * 4096
        proto.dataReceived(chunk)
        _, upstream_transport = self.accept_upstream()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(upstream_transport.value(), b"early" + chunk)

    def test_early_data_overflow(self) -> None:
        """Beyond the bound, the connection is cut and the tunnel audited as such."""
        proto, transport = self.send(request(b"CONNECT", b"10.0.0.7:9443"))
        chunk = b"x" * 4096
        for _ in range(MAX_PENDING // len(chunk) + 1):
            proto.dataReceived(chunk)
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionLost()))
        (event,) = self.requests()
        self.assertEqual((event.reason, event.status), ("client_aborted", None))
        self.assertEqual(self.limiter.in_flight("secure"), 0)

    def test_early_data_overflow_then_upstream(self) -> None:
        """An upstream that connects after the client was cut for overflowing, but before
        its loss is seen, is closed at once and is sent nothing the client sent."""
        proto, transport = self.send(request(b"CONNECT", b"10.0.0.7:9443"))
        chunk = b"x" * 4096
        for _ in range(MAX_PENDING // len(chunk) + 1):
            proto.dataReceived(chunk)
        self.assertTrue(transport.disconnecting)
        _, upstream_transport = self.accept_upstream()
        self.assertEqual(upstream_transport.value(), b"")
        self.assertTrue(upstream_transport.disconnecting)
        proto.connectionLost(Failure(ConnectionLost()))
        (event,) = self.requests()
        self.assertEqual(event.status, None)
        self.assertEqual(self.limiter.in_flight("secure"), 0)


class RefusedConnectTests(TunnelTestCase):
    """A refused CONNECT answers, closes, and never reads what followed its head."""

    SMUGGLED = b"GET http://10.0.0.5:9100/metrics HTTP/1.1\r\nHost: 10.0.0.5:9100\r\n\r\n"

    def assertClosedRefusal(
        self, transport: StringTransport, status: int, reason: str
    ) -> WireResponse:
        response = self.assertRefused(transport, status, reason, route=self.requests()[0].route)
        self.assertEqual(response.headers[b"connection"], b"close")
        self.assertTrue(transport.disconnecting)
        return response

    def test_forbidden_then_early_bytes(self) -> None:
        """The bytes after a refused CONNECT head are not a request: one answer, one record,
        whether they came with the head or after the answer."""
        proto, transport = self.send(request(b"CONNECT", b"10.0.0.5:9100") + self.SMUGGLED)
        proto.dataReceived(self.SMUGGLED)
        response = self.assertClosedRefusal(transport, 403, "not_found")
        self.assertEqual(response.body, FORBIDDEN)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.requests()), 1)

    def test_not_allowed(self) -> None:
        _, transport = self.send(request(b"CONNECT", b"127.0.0.1:9443") + self.SMUGGLED)
        self.assertClosedRefusal(transport, 403, "authz_denied")

    def test_proxy_authentication_required(self) -> None:
        proto, transport = self.client(identity=None)
        proto.recognition = self.gateway.http.authenticator.for_connection(None)
        proto.dataReceived(request(b"CONNECT", b"10.0.0.7:9443") + self.SMUGGLED)
        response = self.assertClosedRefusal(transport, 407, "authn_missing")
        self.assertIn(b"Proxy-Authenticate: Bearer", response.raw)

    def test_refused_after_a_thread(self) -> None:
        """Wrong basic credentials, checked in a thread while more bytes arrive: 407, and
        those bytes are still never parsed."""
        proto, transport = self.client(identity=None)
        proto.dataReceived(request(b"CONNECT", b"10.0.0.7:9443", basic(b"alice", b"nope")))
        proto.dataReceived(self.SMUGGLED)
        self.finish_threads()
        self.assertClosedRefusal(transport, 407, "authn_failed")

    def test_allowed_after_a_thread(self) -> None:
        """Right basic credentials: the bytes that arrived meanwhile go through the tunnel."""
        proto, transport = self.client(identity=None)
        proto.dataReceived(request(b"CONNECT", b"10.0.0.7:9443", basic(b"alice", b"s3cret")))
        proto.dataReceived(b"early")
        self.finish_threads()
        upstream, upstream_transport = self.accept_upstream()
        self.assertEqual((transport.value(), upstream_transport.value()), (CONNECT_OK, b"early"))
        proto.connectionLost(Failure(ConnectionDone()))
        upstream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.tunnel_record().identity, "alice")

    def test_malformed_target(self) -> None:
        _, transport = self.send(request(b"CONNECT", b"10.0.0.7") + self.SMUGGLED)
        self.assertClosedRefusal(transport, 400, "bad_request")


@implementer(IHostnameResolver)
class _CountingResolver:
    """Resolves every name to one address, and remembers the names asked for."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.names: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,  # noqa: N803
        hostName: str,  # noqa: N803
        portNumber: int = 0,  # noqa: N803
        addressTypes: Any = None,  # noqa: N803
        transportSemantics: str = "TCP",  # noqa: N803
    ) -> Any:
        self.names.append(hostName)
        resolutionReceiver.resolutionBegan(None)  # type: ignore[arg-type]
        resolutionReceiver.addressResolved(IPv4Address("TCP", self.address, portNumber))
        resolutionReceiver.resolutionComplete()
        return None


_PKI: TestPKI | None = None


def _pki(base: Path) -> TestPKI:
    """One test PKI for the whole module (issuing certificates is the slow part)."""
    global _PKI
    if _PKI is None:
        _PKI = TestPKI(base)
    return _PKI


class MutualTLSTunnelTests(TunnelTestCase):
    """Over a TLS proxy connection (an ``https://`` proxy_url): the client certificate names
    the caller, and the tunnel carries bytes inside that TLS session."""

    def setUp(self) -> None:
        self.pki = _pki(Path(self.mktemp()).resolve())
        self.tls = TLSFiles(self.pki.gate_cert, self.pki.gate_key, self.pki.ca_cert)
        super().setUp()

    def test_tunnel_over_tls(self) -> None:
        server_factory = TLSMemoryBIOFactory(
            server_tls(self.tls), False, HTTPListenerFactory(self.gateway.http), clock=self.clock
        )
        cert, key = self.pki.client("prometheus")
        creator = optionsForClientTLS(
            "localhost",
            trustRoot=Certificate.loadPEM(self.pki.ca_cert.read_bytes()),
            clientCertificate=PrivateCertificate.loadPEM(cert.read_bytes() + key.read_bytes()),
        )
        client = Collector()
        client_factory = TLSMemoryBIOFactory(
            creator, True, ClientFactory.forProtocol(lambda: client), clock=self.clock
        )
        client_wire, _, pump = iosim.connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            serverTransportFactory=server_transport,
            greet=False,
            clock=self.clock,
        )
        client_wire.write(request(b"CONNECT", b"10.0.0.7:9443"))
        pump.flush()
        upstream, upstream_transport = self.accept_upstream()
        pump.flush()
        self.assertEqual(client.data, CONNECT_OK)
        client_wire.write(b"inner bytes")
        pump.flush()
        upstream.dataReceived(b"inner answer")
        pump.flush()
        self.assertEqual(upstream_transport.value(), b"inner bytes")
        self.assertEqual(client.data, CONNECT_OK + b"inner answer")
        client_wire.loseConnection()
        pump.flush()
        self.assertTrue(upstream_transport.disconnecting)
        upstream.connectionLost(Failure(ConnectionDone()))
        event = self.tunnel_record()
        self.assertEqual((event.identity, event.reason), ("prometheus", "client_closed"))
        self.assertIsNotNone(event.cert_sha256)


class ConfigTests(SynchronousTestCase):
    """``protocol: forward`` listeners in the configuration."""

    def check(self, listeners: str) -> tuple[Config | None, list[str]]:
        base = Path(self.mktemp())
        base.mkdir()
        (base / "audit.key").write_text("k" * 64 + "\n")
        (base / "audit.key").chmod(0o600)
        (base / "promgate.yaml").write_text(
            "listeners:\n" + listeners + "audit: {path: audit.jsonl, key_file: audit.key}\n"
        )
        config, errors, _ = check_config(base / "promgate.yaml")
        return config, [f"{p.key}: {p.message}" for p in errors]

    def test_forward_listener(self) -> None:
        """Same ``tls`` semantics as http listeners; ``tunnel_idle`` defaults to 300s."""
        config, errors = self.check(
            '  - {name: egress, protocol: forward, endpoint: "tcp:3128", tls: false}\n'
            '  - {name: quick, protocol: forward, endpoint: "tcp:3129", tls: false,'
            " tunnel_idle: 2s}\n"
        )
        self.assertEqual(errors, [])
        assert config is not None
        egress, quick = config.listeners
        self.assertEqual((egress.protocol, egress.tls), ("forward", None))
        self.assertEqual(egress.deadlines.tunnel_idle, 300.0)
        self.assertEqual(quick.deadlines.tunnel_idle, 2.0)

    def test_refused(self) -> None:
        _, errors = self.check(
            '  - {name: a, protocol: forward, endpoint: "tcp:1", tls: false, tunnel_idle: 0s}\n'
            '  - {name: b, protocol: http, endpoint: "tcp:2", tls: false, tunnel_idle: 2s}\n'
            '  - {name: c, protocol: forward, endpoint: "tcp:3", tls: false,'
            " advertise: 'gate:3'}\n"
            '  - {name: d, protocol: forward, endpoint: "tcp:4"}\n'
        )
        expected = [
            "listeners[0].tunnel_idle: must be greater than zero",
            "listeners[1].tunnel_idle: only forward",
            "listeners[2].advertise: only http listeners advertise",
            "listeners[3]: no top-level 'tls' section",
        ]
        self.assertEqual(len(errors), len(expected), errors)
        for error, start in zip(sorted(errors), expected, strict=True):
            self.assertTrue(error.startswith(start), error)
