"""Tests for tcp listeners, in memory: the per-connection policy, routing by SNI, refusals
and limits, the relay (byte exact, half-close, back-pressure, idle deadline), the one audit
record per connection, the PROXY header, mutual TLS with real handshakes over iosim, and the
listener's configuration keys."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import attrs
from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from promgate.audit import AuditEvent, MemoryAuditSink
from promgate.config.loader import check_config
from promgate.config.model import (
    Admin,
    Audit,
    CertMatch,
    Config,
    Destination,
    Identity,
    Limits,
    Listener,
    Route,
    Target,
    TCPForwarding,
    TLSFiles,
)
from promgate.identity import Recognition
from promgate.listeners.tcp import TCPDownstream, TCPGateway, TCPGatewayFactory
from promgate.metrics import Metrics
from promgate.net.proxyproto import (
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_PROMGATE_IDENTITY,
    PP2_TYPE_SSL,
    decode_ssl_tlv,
    decode_v2,
)
from promgate.net.relay import CLOSE_LINGER
from promgate.net.relay_upstream import EndpointConnector, TCPUpstream, TLSUpstream
from promgate.policy import ConnectionPolicy, RouteRules, match_server_name
from promgate.ratelimit import RateLimiter
from promgate.testing import TestPKI
from promgate.testing.hello import python_client_hello
from promgate.tls import server_tls

PROMETHEUS = Identity(
    "prometheus",
    cert=(CertMatch(uri="spiffe://promgate.local/prometheus"),),
    roles=frozenset({"scraper"}),
)
OPS = Identity("ops", cert=(CertMatch(cn="ops"),))
NODE = Target("10.0.0.5:9100")
ROUTES = {
    "node": Route("node", (NODE,), allow=("role:scraper",)),
    "two": Route("two", (NODE, Target("10.0.0.6:9100")), allow=("role:scraper",)),
    "secure": Route("secure", (Target("10.0.0.7:9443"),), scheme="https", allow=("prometheus",)),
    "pass-a": Route("pass-a", (Target("10.0.1.1:443"),), allow=("sni:*",)),
    "pass-b": Route("pass-b", (Target("10.0.1.2:443"),), allow=("sni:b.example.org",)),
    "wild": Route("wild", (Target("10.0.1.5:443"),), allow=("sni:*.example.net",)),
    "closed": Route("closed", (Target("10.0.1.3:443"),), allow=("prometheus", "role:scraper")),
    "single": Route(
        "single", (Target("10.0.1.4:443"),), allow=("sni:*",), limits=Limits(max_concurrent=1)
    ),
    "rated": Route(
        "rated",
        (Target("10.0.1.6:443"),),
        allow=("sni:*",),
        limits=Limits(rate=1.0, burst=1, per="target"),
    ),
}
PEER = IPv4Address("TCP", "198.51.100.7", 40000)
LOCAL = IPv4Address("TCP", "192.0.2.1", 9101)


def dest(route: str) -> Destination:
    return Destination(route, ROUTES[route].targets[0].address)


PASS_SNI = TCPForwarding(
    mode="passthrough",
    sni={
        "a.example.org": dest("pass-a"),
        "b.example.org": dest("pass-b"),
        "*.example.net": dest("wild"),
    },
)


class HalfCloseTransport(StringTransport):
    """A StringTransport that also records a half-close (TCP shutdown of writing)."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


@attrs.define
class PendingConnect:
    route: Route
    target: Target
    header: bytes
    tls: bool
    deferred: Deferred[TCPUpstream]


class FakeConnector:
    """An upstream connector whose connections the test completes (or fails) by hand."""

    def __init__(self) -> None:
        self.pending: list[PendingConnect] = []

    def connect(
        self, route: Route, target: Target, header: bytes, tls: bool
    ) -> Deferred[TCPUpstream]:
        def cancel(d: Deferred[TCPUpstream]) -> None:
            d.errback(ConnectingCancelledError(IPv4Address("TCP", target.host, target.port)))

        d: Deferred[TCPUpstream] = Deferred(cancel)
        self.pending.append(PendingConnect(route, target, header, tls, d))
        return d

    def accept(self) -> tuple[TCPUpstream, HalfCloseTransport]:
        """Complete the oldest pending connect with an upstream on a StringTransport."""
        pending = self.pending.pop(0)
        upstream = TCPUpstream(pending.header, None)
        transport = HalfCloseTransport(
            peerAddress=IPv4Address("TCP", pending.target.host, pending.target.port)
        )
        upstream.makeConnection(transport)
        pending.deferred.callback(upstream)
        return upstream, transport


def lose(proto: Protocol, clean: bool = True) -> None:
    """Tell a protocol its connection is gone, as the reactor would."""
    proto.connectionLost(Failure(ConnectionDone() if clean else ConnectionLost()))


class TCPTestCase(SynchronousTestCase):
    """A TCPGateway with a fake connector, a clock and an in-memory audit sink."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)
        self.audit = MemoryAuditSink()
        self.limiter = RateLimiter(self.clock)
        self.metrics = Metrics()
        self.connector = FakeConnector()

    def gateway(
        self, tcp: TCPForwarding, tls: TLSFiles | None = None, on_failure: str = "deny"
    ) -> TCPGateway:
        listener = Listener("raw", "tcp", "tcp:9101", tls, tcp=tcp)
        config = Config(
            source=Path("promgate.yaml"),
            listeners=(listener,),
            identities={"prometheus": PROMETHEUS, "ops": OPS},
            routes=ROUTES,
            admin=Admin(),
            audit=Audit(Path("audit.jsonl"), Path("audit.key"), on_failure=on_failure),
        )
        self.gw = TCPGateway(
            listener,
            config,
            clock=self.clock,
            limiter=self.limiter,
            audit=self.audit,
            metrics=self.metrics,
            connector=self.connector,
        )
        return self.gw

    def client(self) -> tuple[TCPDownstream, HalfCloseTransport]:
        proto = TCPGatewayFactory(self.gw).buildProtocol(None)
        transport = HalfCloseTransport(hostAddress=LOCAL, peerAddress=PEER)
        proto.makeConnection(transport)
        return proto, transport

    def records(self) -> list[AuditEvent]:
        return [e for e in self.audit.events if e.event == "connection"]

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def tunnel(
        self, server_name: str = "a.example.org"
    ) -> tuple[TCPDownstream, HalfCloseTransport, TCPUpstream, HalfCloseTransport, bytes]:
        """A passthrough connection, its ClientHello read and its upstream connected."""
        if not hasattr(self, "gw"):
            self.gateway(PASS_SNI)
        proto, transport = self.client()
        hello = python_client_hello(server_name)
        proto.dataReceived(hello)
        upstream, upstream_transport = self.connector.accept()
        return proto, transport, upstream, upstream_transport, hello

    def assertRefused(
        self,
        transport: StringTransport,
        reason: str,
        route: str | None = None,
        *,
        busy: bool = False,
    ) -> AuditEvent:
        """Closed at once, nothing relayed, one deny record; with ``busy``, other tunnels
        are open (so connects and in-flight counts are theirs)."""
        self.assertTrue(transport.disconnecting, "refused connection left open")
        self.assertEqual(transport.value(), b"")
        event = self.records()[-1]
        self.assertEqual((event.decision, event.reason, event.route), ("deny", reason, route))
        self.assertEqual((event.bytes_in, event.bytes_out), (0, 0))
        if not busy:
            self.assertEqual(len(self.records()), 1)
            self.assertEqual(self.connector.pending, [])
            for name in ROUTES:
                self.assertEqual(self.limiter.in_flight(name), 0)
        self.assertEqual(
            self.sample(
                "promgate_tcp_connections_total",
                listener="raw",
                route=route or "",
                identity="none",
                reason=reason,
            ),
            1.0,
        )
        return event


class PolicyTests(SynchronousTestCase):
    """The per-connection decision as a pure function."""

    def test_match_server_name(self) -> None:
        """Exact names first, then one wildcard label; case and a final dot do not matter."""
        sni = {"a.example.org": dest("pass-a"), "*.example.org": dest("pass-b")}
        self.assertEqual(match_server_name(sni, "A.Example.org."), dest("pass-a"))
        self.assertEqual(match_server_name(sni, "x.example.org"), dest("pass-b"))
        self.assertIsNone(match_server_name(sni, "x.y.example.org"))
        self.assertIsNone(match_server_name(sni, "example.org"))
        self.assertIsNone(match_server_name(sni, None))

    def test_passthrough_allow_entries(self) -> None:
        """Only sni: entries admit a connection without an identity."""
        self.assertTrue(RouteRules.of(ROUTES["pass-a"]).authorize_server_name(None).allowed)
        self.assertTrue(
            RouteRules.of(ROUTES["pass-b"]).authorize_server_name("b.example.org").allowed
        )
        self.assertFalse(
            RouteRules.of(ROUTES["pass-b"]).authorize_server_name("a.example.org").allowed
        )
        self.assertFalse(RouteRules.of(ROUTES["pass-b"]).authorize_server_name(None).allowed)
        self.assertTrue(
            RouteRules.of(ROUTES["wild"]).authorize_server_name("x.example.net").allowed
        )
        self.assertFalse(RouteRules.of(ROUTES["wild"]).authorize_server_name("example.net").allowed)
        verdict = RouteRules.of(ROUTES["closed"]).authorize_server_name("a.example.org")
        self.assertEqual((verdict.allowed, verdict.reason), (False, "authz_denied"))

    def test_decide_terminate(self) -> None:
        """With TLS terminated, identities and roles decide, and sni: entries do not."""
        policy = ConnectionPolicy(TCPForwarding(destination=dest("node")), ROUTES)
        ok = policy.decide(Recognition(PROMETHEUS, "ok"), None)
        self.assertEqual((ok.allowed, ok.route, ok.target), (True, ROUTES["node"], NODE))
        denied = policy.decide(Recognition(OPS, "ok"), None)
        self.assertEqual((denied.allowed, denied.reason), (False, "authz_denied"))
        stranger = policy.decide(Recognition(None, "unknown_identity"), None)
        self.assertEqual((stranger.allowed, stranger.reason), (False, "unknown_identity"))
        open_to_sni = ConnectionPolicy(TCPForwarding(destination=dest("pass-a")), ROUTES)
        self.assertFalse(open_to_sni.decide(Recognition(OPS, "ok"), "a.example.org").allowed)

    def test_decide_sni(self) -> None:
        """No server name, or an unknown one, without sni_default: refused, named so."""
        policy = ConnectionPolicy(PASS_SNI, ROUTES)
        self.assertEqual(policy.decide(None, None).reason, "no_server_name")
        self.assertEqual(policy.decide(None, "c.example.org").reason, "unknown_server_name")
        with_default = ConnectionPolicy(attrs.evolve(PASS_SNI, sni_default=dest("pass-a")), ROUTES)
        decision = with_default.decide(None, "c.example.org")
        self.assertEqual((decision.allowed, decision.route), (True, ROUTES["pass-a"]))


class PassthroughTests(TCPTestCase):
    """Passthrough: the ClientHello picks the route; bytes pass untouched."""

    def test_relay_byte_exact(self) -> None:
        """The ClientHello and everything after it reach the upstream unchanged; the
        upstream's bytes reach the client unchanged; one audit record at the end."""
        proto, transport, upstream, upstream_transport, hello = self.tunnel()
        pending = self.connector
        self.assertEqual(pending.pending, [])
        self.assertEqual(upstream_transport.value(), hello)
        proto.dataReceived(b"\x17\x03\x03\x00\x01x")
        upstream.dataReceived(b"\x16\x03\x03server")
        upstream.dataReceived(b"more")
        self.assertEqual(upstream_transport.value(), hello + b"\x17\x03\x03\x00\x01x")
        self.assertEqual(transport.value(), b"\x16\x03\x03servermore")
        self.assertEqual(self.records(), [])
        self.clock.advance(2.5)
        lose(proto)
        self.assertTrue(upstream_transport.disconnecting)
        lose(upstream)
        (event,) = self.records()
        self.assertEqual(
            (event.listener, event.peer, event.route, event.target, event.server_name),
            ("raw", "198.51.100.7:40000", "pass-a", "10.0.1.1:443", "a.example.org"),
        )
        self.assertEqual((event.decision, event.reason), ("allow", "client_closed"))
        self.assertEqual((event.bytes_in, event.bytes_out), (len(hello) + 6, 13))
        self.assertEqual(event.duration, 2.5)
        self.assertIsNone(event.identity)
        self.assertIsNone(event.tls_version)
        self.assertEqual(self.limiter.in_flight("pass-a"), 0)
        self.assertEqual(
            self.sample("promgate_bytes_total", route="pass-a", direction="in"), len(hello) + 6
        )
        self.assertEqual(self.sample("promgate_bytes_total", route="pass-a", direction="out"), 13)
        self.assertEqual(
            self.sample(
                "promgate_tcp_connections_total",
                listener="raw",
                route="pass-a",
                identity="none",
                reason="client_closed",
            ),
            1.0,
        )
        self.assertEqual(
            self.sample("promgate_tcp_tunnels_open", listener="raw", route="pass-a"), 0
        )
        self.assertEqual(self.gw.open, set())

    @given(
        st.lists(st.binary(min_size=1, max_size=64), max_size=20),
        st.lists(st.binary(min_size=1, max_size=64), max_size=20),
    )
    def test_relay_property(self, up: list[bytes], down: list[bytes]) -> None:
        """Any interleaving of writes either way arrives whole and in order."""
        self.setUp()
        self.gateway(PASS_SNI)
        proto, transport, upstream, upstream_transport, hello = self.tunnel()
        for i in range(max(len(up), len(down))):
            if i < len(up):
                proto.dataReceived(up[i])
            if i < len(down):
                upstream.dataReceived(down[i])
        self.assertEqual(upstream_transport.value(), hello + b"".join(up))
        self.assertEqual(transport.value(), b"".join(down))

    def test_route_by_server_name(self) -> None:
        """Each server name goes to its own route's target."""
        self.gateway(PASS_SNI)
        for name, route in (
            ("a.example.org", "pass-a"),
            ("b.example.org", "pass-b"),
            ("x.example.net", "wild"),
        ):
            proto, _ = self.client()
            proto.dataReceived(python_client_hello(name))
            pending = self.connector.pending[-1]
            self.assertEqual((pending.route.name, pending.tls, pending.header), (route, False, b""))

    def test_client_hello_in_pieces(self) -> None:
        """A ClientHello arriving a byte at a time is read once complete, and relayed whole."""
        self.gateway(PASS_SNI)
        proto, _ = self.client()
        hello = python_client_hello("b.example.org")
        for i in range(len(hello) - 1):
            proto.dataReceived(hello[i : i + 1])
        self.assertEqual(self.connector.pending, [])
        proto.dataReceived(hello[-1:])
        _, upstream_transport = self.connector.accept()
        self.assertEqual(upstream_transport.value(), hello)

    def test_unknown_server_name(self) -> None:
        """A server name the listener does not route, and no sni_default: refused."""
        self.gateway(PASS_SNI)
        proto, transport = self.client()
        proto.dataReceived(python_client_hello("c.example.org"))
        event = self.assertRefused(transport, "unknown_server_name")
        self.assertEqual(event.server_name, "c.example.org")

    def test_no_server_name(self) -> None:
        """A ClientHello without SNI, and no sni_default: refused."""
        self.gateway(PASS_SNI)
        proto, transport = self.client()
        proto.dataReceived(python_client_hello(None))
        self.assertRefused(transport, "no_server_name")

    def test_sni_default(self) -> None:
        """sni_default takes the names the map does not."""
        self.gateway(attrs.evolve(PASS_SNI, sni_default=dest("pass-a")))
        proto, _ = self.client()
        proto.dataReceived(python_client_hello(None))
        self.assertEqual(self.connector.pending[0].route.name, "pass-a")

    def test_route_without_sni_allow(self) -> None:
        """A route without a matching sni: entry refuses passthrough connections."""
        self.gateway(TCPForwarding(mode="passthrough", destination=dest("closed")))
        proto, transport = self.client()
        proto.dataReceived(python_client_hello("a.example.org"))
        event = self.assertRefused(transport, "authz_denied", "closed")
        self.assertEqual(event.target, "10.0.1.3:443")
        self.assertIn("no sni: entry", event.detail or "")

    def test_sni_entry_for_another_name(self) -> None:
        """sni:b.example.org admits b.example.org only."""
        self.gateway(TCPForwarding(mode="passthrough", destination=dest("pass-b")))
        proto, transport = self.client()
        proto.dataReceived(python_client_hello("a.example.org"))
        self.assertRefused(transport, "authz_denied", "pass-b")

    def test_not_tls(self) -> None:
        """Plain HTTP to a passthrough listener: refused at once, audited with the reason."""
        self.gateway(PASS_SNI)
        proto, transport = self.client()
        proto.dataReceived(b"GET / HTTP/1.1\r\n")
        event = self.assertRefused(transport, "plain_http")
        self.assertIn("plain HTTP", event.detail or "")

    def test_truncated_client_hello(self) -> None:
        """A client that half-closes mid-ClientHello is refused as truncated."""
        self.gateway(PASS_SNI)
        proto, transport = self.client()
        proto.dataReceived(python_client_hello("a.example.org")[:100])
        proto.readConnectionLost()
        self.assertRefused(transport, "client_hello_truncated")

    def test_closed_before_client_hello(self) -> None:
        """A connection closed with nothing sent (a port check) is audited as such."""
        self.gateway(PASS_SNI)
        proto, _ = self.client()
        lose(proto)
        (event,) = self.records()
        self.assertEqual((event.decision, event.reason), ("deny", "closed_before_client_hello"))
        self.assertEqual(self.gw.open, set())

    def test_client_hello_deadline(self) -> None:
        """A ClientHello not complete within the handshake deadline (10s): refused."""
        self.gateway(PASS_SNI)
        proto, transport = self.client()
        proto.dataReceived(b"\x16\x03\x01")
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertRefused(transport, "client_hello_timeout")
        lose(proto)
        self.assertEqual(len(self.records()), 1)

    def test_audit_unavailable(self) -> None:
        """With on_failure: deny, a connection is refused while the audit log fails."""
        self.gateway(PASS_SNI)
        self.audit.healthy = False
        proto, transport = self.client()
        proto.dataReceived(python_client_hello("a.example.org"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.connector.pending, [])
        self.assertEqual(self.limiter.in_flight("pass-a"), 0)


class LimitTests(TCPTestCase):
    """Per-route limits apply per connection; refusals close at once and are audited."""

    def test_concurrency_cap(self) -> None:
        """max_concurrent: 1 admits one tunnel; the next is refused until it ends."""
        self.gateway(TCPForwarding(mode="passthrough", destination=dest("single")))
        first, _ = self.client()
        first.dataReceived(python_client_hello("a.example.org"))
        upstream, _ = self.connector.accept()
        second, second_transport = self.client()
        second.dataReceived(python_client_hello("a.example.org"))
        self.assertRefused(second_transport, "concurrency_limited", "single", busy=True)
        self.assertEqual(self.limiter.in_flight("single"), 1)
        self.assertEqual(
            self.sample(
                "promgate_rate_limited_total", route="single", reason="concurrency_limited"
            ),
            1.0,
        )
        lose(first)
        lose(upstream)
        third, third_transport = self.client()
        third.dataReceived(python_client_hello("a.example.org"))
        self.assertEqual(len(self.connector.pending), 1)
        self.assertFalse(third_transport.disconnecting)

    def test_rate(self) -> None:
        """A token bucket on new connections: one per second here."""
        self.gateway(TCPForwarding(mode="passthrough", destination=dest("rated")))
        first, _ = self.client()
        first.dataReceived(python_client_hello("a.example.org"))
        second, second_transport = self.client()
        second.dataReceived(python_client_hello("a.example.org"))
        self.assertRefused(second_transport, "rate_limited", "rated", busy=True)
        self.assertEqual(len(self.connector.pending), 1)
        self.clock.advance(1.0)
        third, third_transport = self.client()
        third.dataReceived(python_client_hello("a.example.org"))
        self.assertFalse(third_transport.disconnecting)
        self.assertEqual(len(self.connector.pending), 2)


class RelayTests(TCPTestCase):
    """Half-close, back-pressure, deadlines and failures of an open tunnel."""

    def test_client_half_close(self) -> None:
        """The client's FIN becomes a FIN upstream; the upstream's answer still flows back;
        its FIN then ends the tunnel: reason client_closed."""
        proto, transport, upstream, upstream_transport, _ = self.tunnel()
        proto.readConnectionLost()
        self.assertTrue(upstream_transport.write_closed)
        self.assertFalse(transport.write_closed)
        upstream.dataReceived(b"answer after the client's FIN")
        self.assertEqual(transport.value(), b"answer after the client's FIN")
        upstream.readConnectionLost()
        self.assertTrue(transport.write_closed)
        self.assertTrue(transport.disconnecting)
        self.assertTrue(upstream_transport.disconnecting)
        lose(proto)
        self.assertEqual(self.records(), [])
        lose(upstream)
        (event,) = self.records()
        self.assertEqual(event.reason, "client_closed")
        self.assertEqual(event.bytes_out, 29)

    def test_upstream_half_close(self) -> None:
        """The upstream's FIN becomes a FIN to the client, whose bytes still flow up."""
        proto, transport, upstream, upstream_transport, hello = self.tunnel()
        upstream.dataReceived(b"bye")
        upstream.readConnectionLost()
        self.assertTrue(transport.write_closed)
        proto.dataReceived(b"late")
        self.assertEqual(upstream_transport.value(), hello + b"late")
        proto.readConnectionLost()
        lose(proto)
        lose(upstream)
        (event,) = self.records()
        self.assertEqual(event.reason, "upstream_closed")

    def test_fin_once(self) -> None:
        """A second end-of-input report changes nothing."""
        proto, _, _, upstream_transport, _ = self.tunnel()
        proto.readConnectionLost()
        proto.readConnectionLost()
        self.assertTrue(upstream_transport.write_closed)

    def test_client_reset(self) -> None:
        """A client that goes away uncleanly: the upstream is aborted; client_aborted."""
        proto, _, upstream, upstream_transport, _ = self.tunnel()
        lose(proto, clean=False)
        self.assertTrue(upstream_transport.disconnected)
        lose(upstream, clean=False)
        (event,) = self.records()
        self.assertEqual(event.reason, "client_aborted")

    def test_upstream_reset(self) -> None:
        """An upstream reset: what was relayed is flushed to the client, then it is closed."""
        proto, transport, upstream, _, _ = self.tunnel()
        upstream.dataReceived(b"partial")
        lose(upstream, clean=False)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        lose(proto)
        (event,) = self.records()
        self.assertEqual((event.reason, event.bytes_out), ("upstream_reset", 7))

    def test_back_pressure_both_ways(self) -> None:
        """Each side's full write buffer pauses reading from the other side."""
        _, transport, _, upstream_transport, _ = self.tunnel()
        self.assertEqual(transport.producerState, "producing")
        upstream_transport.producer.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        upstream_transport.producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        transport.producer.pauseProducing()
        self.assertEqual(upstream_transport.producerState, "paused")
        transport.producer.resumeProducing()
        self.assertEqual(upstream_transport.producerState, "producing")

    def test_reading_paused_while_connecting(self) -> None:
        """The client is not read while the upstream connection is made; what already
        arrived is held and sent first."""
        self.gateway(PASS_SNI)
        proto, transport = self.client()
        hello = python_client_hello("a.example.org")
        proto.dataReceived(hello + b"early")
        self.assertEqual(transport.producerState, "paused")
        proto.dataReceived(b"+more")
        _, upstream_transport = self.connector.accept()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(upstream_transport.value(), hello + b"early+more")

    def test_client_fin_while_connecting(self) -> None:
        """A FIN before the upstream is connected is passed on once it is."""
        self.gateway(PASS_SNI)
        proto, _ = self.client()
        proto.dataReceived(python_client_hello("a.example.org"))
        proto.readConnectionLost()
        _, upstream_transport = self.connector.accept()
        self.assertTrue(upstream_transport.write_closed)

    def test_upstream_speaks_first(self) -> None:
        """Bytes the upstream sends before the tunnel attaches are not lost."""
        self.gateway(PASS_SNI)
        proto, transport = self.client()
        proto.dataReceived(python_client_hello("a.example.org"))
        pending = self.connector.pending.pop(0)
        upstream = TCPUpstream(b"", None)
        upstream.makeConnection(HalfCloseTransport())
        upstream.dataReceived(b"banner")
        pending.deferred.callback(upstream)
        self.assertEqual(transport.value(), b"banner")

    def test_idle_deadline(self) -> None:
        """Nothing either way for tunnel_idle (300s): both sides are closed (nothing is in
        flight), and cut if they have not finished within CLOSE_LINGER; idle_timeout."""
        proto, transport, upstream, upstream_transport, _ = self.tunnel()
        self.clock.advance(200)
        upstream.dataReceived(b"x")
        self.clock.advance(200)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(100)
        self.assertTrue(transport.disconnecting)
        self.assertTrue(upstream_transport.disconnecting)
        self.assertFalse(transport.disconnected)
        self.clock.advance(CLOSE_LINGER)
        self.assertTrue(transport.disconnected)
        self.assertTrue(upstream_transport.disconnected)
        lose(proto, clean=False)
        lose(upstream, clean=False)
        (event,) = self.records()
        self.assertEqual(event.reason, "idle_timeout")
        self.assertEqual(event.duration, 500 + CLOSE_LINGER)

    def test_linger(self) -> None:
        """Once one side is gone, the other has CLOSE_LINGER seconds to finish closing."""
        proto, transport, upstream, _, _ = self.tunnel()
        lose(upstream)
        self.assertTrue(transport.disconnecting)
        self.clock.advance(CLOSE_LINGER)
        self.assertTrue(transport.disconnected)
        lose(proto, clean=False)
        self.assertEqual(self.records()[0].reason, "upstream_closed")

    def test_upstream_refused(self) -> None:
        """The upstream refuses: the client is cut; allow + upstream_refused audited."""
        self.gateway(PASS_SNI)
        proto, transport = self.client()
        proto.dataReceived(python_client_hello("a.example.org"))
        self.connector.pending[0].deferred.errback(ConnectionRefusedError("10.0.1.1:443"))
        self.assertTrue(transport.disconnected)
        lose(proto, clean=False)
        (event,) = self.records()
        self.assertEqual((event.decision, event.reason), ("allow", "upstream_refused"))
        self.assertEqual(self.limiter.in_flight("pass-a"), 0)
        self.assertEqual(
            self.sample(
                "promgate_upstream_errors_total", route="pass-a", reason="upstream_refused"
            ),
            1.0,
        )

    def test_upstream_tls_failed(self) -> None:
        """An upstream whose certificate fails verification: upstream_tls_failed."""
        self.gateway(TCPForwarding(destination=dest("pass-a"), mode="passthrough"))
        proto, transport = self.client()
        proto.dataReceived(python_client_hello("a.example.org"))
        failure = SSL.Error([("SSL routines", "", "certificate verify failed")])
        self.connector.pending[0].deferred.errback(failure)
        self.assertTrue(transport.disconnected)
        lose(proto, clean=False)
        (event,) = self.records()
        self.assertEqual((event.decision, event.reason), ("allow", "upstream_tls_failed"))
        self.assertIn("certificate verify failed", event.detail or "")

    def test_upstream_connect_deadline(self) -> None:
        """The upstream connect (and its TLS handshake) has 5s."""
        self.gateway(PASS_SNI)
        proto, transport = self.client()
        proto.dataReceived(python_client_hello("a.example.org"))
        self.clock.advance(5.0)
        self.assertTrue(transport.disconnected)
        lose(proto, clean=False)
        self.assertEqual(self.records()[0].reason, "upstream_timeout")

    def test_client_gone_while_connecting(self) -> None:
        """The connect is cancelled; the record says the client left."""
        self.gateway(PASS_SNI)
        proto, _ = self.client()
        proto.dataReceived(python_client_hello("a.example.org"))
        lose(proto, clean=False)
        self.assertEqual(self.connector.pending[0].deferred.called, True)
        (event,) = self.records()
        self.assertEqual(event.reason, "client_aborted")
        self.assertEqual(self.limiter.in_flight("pass-a"), 0)

    def test_shutdown_while_connecting(self) -> None:
        """A connection cut by the shutdown before its upstream connected is audited
        gateway_shutdown, and is not an upstream error."""
        self.gateway(PASS_SNI)
        proto, transport = self.client()
        proto.dataReceived(python_client_hello("a.example.org"))
        self.assertEqual(self.gw.shut_down_connections(), 1)
        self.assertTrue(transport.disconnected)
        lose(proto, clean=False)
        (event,) = self.records()
        self.assertEqual(event.reason, "gateway_shutdown")
        self.assertEqual(self.limiter.in_flight("pass-a"), 0)
        self.assertEqual(
            self.sample(
                "promgate_upstream_errors_total", route="pass-a", reason="gateway_shutdown"
            ),
            0.0,
        )

    def test_shutdown(self) -> None:
        """Gateway shutdown cuts open tunnels, each audited as gateway_shutdown."""
        proto, transport, upstream, upstream_transport, _ = self.tunnel()
        self.assertEqual(self.gw.shut_down_connections(), 1)
        self.assertTrue(transport.disconnected and upstream_transport.disconnected)
        lose(proto, clean=False)
        self.assertEqual(len(self.gw.open), 1)  # until the upstream is gone too
        lose(upstream, clean=False)
        self.assertEqual(self.records()[0].reason, "gateway_shutdown")
        self.assertEqual(self.gw.open, set())


class ProxyHeaderTests(TCPTestCase):
    """proxy_protocol: v2 sends the client's address (and what TLS said) first."""

    def test_passthrough_header(self) -> None:
        """Passthrough: addresses and the server name; no SSL or identity TLV."""
        self.gateway(attrs.evolve(PASS_SNI, proxy_protocol="v2"))
        proto, _ = self.client()
        hello = python_client_hello("a.example.org")
        proto.dataReceived(hello)
        header = self.connector.pending[0].header
        _, upstream_transport = self.connector.accept()
        self.assertEqual(upstream_transport.value(), header + hello)
        parsed = decode_v2(header)
        assert parsed is not None
        self.assertEqual(parsed.source, ("198.51.100.7", 40000))
        self.assertEqual(parsed.destination, ("192.0.2.1", 9101))
        self.assertEqual(parsed.tlv(PP2_TYPE_AUTHORITY), b"a.example.org")
        self.assertIsNone(parsed.tlv(PP2_TYPE_SSL))
        self.assertIsNone(parsed.tlv(PP2_TYPE_PROMGATE_IDENTITY))

    def test_no_header_by_default(self) -> None:
        """Without proxy_protocol nothing precedes the client's bytes."""
        _, _, _, upstream_transport, hello = self.tunnel()
        self.assertEqual(upstream_transport.value(), hello)


class StartTLSTransport(HalfCloseTransport):
    """Records startTLS, and what had been written before it."""

    tls_started: Any = None
    written_before_tls = b""

    def startTLS(self, creator: Any, normal: bool = True) -> None:
        self.tls_started = creator
        self.written_before_tls = self.value()


class ConnectorTests(SynchronousTestCase):
    """The real connector, on a memory reactor: endpoints, the PROXY header, TLS."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.connector = EndpointConnector(self.reactor, connect_timeout=5.0)

    def connect(self, route: str, header: bytes, tls: bool) -> tuple[Any, Deferred[Any]]:
        r = ROUTES[route]
        d = self.connector.connect(r, r.targets[0], header, tls)
        host, port, factory, timeout, _ = self.reactor.tcpClients[-1]
        self.assertEqual((host, port, timeout), (r.targets[0].host, r.targets[0].port, 5.0))
        return factory.buildProtocol(None), d

    def test_plain(self) -> None:
        """A plain upstream: header first, ready at once, and its FIN reaches the tunnel as
        a half-close through the endpoint's wrapping protocol."""
        wrapper, d = self.connect("node", b"HEADER", False)
        self.assertTrue(IHalfCloseableProtocol.providedBy(wrapper))
        transport = HalfCloseTransport()
        wrapper.makeConnection(transport)
        upstream = self.successResultOf(d)
        self.assertIsInstance(upstream, TCPUpstream)
        self.assertEqual(transport.value(), b"HEADER")

    def test_tls(self) -> None:
        """An https route: the header goes out in the clear, then TLS starts; the
        connection is ready only once the handshake completed."""
        wrapper, d = self.connect("secure", b"HEADER", True)
        self.assertTrue(IHandshakeListener.providedBy(wrapper))
        transport = StartTLSTransport()
        wrapper.makeConnection(transport)
        self.assertEqual(transport.written_before_tls, b"HEADER")
        self.assertIsNotNone(transport.tls_started)
        self.assertNoResult(d)
        wrapper.handshakeCompleted()
        self.assertIsInstance(self.successResultOf(d), TLSUpstream)

    def test_tls_failure(self) -> None:
        """A failed upstream handshake fails the connect with its reason."""
        wrapper, d = self.connect("secure", b"", True)
        wrapper.makeConnection(StartTLSTransport())
        wrapper.connectionLost(
            Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))
        )
        self.failureResultOf(d, SSL.Error)

    def test_cancel_during_handshake(self) -> None:
        """Cancelling while the handshake runs aborts the connection."""
        wrapper, d = self.connect("secure", b"", True)
        transport = StartTLSTransport()
        wrapper.makeConnection(transport)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(transport.disconnected)
        wrapper.connectionLost(Failure(ConnectionLost()))


# -- mutual TLS, in memory -------------------------------------------------------------------


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
    """One PKI for the module, with a gateway certificate for a. and b.example.org."""
    global _PKI
    if _PKI is None:
        _PKI = TestPKI(base)
        _PKI.client("prometheus")
        _PKI.client("stranger")
        _PKI.ca.issue_server(["localhost", "a.example.org", "b.example.org"], ["127.0.0.1"]).write(
            base / "sni.pem", base / "sni-key.pem"
        )
    return _PKI


def _server_transport(proto: Any) -> iosim.FakeTransport:
    return iosim.FakeTransport(proto, True, hostAddress=LOCAL, peerAddress=PEER)


class TerminateTests(TCPTestCase):
    """Terminate mode: real mutual-TLS handshakes over iosim; the plaintext is relayed."""

    def setUp(self) -> None:
        super().setUp()
        self.pki = _pki(Path(self.mktemp()).resolve())
        directory = self.pki.directory
        self.tls = TLSFiles(directory / "sni.pem", directory / "sni-key.pem", self.pki.ca_cert)

    def connect(
        self, tcp: TCPForwarding, cert: tuple[Path, Path] | None, hostname: str = "a.example.org"
    ) -> tuple[_Client, TCPDownstream, iosim.IOPump]:
        self.gateway(tcp, self.tls)
        server_factory = TLSMemoryBIOFactory(
            server_tls(self.tls, alpn=None), False, TCPGatewayFactory(self.gw), clock=self.clock
        )
        client = _Client()
        options: dict[str, Any] = {}
        if cert is not None:
            options["clientCertificate"] = PrivateCertificate.loadPEM(
                cert[0].read_bytes() + cert[1].read_bytes()
            )
        creator = optionsForClientTLS(
            hostname, trustRoot=Certificate.loadPEM(self.pki.ca_cert.read_bytes()), **options
        )
        client_factory = TLSMemoryBIOFactory(
            creator, True, ClientFactory.forProtocol(lambda: client), clock=self.clock
        )
        client_wire, server_wire, pump = iosim.connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            serverTransportFactory=_server_transport,
            greet=False,
            clock=self.clock,
        )
        self.client_wire = client_wire
        pump.flush()
        return client, server_wire.wrappedProtocol, pump

    def test_relay_with_identity(self) -> None:
        """The client certificate names the identity; plaintext is relayed both ways;
        the record carries the TLS details, identity and server name."""
        client, server, pump = self.connect(
            TCPForwarding(destination=dest("node")), self.pki.client("prometheus")
        )
        self.assertIsInstance(server, TCPDownstream)
        pending = self.connector.pending[0]
        self.assertEqual((pending.route.name, pending.tls, pending.header), ("node", False, b""))
        upstream, upstream_transport = self.connector.accept()
        self.client_wire.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        pump.flush()
        self.assertEqual(upstream_transport.value(), b"GET /metrics HTTP/1.1\r\n\r\n")
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        pump.flush()
        self.assertEqual(client.data, b"HTTP/1.1 200 OK\r\n\r\n")
        self.client_wire.loseConnection()
        pump.flush()
        self.assertTrue(upstream_transport.disconnecting)
        lose(upstream)
        (event,) = self.records()
        self.assertEqual(
            (event.identity, event.route, event.target, event.decision, event.reason),
            ("prometheus", "node", "10.0.0.5:9100", "allow", "client_closed"),
        )
        self.assertEqual((event.bytes_in, event.bytes_out), (25, 19))
        self.assertIn(event.tls_version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(event.cert_subject, "CN=prometheus")
        self.assertEqual(event.server_name, "a.example.org")
        labels = {"listener": "raw", "route": "node", "reason": "client_closed"}
        self.assertEqual(
            self.sample("promgate_tcp_connections_total", **labels, identity="prometheus"), 1.0
        )

    def test_upstream_close_sends_close_notify(self) -> None:
        """The upstream's FIN becomes a TLS close_notify to the client."""
        client, _, pump = self.connect(
            TCPForwarding(destination=dest("node")), self.pki.client("prometheus")
        )
        upstream, upstream_transport = self.connector.accept()
        upstream.dataReceived(b"last words")
        upstream.readConnectionLost()
        pump.flush()
        self.assertEqual(client.data, b"last words")
        self.assertIsNotNone(client.lost)
        assert client.lost is not None
        self.assertTrue(client.lost.check(ConnectionDone))
        self.assertTrue(upstream_transport.disconnecting)
        lose(upstream)
        self.assertEqual(self.records()[0].reason, "upstream_closed")

    def test_https_route_reencrypts(self) -> None:
        """A route with scheme https is connected to with TLS (verified upstream)."""
        self.connect(TCPForwarding(destination=dest("secure")), self.pki.client("prometheus"))
        self.assertEqual(self.connector.pending[0].tls, True)

    def test_unknown_identity(self) -> None:
        """A valid certificate that names no identity: refused after the handshake."""
        client, _, pump = self.connect(
            TCPForwarding(destination=dest("node")), self.pki.client("stranger")
        )
        pump.flush()
        self.assertIsNotNone(client.lost)
        (event,) = self.records()
        self.assertEqual((event.decision, event.reason), ("deny", "unknown_identity"))
        self.assertEqual(event.cert_subject, "CN=stranger")
        self.assertEqual(self.connector.pending, [])
        self.assertEqual(
            self.sample(
                "promgate_tcp_connections_total",
                listener="raw",
                route="node",
                identity="unrecognised",
                reason="unknown_identity",
            ),
            1.0,
        )

    def test_no_client_certificate(self) -> None:
        """No client certificate: the handshake fails and is audited as such."""
        client, _, pump = self.connect(TCPForwarding(destination=dest("node")), None)
        if client.lost is None:
            self.client_wire.write(b"x")
            pump.flush()
        self.assertIsNotNone(client.lost)
        (event,) = [e for e in self.audit.events if e.event == "tls_handshake_failed"]
        self.assertEqual((event.listener, event.reason), ("raw", "no_client_certificate"))
        self.assertEqual(self.records(), [])
        self.assertEqual(
            self.sample(
                "promgate_tcp_connections_total",
                listener="raw",
                route="",
                identity="none",
                reason="no_client_certificate",
            ),
            1.0,
        )

    def test_sni_routing(self) -> None:
        """In terminate mode the server name of the handshake picks the route."""
        tcp = TCPForwarding(sni={"a.example.org": dest("node"), "b.example.org": dest("closed")})
        self.connect(tcp, self.pki.client("prometheus"), hostname="b.example.org")
        self.assertEqual(self.connector.pending[0].route.name, "closed")

    def test_proxy_header_carries_identity(self) -> None:
        """With TLS terminated the PROXY header has PP2_TYPE_SSL (verified client
        certificate) and promgate's identity TLV."""
        self.connect(
            TCPForwarding(destination=dest("node"), proxy_protocol="v2"),
            self.pki.client("prometheus"),
        )
        parsed = decode_v2(self.connector.pending[0].header)
        assert parsed is not None
        self.assertEqual(parsed.source, ("198.51.100.7", 40000))
        self.assertEqual(parsed.tlv(PP2_TYPE_PROMGATE_IDENTITY), b"prometheus")
        self.assertEqual(parsed.tlv(PP2_TYPE_AUTHORITY), b"a.example.org")
        ssl_value = parsed.tlv(PP2_TYPE_SSL)
        assert ssl_value is not None
        client_flags, verify, subs = decode_ssl_tlv(ssl_value)
        self.assertEqual((client_flags, verify), (0x03, 0))
        self.assertIn((0x22, b"prometheus"), subs)

    def test_handshake_deadline(self) -> None:
        """A client that never completes the handshake is cut off after 10s and audited."""
        self.gateway(TCPForwarding(destination=dest("node")), self.tls)
        server_factory = TLSMemoryBIOFactory(
            server_tls(self.tls, alpn=None), False, TCPGatewayFactory(self.gw), clock=self.clock
        )
        client = _Client()
        _, _, pump = iosim.connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client,
            serverTransportFactory=_server_transport,
            greet=False,
            clock=self.clock,
        )
        pump.flush()
        self.clock.advance(10.0)
        pump.flush(advanceClock=False)
        self.assertIsNotNone(client.lost)
        (event,) = [e for e in self.audit.events if e.event == "tls_handshake_failed"]
        self.assertEqual(event.reason, "handshake_timeout")


# -- configuration ---------------------------------------------------------------------------


class ConfigTests(SynchronousTestCase):
    """tcp listener keys are validated with FILE:LINE: key: message errors."""

    def setUp(self) -> None:
        self.pki = _pki(Path(self.mktemp()).resolve())

    def check(self, listeners: str, routes: str = "") -> tuple[Any, list[str], list[str]]:
        directory = Path(self.mktemp())
        directory.mkdir()
        text = textwrap.dedent(
            f"""\
            tls:
              certificate: {self.pki.gate_cert}
              key: {self.pki.gate_key}
              client_ca: {self.pki.ca_cert}
            identities:
              prometheus:
                cert: {{uri: "spiffe://promgate.local/prometheus"}}
                roles: [scraper]
            routes:
              node:
                allow: ["role:scraper"]
                targets: {{static: ["10.0.0.5:9100"]}}
              two:
                allow: [prometheus]
                targets: {{static: ["10.0.0.5:9100", "10.0.0.6:9100"]}}
              web:
                allow: ["sni:*", "sni:*.example.org"]
                targets: {{static: ["10.0.1.1:443"]}}
            audit: {{path: audit.jsonl, key_file: {self.pki.audit_key}}}
            listeners:
            """
        ) + textwrap.indent(textwrap.dedent(listeners), "  ")
        path = directory / "promgate.yaml"
        path.write_text(text)
        config, errors, warnings = check_config(path)
        return config, [str(e) for e in errors], [str(w) for w in warnings]

    def assertError(self, listeners: str, *expected: str) -> None:
        _, errors, _ = self.check(listeners)
        for want in expected:
            self.assertTrue(any(want in e for e in errors), f"{want!r} not in {errors}")

    def test_valid(self) -> None:
        """A fixed route, a route with a named target, SNI maps in both modes."""
        config, errors, warnings = self.check(
            """\
            - {name: a, protocol: tcp, endpoint: "tcp:0", route: node}
            - {name: b, protocol: tcp, endpoint: "tcp:0", route: two, target: "10.0.0.6:9100",
               proxy_protocol: v2, tunnel_idle: 1m}
            - name: c
              protocol: tcp
              endpoint: "tcp:0"
              mode: passthrough
              sni: {Web.Example.org: web, "*.example.net": {route: web, target: "10.0.1.1:443"}}
              sni_default: web
            """
        )
        self.assertEqual(errors, [])
        self.assertEqual(warnings, [])
        a, b, c = config.listeners
        assert a.tcp is not None and b.tcp is not None and c.tcp is not None
        self.assertEqual(a.tcp.destination, Destination("node", "10.0.0.5:9100"))
        self.assertIsNotNone(a.tls)
        self.assertEqual(
            (b.tcp.destination, b.tcp.proxy_protocol), (Destination("two", "10.0.0.6:9100"), "v2")
        )
        self.assertEqual(b.deadlines.tunnel_idle, 60.0)
        self.assertEqual(c.tls, None)
        self.assertEqual(c.tcp.mode, "passthrough")
        self.assertEqual(
            dict(c.tcp.sni),
            {
                "web.example.org": Destination("web", "10.0.1.1:443"),
                "*.example.net": Destination("web", "10.0.1.1:443"),
            },
        )
        self.assertEqual(c.tcp.sni_default, Destination("web", "10.0.1.1:443"))

    def test_errors_with_file_and_line(self) -> None:
        """Each mistake is reported at its own line and key path."""
        _, errors, _ = self.check(
            """\
            - {name: a, protocol: tcp, endpoint: "tcp:0", route: nope}
            - {name: b, protocol: tcp, endpoint: "tcp:0", route: two}
            - {name: c, protocol: tcp, endpoint: "tcp:0", route: node, sni: {x.org: node}}
            - {name: d, protocol: tcp, endpoint: "tcp:0", sni: {x.org: nope}}
            - {name: e, protocol: tcp, endpoint: "tcp:0", route: node, target: "10.9.9.9:1"}
            - {name: f, protocol: tcp, endpoint: "tcp:0", mode: passthrough, route: web, tls: {}}
            - {name: g, protocol: tcp, endpoint: "tcp:0", mode: sideways, route: node}
            - {name: h, protocol: tcp, endpoint: "tcp:0", route: node, proxy_protocol: v1}
            - {name: i, protocol: tcp, endpoint: "tcp:0"}
            - {name: j, protocol: tcp, endpoint: "tcp:0", sni: {"bad name": node}}
            - {name: k, protocol: tcp, endpoint: "tcp:0", route: node, tls: false}
            - {name: l, protocol: http, endpoint: "tcp:0", route: node}
            - {name: m, protocol: tcp, endpoint: "tcp:0", sni: {x.org: two}}
            - {name: n, protocol: tcp, endpoint: "tcp:0", route: node, sni_default: node}
            """
        )
        text = "\n".join(errors)
        for line, key, message in [
            (21, "listeners[0].route", "undefined route 'nope'"),
            (
                22,
                "listeners[1].route",
                "route 'two' has 2 targets; name one with 'target: HOST:PORT'",
            ),
            (23, "listeners[2].sni", "give either 'route' or 'sni', not both"),
            (24, "listeners[3].sni.x.org", "undefined route 'nope'"),
            (25, "listeners[4].target", "'10.9.9.9:1' is not a target of route 'node'"),
            (26, "listeners[5].tls", "a passthrough listener relays the client's TLS untouched"),
            (27, "listeners[6].mode", "must be one of: terminate, passthrough"),
            (28, "listeners[7].proxy_protocol", "must be one of: v2"),
            (29, "listeners[8]", "a tcp listener needs 'route' or 'sni'"),
            (30, "listeners[9].sni.bad name", "not a server name"),
            (31, "listeners[10].tls", "a terminate-mode tcp listener needs mutual TLS"),
            (32, "listeners[11].route", "only tcp listeners take this key"),
            (
                33,
                "listeners[12].sni.x.org",
                "route 'two' has 2 targets; name one with {route: ..., target: HOST:PORT}",
            ),
            (34, "listeners[13].sni_default", "'sni_default' goes with 'sni'"),
        ]:
            self.assertIn(f"promgate.yaml:{line}: {key}: {message}", text)

    def test_passthrough_warning_and_sni_allow_entries(self) -> None:
        """A passthrough listener to a route with no sni: entry is warned about; a
        malformed sni: entry is an error; sni: entries are not undefined identities."""
        _, errors, warnings = self.check(
            """\
            - {name: a, protocol: tcp, endpoint: "tcp:0", mode: passthrough, route: node}
            """
        )
        self.assertEqual(errors, [])
        self.assertTrue(any("no 'sni:' allow entry" in w for w in warnings), warnings)
