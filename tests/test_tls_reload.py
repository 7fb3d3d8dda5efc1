"""Certificates rotated and clients revoked while the gateway runs, in memory with real TLS
over iosim: new handshakes see a new valid set, open connections keep theirs, a broken
set keeps the old one served (and is counted), a revoked client is refused and audited,
and no session is resumed past a changed client CA or CRL."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL
from OpenSSL._util import lib as _lib
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from promgate.config.loader import check_config
from promgate.config.model import TLSFiles
from promgate.metrics import Metrics
from promgate.pki import CertificateAuthority
from promgate.testing import MemoryGateway, TestPKI
from promgate.tls_reload import POLL_INTERVAL, ReloadingServerTLS

SCRAPE = "/scrape?route=node&target=10.0.0.5%3A9100"

CONFIG = """\
tls: {{certificate: pki/gate.pem, key: pki/gate-key.pem, client_ca: pki/ca.pem{crl}}}
admin: {{endpoint: "tcp:9099:interface=127.0.0.1"}}
listeners:
  - {{name: scrape, protocol: http, endpoint: "tcp:9443"}}
identities:
  prometheus: {{cert: {{uri: "spiffe://promgate.local/prometheus"}}, roles: [scraper]}}
  other: {{cert: {{uri: "spiffe://promgate.local/other"}}, roles: [scraper]}}
routes:
  node:
    allow: ["role:scraper"]
    targets: {{static: ["10.0.0.5:9100"]}}
audit: {{path: audit.jsonl, key_file: pki/audit.key}}
"""


def _fingerprint(cert: x509.Certificate | None) -> str:
    assert cert is not None
    return cert.fingerprint(hashes.SHA256()).hex()


def _file_fingerprint(path: Path) -> str:
    return _fingerprint(x509.load_pem_x509_certificate(path.read_bytes()))


class _Setup:
    """A test PKI and a configuration in a fresh directory, and the gateway built from it
    on a memory clock set to the real time (certificates are checked against it)."""

    def __init__(self, case: SynchronousTestCase, *, crl: bool = False) -> None:
        self.directory = Path(case.mktemp()).resolve()
        self.pki = TestPKI(self.directory / "pki")
        self.prometheus = self.pki.client("prometheus")
        self.other = self.pki.client("other")
        if crl:
            self.pki.crl()
        # The client checks the gateway against a copy of the CA, so that the gateway's
        # client CA file can change under it.
        self.trust = self.directory / "trust.pem"
        self.trust.write_bytes(self.pki.ca_cert.read_bytes())
        config = self.directory / "promgate.yaml"
        config.write_text(CONFIG.format(crl=", client_crl: pki/crl.pem" if crl else ""))
        self.gw = MemoryGateway.from_config_file(config, now=time.time(), trust_root=self.trust)
        self.gw.upstream("10.0.0.5:9100", body=b"up 1\n")
        case.addCleanup(self.gw.stop)

    def served(self) -> str:
        """The fingerprint of the certificate a new connection is shown."""
        conn = self.gw.connect(self.prometheus)
        try:
            self.assert_scrapes(conn)
            return _fingerprint(conn.server_certificate)
        finally:
            conn.close()

    def assert_scrapes(self, conn: object) -> None:
        response = conn.request(SCRAPE)  # type: ignore[attr-defined]
        assert response.status == 200, response

    def new_gate_cert(self, **kwargs: object) -> tuple[bytes, bytes]:
        issued = self.pki.ca.issue_server(["localhost"], ["127.0.0.1"], **kwargs)  # type: ignore[arg-type]
        return issued.cert_pem, issued.key_pem

    def write(self, path: Path, data: bytes) -> None:
        path.write_bytes(data)

    def poll(self) -> None:
        """Let the watch see the change, and then see it stay put."""
        self.gw.advance(POLL_INTERVAL)
        self.gw.advance(POLL_INTERVAL)

    def sample(self, name: str) -> float | None:
        return self.gw.sample(name, {"listener": "scrape"})


class RotationTests(SynchronousTestCase):
    """A new valid set is served to new handshakes; open connections keep the old one."""

    def setUp(self) -> None:
        self.s = _Setup(self)

    def test_new_handshakes_see_new_certificate(self) -> None:
        """After a rotation a new connection is shown the new certificate; a connection
        opened before goes on answering scrapes over the old one."""
        s = self.s
        old = _file_fingerprint(s.pki.gate_cert)
        before = s.gw.connect(s.prometheus)
        s.assert_scrapes(before)
        self.assertEqual(_fingerprint(before.server_certificate), old)
        cert, key = s.new_gate_cert()
        s.write(s.pki.gate_key, key)
        s.write(s.pki.gate_cert, cert)
        s.poll()
        new = _file_fingerprint(s.pki.gate_cert)
        self.assertNotEqual(new, old)
        self.assertEqual(s.served(), new)
        s.assert_scrapes(before)
        s.assert_scrapes(before)
        self.assertIsNone(before.lost)
        self.assertEqual(_fingerprint(before.server_certificate), old)
        before.close()
        self.assertEqual(s.sample("promgate_tls_reloads_total"), 1.0)
        self.assertEqual(s.sample("promgate_tls_reload_failures_total"), 0.0)
        # The change of what the gateway presents is in the audit trail, once.
        (record,) = s.gw.audit_records("tls_reload")
        self.assertEqual((record.decision, record.reason), ("allow", "ok"))
        self.assertEqual(record.detail, f"listener scrape: serving certificate {new}")

    def test_change_loaded_once_still(self) -> None:
        """A change is loaded once the files have stayed put for one poll, so a
        certificate and key written one after the other are taken together."""
        s = self.s
        old = s.served()
        cert, key = s.new_gate_cert()
        s.write(s.pki.gate_cert, cert)
        s.gw.advance(POLL_INTERVAL)  # the certificate alone is seen changing
        s.write(s.pki.gate_key, key)
        s.gw.advance(POLL_INTERVAL)  # and then the key
        self.assertEqual(s.served(), old)
        s.gw.advance(POLL_INTERVAL)  # both still: loaded
        self.assertEqual(s.served(), _file_fingerprint(s.pki.gate_cert))
        self.assertEqual(s.sample("promgate_tls_reload_failures_total"), 0.0)

    def test_expiry_metric(self) -> None:
        """The expiry gauge is the notAfter of the certificate served, before and after
        a rotation."""
        s = self.s
        leaf = x509.load_pem_x509_certificate(s.pki.gate_cert.read_bytes())
        self.assertEqual(
            s.sample("promgate_tls_certificate_expiry_timestamp_seconds"),
            leaf.not_valid_after_utc.timestamp(),
        )
        later = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=90)
        cert, key = s.new_gate_cert(not_after=later)
        s.write(s.pki.gate_key, key)
        s.write(s.pki.gate_cert, cert)
        s.poll()
        self.assertEqual(
            s.sample("promgate_tls_certificate_expiry_timestamp_seconds"), later.timestamp()
        )
        self.assertIn(
            'promgate_tls_certificate_expiry_timestamp_seconds{listener="scrape"}',
            s.gw.metrics_text(),
        )

    def test_reload_now(self) -> None:
        """``reload()`` (what a configuration reload calls) loads a changed set at once
        and says how it went."""
        s = self.s
        assert s.gw.service.certificates is not None
        (unchanged,) = s.gw.service.certificates.reload()
        self.assertTrue(unchanged.ok)
        self.assertFalse(unchanged.changed)
        cert, key = s.new_gate_cert()
        s.write(s.pki.gate_key, key)
        s.write(s.pki.gate_cert, cert)
        (result,) = s.gw.service.certificates.reload()
        self.assertTrue(result.ok, result.message)
        self.assertTrue(result.changed)
        self.assertIn(_file_fingerprint(s.pki.gate_cert), result.message)
        self.assertEqual(s.served(), _file_fingerprint(s.pki.gate_cert))
        s.write(s.pki.gate_cert, b"")
        (broken,) = s.gw.service.certificates.reload()
        self.assertFalse(broken.ok)
        self.assertIn("empty", broken.message)


class BrokenSetTests(SynchronousTestCase):
    """A broken set keeps the old one served, is logged, and counted once per change."""

    def setUp(self) -> None:
        self.s = _Setup(self)
        self.old = self.s.served()
        self.log = EventLoggingObserver()
        globalLogPublisher.addObserver(self.log)
        self.addCleanup(globalLogPublisher.removeObserver, self.log)

    def assert_old_kept(self, why: str) -> None:
        s = self.s
        s.poll()
        self.assertEqual(s.served(), self.old)
        self.assertEqual(s.sample("promgate_tls_reload_failures_total"), 1.0)
        self.assertEqual(s.sample("promgate_tls_reloads_total"), 0.0)
        s.poll()  # the same broken files are not counted again
        self.assertEqual(s.sample("promgate_tls_reload_failures_total"), 1.0)
        errors = [e for e in self.log if e.get("log_level") is not None and "why" in e]
        self.assertEqual(len(errors), 1, errors)
        self.assertIn(why, errors[0]["why"])
        self.assertEqual(errors[0]["sha256"], self.old)
        # Audited once too, as a change refused.
        (record,) = s.gw.audit_records("tls_reload")
        self.assertEqual((record.decision, record.reason), ("deny", "config_invalid"))
        self.assertIn(why, record.detail or "")

    def test_truncated_certificate(self) -> None:
        data = self.s.pki.gate_cert.read_bytes()
        self.s.write(self.s.pki.gate_cert, data[: len(data) // 2])
        self.assert_old_kept("not a PEM certificate")

    def test_empty_key(self) -> None:
        self.s.write(self.s.pki.gate_key, b"")
        self.assert_old_kept("empty")

    def test_mismatched_key(self) -> None:
        cert, _ = self.s.new_gate_cert()
        self.s.write(self.s.pki.gate_cert, cert)
        self.assert_old_kept("does not match certificate")

    def test_expired_certificate(self) -> None:
        past = datetime.now(timezone.utc) - timedelta(days=1)
        cert, key = self.s.new_gate_cert(not_after=past)
        self.s.write(self.s.pki.gate_key, key)
        self.s.write(self.s.pki.gate_cert, cert)
        self.assert_old_kept("expired at")

    def test_missing_file(self) -> None:
        self.s.pki.gate_key.unlink()
        self.assert_old_kept("No such file")

    def test_fixed_after_failure(self) -> None:
        """Once the files are whole again they are served."""
        self.s.write(self.s.pki.gate_cert, b"-----BEGIN CERTIFICATE-----\nAAAA\n")
        self.s.poll()
        cert, key = self.s.new_gate_cert()
        self.s.write(self.s.pki.gate_key, key)
        self.s.write(self.s.pki.gate_cert, cert)
        self.s.poll()
        self.assertEqual(self.s.served(), _file_fingerprint(self.s.pki.gate_cert))
        self.assertEqual(self.s.sample("promgate_tls_reload_failures_total"), 1.0)
        self.assertEqual(self.s.sample("promgate_tls_reloads_total"), 1.0)


class RevocationTests(SynchronousTestCase):
    """tls.client_crl: a revoked client certificate is refused at the handshake and
    audited ``certificate_revoked``; CRL and client CA changes apply to new handshakes."""

    def setUp(self) -> None:
        self.s = _Setup(self, crl=True)

    def refused(self, identity: tuple[Path, Path]) -> str:
        """Connect with ``identity``; the reason of the refusal audited."""
        conn = self.s.gw.connect(identity)
        conn.send(SCRAPE)
        self.assertIsNotNone(conn.lost)
        failures = self.s.gw.audit_records("tls_handshake_failed")
        self.assertTrue(failures)
        return str(failures[-1].reason)

    def test_revoked_client_refused(self) -> None:
        s = self.s
        s.pki.crl([s.other[0]])
        s.poll()
        self.assertEqual(self.refused(s.other), "certificate_revoked")
        (record,) = s.gw.audit_records("tls_handshake_failed")
        self.assertEqual(record.cert_subject, "CN=other")
        self.assertEqual(
            s.gw.sample(
                "promgate_tls_handshake_failures_total",
                {"listener": "scrape", "reason": "certificate_revoked"},
            ),
            1.0,
        )
        s.served()  # the others still get in

    def test_open_connection_kept(self) -> None:
        """Revocation applies to new handshakes; a connection already open stays."""
        s = self.s
        conn = s.gw.connect(s.other)
        s.assert_scrapes(conn)
        s.pki.crl([s.other[0]])
        s.poll()
        s.assert_scrapes(conn)
        self.assertEqual(self.refused(s.other), "certificate_revoked")
        conn.close()

    def test_client_ca_changed(self) -> None:
        """A client CA replaced: clients of the old CA are refused on new handshakes."""
        s = self.s
        other_ca = CertificateAuthority.create("the next CA")
        s.pki.ca_cert.write_bytes(other_ca.cert_pem)
        s.pki.crl(ca=other_ca)
        s.poll()
        self.assertEqual(s.sample("promgate_tls_reload_failures_total"), 0.0)
        self.assertEqual(self.refused(s.prometheus), "unknown_ca")

    def test_crl_not_signed_by_client_ca(self) -> None:
        """A CRL from a CA that is not a client CA is a broken set: the old one stays."""
        s = self.s
        s.pki.crl([s.other[0]], ca=CertificateAuthority.create("stranger"))
        s.poll()
        self.assertEqual(s.sample("promgate_tls_reload_failures_total"), 1.0)
        conn = s.gw.connect(s.other)
        s.assert_scrapes(conn)
        conn.close()

    def test_expired_crl(self) -> None:
        """A CRL past its next update is a broken set: the old one stays."""
        s = self.s
        s.pki.crl([s.other[0]], next_update=datetime.now(timezone.utc) - timedelta(hours=1))
        s.poll()
        self.assertEqual(s.sample("promgate_tls_reload_failures_total"), 1.0)


class _Peer(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason if reason is not None else Failure(ConnectionError())


@implementer(IOpenSSLClientConnectionCreator)
class _ResumingClient:
    """A pyOpenSSL client that offers the session of its previous connection, if any."""

    def __init__(self, pki: TestPKI, cert: tuple[Path, Path], version: int) -> None:
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.load_verify_locations(str(pki.ca_cert))
        ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
        ctx.use_certificate_chain_file(str(cert[0]))
        ctx.use_privatekey_file(str(cert[1]))
        ctx.set_min_proto_version(version)
        ctx.set_max_proto_version(version)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
        self.ctx = ctx
        self.session: SSL.Session | None = None
        self.last: SSL.Connection | None = None

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N803
        connection = SSL.Connection(self.ctx, None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(b"localhost")
        if self.session is not None:
            connection.set_session(self.session)
        connection.set_connect_state()
        self.last = connection
        return connection


class ResumptionTests(SynchronousTestCase):
    """No session is resumed: a client offering its previous session gets a full
    handshake, so the CRL loaded since is checked."""

    def setUp(self) -> None:
        self.pki = TestPKI(Path(self.mktemp()).resolve())
        self.pki.crl()
        self.clock = MemoryReactorClock()
        self.clock.advance(time.time())
        files = TLSFiles(
            self.pki.gate_cert, self.pki.gate_key, self.pki.ca_cert, self.pki.directory / "crl.pem"
        )
        self.tls = ReloadingServerTLS.load("scrape", files, clock=self.clock, metrics=Metrics().tls)

    def connect(self, client: _ResumingClient) -> tuple[_Peer, _Peer]:
        server, peer = _Peer(), _Peer()
        server_factory = TLSMemoryBIOFactory(
            self.tls, False, Factory.forProtocol(lambda: server), clock=self.clock
        )
        client_factory = TLSMemoryBIOFactory(
            client, True, ClientFactory.forProtocol(lambda: peer), clock=self.clock
        )
        client_wire, _, pump = iosim.connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            greet=False,
            clock=self.clock,
        )
        pump.flush()
        if peer.lost is None:
            client_wire.write(b"ping")
            pump.flush()
        # Read once more: TLS 1.3 session tickets (if any were sent) arrive after the
        # handshake.
        pump.flush()
        return server, peer

    def test_no_session_resumed(self) -> None:
        for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
            client = _ResumingClient(self.pki, self.pki.client("prometheus"), version)
            server, _ = self.connect(client)
            self.assertEqual(server.data, b"ping")
            assert client.last is not None
            client.session = client.last.get_session()
            server, _ = self.connect(client)
            self.assertEqual(server.data, b"ping")
            assert client.last is not None
            self.assertEqual(_lib.SSL_session_reused(client.last._ssl), 0, version)

    def test_revoked_after_first_handshake(self) -> None:
        """A client revoked after its first handshake, offering that session, is
        refused."""
        for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
            cert = self.pki.client(f"revoked-{version}")
            client = _ResumingClient(self.pki, cert, version)
            server, _ = self.connect(client)
            self.assertEqual(server.data, b"ping")
            assert client.last is not None
            client.session = client.last.get_session()
            self.pki.crl([cert[0]])
            self.assertTrue(self.tls.reload().ok)
            server, peer = self.connect(client)
            self.assertEqual(server.data, b"", version)
            self.assertIsNotNone(peer.lost)
            self.pki.crl()
            self.assertTrue(self.tls.reload().ok)


class CheckConfigTests(SynchronousTestCase):
    """check-config reads ``tls.client_crl``: FILE:LINE errors for a file that is not a
    CRL or not signed by a client CA; a warning for one past its next update."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.pki = TestPKI(self.directory / "pki")
        self.config = self.directory / "promgate.yaml"
        self.config.write_text(CONFIG.format(crl=",\n  client_crl: pki/crl.pem"))

    def problems(self) -> tuple[list[str], list[str]]:
        _, errors, warnings = check_config(self.config)
        return [str(e) for e in errors], [str(w) for w in warnings]

    def test_valid(self) -> None:
        self.pki.crl()
        errors, warnings = self.problems()
        self.assertEqual(errors, [])
        self.assertEqual(warnings, [])

    def test_missing(self) -> None:
        errors, _ = self.problems()
        self.assertEqual(len(errors), 1, errors)
        self.assertIn(f"{self.config}:2: tls.client_crl: file ", errors[0])
        self.assertIn("does not exist", errors[0])

    def test_not_a_crl(self) -> None:
        (self.directory / "pki" / "crl.pem").write_bytes(self.pki.ca_cert.read_bytes())
        errors, _ = self.problems()
        self.assertEqual(len(errors), 1, errors)
        self.assertIn(f"{self.config}:2: tls.client_crl: ", errors[0])
        self.assertIn("not a PEM certificate revocation list", errors[0])

    def test_foreign_issuer(self) -> None:
        self.pki.crl(ca=CertificateAuthority.create("stranger"))
        errors, _ = self.problems()
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("CRL of CN=stranger is not signed by a client_ca CA", errors[0])

    def test_past_next_update(self) -> None:
        self.pki.crl(next_update=datetime.now(timezone.utc) - timedelta(hours=1))
        errors, warnings = self.problems()
        self.assertEqual(errors, [])
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("past its next update", warnings[0])
