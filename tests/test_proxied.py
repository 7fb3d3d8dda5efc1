"""Connections behind ``haproxy:``: the listener's protocol starts only once the PROXY
header has named the original client."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from promgate.net.proxied import HEADER_TIMEOUT, ProxiedFactory
from promgate.net.proxyproto import encode_v2

V1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 9443\r\n"


class Recorder(Protocol):
    """Notes the peer it saw when it started, and what it received."""

    def __init__(self) -> None:
        self.peer: object = None
        self.host: object = None
        self.received = b""
        self.lost = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer = self.transport.getPeer()
        self.host = self.transport.getHost()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True


class ProxiedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.recorders: list[Recorder] = []

        def build() -> Recorder:
            recorder = Recorder()
            self.recorders.append(recorder)
            return recorder

        self.factory = ProxiedFactory(Factory.forProtocol(build), self.clock, name="front")
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 40000))
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 40000))
        assert self.protocol is not None
        self.protocol.makeConnection(self.transport)
        (self.recorder,) = self.recorders

    def test_v1_in_pieces(self) -> None:
        """The listener's protocol starts after the header, and sees the original client;
        bytes after the header reach it."""
        for i in range(0, len(V1), 5):
            self.assertIsNone(self.recorder.peer)
            self.protocol.dataReceived(V1[i : i + 5])
        self.assertEqual(self.recorder.peer, IPv4Address("TCP", "203.0.113.7", 51234))
        self.assertEqual(self.recorder.host, IPv4Address("TCP", "192.0.2.1", 9443))
        self.protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertEqual(self.recorder.received, b"GET / HTTP/1.1\r\n")

    def test_v2_with_data(self) -> None:
        header = encode_v2(("2001:db8::7", 51234), ("2001:db8::1", 9443))
        self.protocol.dataReceived(header[:3])
        self.protocol.dataReceived(header[3:] + b"\x16\x03\x01")
        self.assertEqual(self.recorder.peer, IPv6Address("TCP", "2001:db8::7", 51234))
        self.assertEqual(self.recorder.received, b"\x16\x03\x01")

    def test_local_keeps_the_balancers_address(self) -> None:
        """A v2 LOCAL header (a health check) names no client."""
        self.protocol.dataReceived(encode_v2(None, None))
        self.assertEqual(self.recorder.peer, IPv4Address("TCP", "10.0.0.9", 40000))

    def test_unknown_v1(self) -> None:
        self.protocol.dataReceived(b"PROXY UNKNOWN\r\n")
        self.assertEqual(self.recorder.peer, IPv4Address("TCP", "10.0.0.9", 40000))

    def test_not_a_header(self) -> None:
        """A client that speaks first without a header (TLS, HTTP) is cut; the listener
        never sees it."""
        for data in (b"\x16\x03\x01\x02\x00", b"GET / HTTP/1.1\r\n", b"PROXY TCP4 x\r\n"):
            with self.subTest(data=data):
                self.setUp()
                self.protocol.dataReceived(data)
                self.assertTrue(self.transport.disconnecting)
                self.assertIsNone(self.recorder.peer)
                self.assertEqual(self.factory.refused, 1)

    def test_v1_too_long(self) -> None:
        self.protocol.dataReceived(b"PROXY TCP4 " + b"1" * 200)
        self.assertTrue(self.transport.disconnecting)

    def test_deadline(self) -> None:
        """No complete header in time: cut."""
        self.protocol.dataReceived(V1[:10])
        self.clock.advance(HEADER_TIMEOUT - 0.1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.recorder.peer)

    def test_deadline_cancelled(self) -> None:
        self.protocol.dataReceived(V1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_gone_before_header(self) -> None:
        """A connection that closes before its header: the listener's protocol never
        started, so it is not told of the end either."""
        self.protocol.connectionLost(Failure(ConnectionError()))
        self.assertFalse(self.recorder.lost)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.factory.protocols, {})

    def test_gone_after_header(self) -> None:
        self.protocol.dataReceived(V1)
        self.protocol.connectionLost(Failure(ConnectionError()))
        self.assertTrue(self.recorder.lost)
