"""Tests for the shutdown drain, in memory: the Deferreds that fire when in-flight work and
open connections reach zero, and how a stopping ``http`` listener closes its connections
(after the answer is written, never by cutting one whose answer is complete)."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from promgate.audit import MemoryAuditSink
from promgate.config.model import Admin, Audit, CertMatch, Config, Identity, Listener, Route, Target
from promgate.drain import InFlight, OpenSet
from promgate.http.server import DownstreamProtocol, HTTPListenerFactory
from promgate.http.upstream import UpstreamPool
from promgate.identity import Recognition
from promgate.listeners.scrape import ReverseGateway
from promgate.metrics import Metrics
from promgate.ratelimit import RateLimiter

NODE = Target("10.0.0.5:9100")
PROMETHEUS = Identity(
    "prometheus",
    cert=(CertMatch(uri="spiffe://promgate.local/prometheus"),),
    roles=frozenset({"scraper"}),
)
ROUTE = Route("node", (NODE,), allow=("role:scraper",))
SCRAPE = b"GET /scrape?route=node&target=10.0.0.5%3A9100 HTTP/1.1\r\nHost: gate\r\n\r\n"
SD = b"GET /sd HTTP/1.1\r\nHost: gate\r\n\r\n"
METRICS = b"up 1\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(METRICS) + METRICS


class InFlightTests(SynchronousTestCase):
    """``when_idle`` fires once the count is back to zero, a reactor turn later."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.work = InFlight(self.clock)

    def test_idle_now(self) -> None:
        """With nothing in flight it has fired already."""
        self.assertIsNone(self.successResultOf(self.work.when_idle()))

    def test_fires_a_turn_after_zero(self) -> None:
        """It fires on the turn after the last piece of work ends, not inside its end()
        (whoever ends it finishes first: writes the answer, the audit record)."""
        self.work.begin()
        self.work.begin()
        idle = self.work.when_idle()
        self.work.end()
        self.clock.advance(0)
        self.assertNoResult(idle)
        self.work.end()
        self.assertNoResult(idle)
        self.clock.advance(0)
        self.assertIsNone(self.successResultOf(idle))

    def test_new_work_before_the_turn(self) -> None:
        """Work that begins before that turn keeps it waiting."""
        self.work.begin()
        idle = self.work.when_idle()
        self.work.end()
        self.work.begin()
        self.clock.advance(0)
        self.assertNoResult(idle)
        self.work.end()
        self.clock.advance(0)
        self.successResultOf(idle)

    def test_cancel(self) -> None:
        """A cancelled wait is forgotten; later waits still fire."""
        self.work.begin()
        given_up = self.work.when_idle()
        given_up.cancel()
        self.failureResultOf(given_up, CancelledError)
        later = self.work.when_idle()
        self.work.end()
        self.clock.advance(0)
        self.successResultOf(later)


class OpenSetTests(SynchronousTestCase):
    """``when_empty`` fires once the last connection has left the set, a turn later."""

    def test_empty(self) -> None:
        """A set that empties tells its waiters; an empty one has told them already."""
        clock = MemoryReactorClock()
        conns: OpenSet[str] = OpenSet(clock)
        self.successResultOf(conns.when_empty())
        conns.add("a")
        conns.add("b")
        empty = conns.when_empty()
        conns.discard("a")
        clock.advance(0)
        self.assertNoResult(empty)
        conns.remove("b")
        self.assertNoResult(empty)
        clock.advance(0)
        self.successResultOf(empty)
        self.assertEqual(conns, set())


class DrainingListenerTests(SynchronousTestCase):
    """A stopping ``http`` listener closes each connection once its answer is written
    (flushed, over TLS with a close_notify); it cuts only connections with nothing
    complete to deliver, and audits what that interrupts."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.audit = MemoryAuditSink()
        self.pool = UpstreamPool(self.clock)
        listener = Listener("scrape", "http", "tcp:9443", None)
        config = Config(
            source=Path("promgate.yaml"),
            listeners=(listener,),
            identities={"prometheus": PROMETHEUS},
            routes={"node": ROUTE},
            admin=Admin(),
            audit=Audit(Path("audit.jsonl"), Path("audit.key")),
        )
        self.gateway = ReverseGateway(
            listener,
            config,
            clock=self.clock,
            limiter=RateLimiter(self.clock),
            audit=self.audit,
            metrics=Metrics(),
            pool=self.pool,
        )

    def client(self, port: int = 40000) -> tuple[DownstreamProtocol, StringTransport]:
        proto = HTTPListenerFactory(self.gateway.http).buildProtocol(None)
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "192.0.2.1", 9443),
            peerAddress=IPv4Address("TCP", "198.51.100.7", port),
        )
        proto.makeConnection(transport)
        proto.recognition = Recognition(PROMETHEUS, "ok")
        return proto, transport

    def upstream(self) -> IProtocol:
        """Complete the gateway's pending upstream connect; the upstream's side."""
        (connector,) = self.clock.tcpClients
        proto: IProtocol = connector[2].buildProtocol(None)
        proto.makeConnection(StringTransport(lenient=True))
        return proto

    def lose(self, proto: DownstreamProtocol, transport: StringTransport) -> None:
        """What the transport does after loseConnection or abortConnection."""
        reason = ConnectionAborted() if transport.disconnected else ConnectionDone()
        proto.connectionLost(Failure(reason))

    def test_idle_keep_alive_closed_at_drain_start(self) -> None:
        """An idle keep-alive connection closes when the drain begins, gracefully."""
        proto, transport = self.client()
        proto.dataReceived(SD)
        self.assertFalse(transport.disconnecting)
        self.gateway.http.begin_drain()
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected, "cut instead of closed")

    def test_answer_in_flight_then_closed(self) -> None:
        """A scrape in flight at the drain's start is answered whole, then its connection
        closes (never aborted), and only then is the drain idle."""
        proto, transport = self.client()
        proto.dataReceived(SCRAPE)
        self.gateway.http.begin_drain()
        idle = self.gateway.http.in_flight.when_idle()
        self.assertFalse(transport.disconnecting)
        self.upstream().dataReceived(ANSWER)
        self.assertTrue(transport.value().endswith(METRICS))
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected, "cut instead of closed")
        self.assertNoResult(idle)
        self.clock.advance(0)
        self.successResultOf(idle)
        self.gateway.http.shut_down_connections()
        self.assertFalse(transport.disconnected, "cut after its answer")
        empty = self.gateway.http.open.when_empty()
        self.lose(proto, transport)
        self.clock.advance(0)
        self.successResultOf(empty)
        (record,) = [e for e in self.audit.events if e.event == "request"]
        self.assertEqual((record.reason, record.status), ("ok", 200))

    def test_cut_what_is_unfinished(self) -> None:
        """After the drain, a request still in flight and a half-received request head
        are cut, and audited as gateway_shutdown; a connection that never had an answer
        is cut too (nothing to deliver); an idle one after an answer is closed."""
        in_flight, in_flight_transport = self.client(40001)
        in_flight.dataReceived(SCRAPE)
        half, half_transport = self.client(40002)
        half.dataReceived(b"GET /sd HTTP/1.1\r\n")
        fresh, fresh_transport = self.client(40003)
        idle, idle_transport = self.client(40004)
        idle.dataReceived(SD)
        self.gateway.http.begin_drain()
        self.assertTrue(idle_transport.disconnecting)
        self.assertFalse(fresh_transport.disconnecting)
        self.gateway.http.shut_down_connections()
        self.assertTrue(in_flight_transport.disconnected)
        self.assertTrue(half_transport.disconnected)
        self.assertTrue(fresh_transport.disconnected)
        self.assertFalse(idle_transport.disconnected)
        for proto, transport in [
            (in_flight, in_flight_transport),
            (half, half_transport),
            (fresh, fresh_transport),
            (idle, idle_transport),
        ]:
            self.lose(proto, transport)
        reasons = sorted((e.peer, e.reason) for e in self.audit.events if e.event == "request")
        self.assertEqual(
            reasons,
            [
                ("198.51.100.7:40001", "gateway_shutdown"),
                ("198.51.100.7:40002", "gateway_shutdown"),
                ("198.51.100.7:40004", "ok"),
            ],
        )

    def test_cut_at_the_deadline(self) -> None:
        """A connection closing after its answer whose client never takes the close is
        cut when the deadline comes."""
        proto, transport = self.client()
        proto.dataReceived(SD)
        self.gateway.http.begin_drain()
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        self.gateway.http.abort_connections()
        self.assertTrue(transport.disconnected)
        empty = self.gateway.http.open.when_empty()
        self.lose(proto, transport)
        self.clock.advance(0)
        self.successResultOf(empty)
