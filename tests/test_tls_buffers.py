"""Giving back an idle TLS connection's buffers: the connection goes on working both ways
afterwards, bytes not yet sent or not yet read are never dropped, and anything that is not a TLS
transport over memory BIOs is left alone."""

from __future__ import annotations

from pathlib import Path

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from promgate.config.model import TLSFiles
from promgate.http import server as server_module
from promgate.net.tls_buffers import release_idle_buffers
from promgate.testing import MemoryGateway, TestPKI
from promgate.tls import server_tls

BIG = b"m" * 40_000


class _Peer(Protocol):
    """Either end: what arrived, and whether it ended."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason


@implementer(IOpenSSLClientConnectionCreator)
class _ClientTLS:
    """A verifying pyOpenSSL client presenting a client certificate."""

    def __init__(self, pki: TestPKI) -> None:
        cert, key = pki.client("prometheus")
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.load_verify_locations(str(pki.ca_cert))
        ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
        ctx.use_certificate_chain_file(str(cert))
        ctx.use_privatekey_file(str(key))
        self.ctx = ctx

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N803
        connection = SSL.Connection(self.ctx, None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(b"localhost")
        connection.set_connect_state()
        return connection


class ReleaseTests(SynchronousTestCase):
    """release_idle_buffers on a real TLS connection in memory."""

    def setUp(self) -> None:
        pki = TestPKI(Path(self.mktemp()) / "pki")
        files = TLSFiles(pki.gate_cert, pki.gate_key, pki.ca_cert)
        clock = MemoryReactorClock()
        self.server = _Peer()
        self.client = _Peer()
        server_factory = TLSMemoryBIOFactory(
            server_tls(files), False, Factory.forProtocol(lambda: self.server), clock=clock
        )
        client_factory = TLSMemoryBIOFactory(
            _ClientTLS(pki), True, ClientFactory.forProtocol(lambda: self.client), clock=clock
        )
        client_wire, server_wire, self.pump = iosim.connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            greet=False,
            clock=clock,
        )
        self.client_wire: TLSMemoryBIOProtocol = client_wire
        self.server_wire: TLSMemoryBIOProtocol = server_wire
        self.pump.flush()
        client_wire.write(b"GET")
        self.pump.flush()
        server_wire.write(BIG)
        self.pump.flush()
        self.assertEqual((self.server.data, self.client.data), (b"GET", BIG))

    def test_released_connection_goes_on(self) -> None:
        """After the release, both directions carry data as before, large writes too."""
        handle = self.server_wire.getHandle()
        old = (handle._into_ssl, handle._from_ssl)
        self.assertTrue(release_idle_buffers(self.server_wire))
        self.assertIsNot(handle._into_ssl, old[0])
        self.assertIsNot(handle._from_ssl, old[1])
        self.server_wire.write(BIG)
        self.client_wire.write(b" again")
        self.pump.flush()
        self.assertEqual(self.client.data, BIG + BIG)
        self.assertEqual(self.server.data, b"GET again")
        self.assertTrue(release_idle_buffers(self.server_wire))
        self.server_wire.loseConnection()
        self.pump.flush()
        self.assertIsNotNone(self.client.lost)

    def test_pending_output_kept(self) -> None:
        """Ciphertext not yet sent: its buffer is kept, and it is delivered."""
        handle = self.server_wire.getHandle()
        handle.send(b"pending")  # OpenSSL writes the record; Twisted has not read it out
        old = handle._from_ssl
        self.assertTrue(release_idle_buffers(self.server_wire))  # the empty incoming one
        self.assertIs(handle._from_ssl, old)
        self.server_wire.write(b"!")  # Twisted reads out everything after a write
        self.pump.flush()
        self.assertEqual(self.client.data, BIG + b"pending!")

    def test_pending_input_kept(self) -> None:
        """Ciphertext received but not yet read by OpenSSL: its buffer is kept, and it is
        read."""
        sender = self.client_wire.getHandle()
        sender.send(b" first")
        handle = self.server_wire.getHandle()
        handle.bio_write(sender.bio_read(65536))  # in the BIO, not yet through OpenSSL
        old = handle._into_ssl
        self.assertTrue(release_idle_buffers(self.server_wire))  # the empty outgoing one
        self.assertIs(handle._into_ssl, old)
        self.client_wire.write(b" second")
        self.pump.flush()
        self.assertEqual(self.server.data, b"GET first second")

    def test_nothing_empty(self) -> None:
        """Both buffers hold bytes: nothing is replaced."""
        handle = self.server_wire.getHandle()
        handle.send(b"out")
        sender = self.client_wire.getHandle()
        sender.send(b"in")
        handle.bio_write(sender.bio_read(65536))
        old = (handle._into_ssl, handle._from_ssl)
        self.assertFalse(release_idle_buffers(self.server_wire))
        self.assertEqual((handle._into_ssl, handle._from_ssl), old)

    def test_not_tls(self) -> None:
        """A plain transport, or anything without a TLS handle, is left alone."""

        class Plain:
            def getHandle(self) -> object:
                return object()

        self.assertFalse(release_idle_buffers(Plain()))
        self.assertFalse(release_idle_buffers(StringTransport()))
        self.assertFalse(release_idle_buffers(object()))


class KeepAliveTests(SynchronousTestCase):
    """The gateway releases the buffer between requests and the connection serves on."""

    def test_requests_after_release(self) -> None:
        """Large answers on one keep-alive connection, with idle turns between them."""
        base = Path(self.mktemp()).resolve()
        pki = TestPKI(base / "pki")
        audit = base / "audit.jsonl"
        config = f"""
tls: {{certificate: {pki.gate_cert}, key: {pki.gate_key}, client_ca: {pki.ca_cert}}}
listeners:
  - {{name: scrape, protocol: http, endpoint: "tcp:9443"}}
identities:
  prometheus: {{cert: {{uri: "spiffe://promgate.local/prometheus"}}, roles: [scraper]}}
routes:
  node:
    scheme: http
    allow: ["role:scraper"]
    targets: {{static: ["10.0.0.5:9100"]}}
audit: {{path: {audit}, key_file: {pki.audit_key}}}
"""
        path = base / "promgate.yaml"
        path.write_text(config)
        gw = MemoryGateway.from_config_file(str(path))
        released: list[bool] = []

        def recording(transport: object) -> bool:
            released.append(release_idle_buffers(transport))
            return released[-1]

        self.patch(server_module, "release_idle_buffers", recording)
        body = b"up 1\n" * 8_000
        gw.upstream("10.0.0.5:9100", body=body)
        conn = gw.connect(pki.client("prometheus"), listener="scrape")
        for _ in range(3):
            r = conn.request("/scrape?route=node&target=10.0.0.5:9100")
            self.assertEqual((r.status, r.body), (200, body))
            gw.advance(0)
        self.assertEqual(released, [True, True, True])
