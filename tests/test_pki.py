"""Tests for the development PKI: what the certificates say, and that TLS stacks accept them."""

from __future__ import annotations

import ipaddress
import re
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from promgate.pki import CertificateAuthority, IssuedCert, init_dev_pki

#: One CA for the whole module: issuing is cheap, but there is no need to repeat it.
CA = CertificateAuthority.create()


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _verify(ca: CertificateAuthority, issued: IssuedCert, at: datetime | None = None) -> None:
    """Verify ``issued`` against ``ca`` the way OpenSSL does for a TLS peer; raise on failure."""
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(_cert(ca.cert_pem)))
    if at is not None:
        store.set_time(at)
    leaf = crypto.X509.from_cryptography(_cert(issued.cert_pem))
    crypto.X509StoreContext(store, leaf).verify_certificate()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class _Greeter(Protocol):
    """Sends a greeting as soon as the connection (and so the TLS handshake) starts."""

    def connectionMade(self) -> None:
        self.transport.write(b"hello")  # type: ignore[union-attr]


class _Recorder(Protocol):
    """Remembers what arrived and how the connection ended."""

    def __init__(self) -> None:
        self.received = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason


def _handshake(server: IssuedCert, client: IssuedCert, trust: CertificateAuthority) -> _Recorder:
    """Run a mutual-TLS handshake in memory; return the server application's record of it."""
    authority = ssl.Certificate.loadPEM(trust.cert_pem)
    server_options = ssl.PrivateCertificate.loadPEM(server.cert_pem + server.key_pem).options(
        authority
    )
    client_options = ssl.optionsForClientTLS(
        "localhost",
        trustRoot=authority,
        clientCertificate=ssl.PrivateCertificate.loadPEM(client.cert_pem + client.key_pem),
    )
    recorder = _Recorder()
    clock = Clock()
    server_factory = TLSMemoryBIOFactory(
        server_options, False, Factory.forProtocol(lambda: recorder), clock
    )
    client_factory = TLSMemoryBIOFactory(client_options, True, Factory.forProtocol(_Greeter), clock)
    _, _, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        greet=False,
        clock=clock,
    )
    pump.flush()
    return recorder


class IssueServerTests(SynchronousTestCase):
    """Server certificates name the hosts they serve and are for server authentication only."""

    def test_names_and_usage(self) -> None:
        """CN is the first hostname; every hostname and IP is a SAN; the EKU is serverAuth."""
        issued = CA.issue_server(["gate.example.org", "localhost"], ["127.0.0.1", "::1"])
        cert = _cert(issued.cert_pem)
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.assertEqual([a.value for a in cn], ["gate.example.org"])
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["gate.example.org", "localhost"])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        self.assertFalse(constraints.ca)
        self.assertEqual(cert.issuer, _cert(CA.cert_pem).subject)

    def test_default_validity(self) -> None:
        """A leaf is backdated five minutes against clock skew and lasts 825 days."""
        before = datetime.now(timezone.utc)
        cert = _cert(CA.issue_server(["localhost"]).cert_pem)
        after = datetime.now(timezone.utc)
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        slack = timedelta(seconds=1)
        self.assertTrue(
            before - timedelta(minutes=5) - slack <= start <= after - timedelta(minutes=5)
        )
        self.assertEqual(end - start, timedelta(days=825, minutes=5))

    def test_needs_a_hostname(self) -> None:
        """A server certificate without any hostname is refused rather than issued nameless."""
        self.assertRaises(ValueError, CA.issue_server, [])

    def test_loads_in_twisted(self) -> None:
        """Twisted accepts the concatenated PEM certificate and key as a PrivateCertificate."""
        issued = CA.issue_server(["localhost"])
        loaded = ssl.PrivateCertificate.loadPEM(issued.cert_pem + issued.key_pem)
        self.assertEqual(loaded.dump(crypto.FILETYPE_PEM), issued.cert_pem)


class IssueClientTests(SynchronousTestCase):
    """Client certificates carry the identity a gateway matches on."""

    def test_names_and_usage(self) -> None:
        """CN is the name, URI and DNS SANs are present, and the EKU is clientAuth."""
        issued = CA.issue_client(
            "prometheus", uris=["spiffe://example.org/prometheus"], dns=["prom.example.org"]
        )
        cert = _cert(issued.cert_pem)
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.assertEqual([a.value for a in cn], ["prometheus"])
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(
            san.get_values_for_type(x509.UniformResourceIdentifier),
            ["spiffe://example.org/prometheus"],
        )
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["prom.example.org"])
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.CLIENT_AUTH])

    def test_without_client_auth(self) -> None:
        """client_auth=False leaves the extended key usage out entirely."""
        cert = _cert(CA.issue_client("nobody", client_auth=False).cert_pem)
        self.assertRaises(
            x509.ExtensionNotFound, cert.extensions.get_extension_for_class, x509.ExtendedKeyUsage
        )

    def test_no_sans_no_extension(self) -> None:
        """A client certificate with no SANs has no (empty, hence invalid) SAN extension."""
        cert = _cert(CA.issue_client("bare").cert_pem)
        self.assertRaises(
            x509.ExtensionNotFound,
            cert.extensions.get_extension_for_class,
            x509.SubjectAlternativeName,
        )

    def test_explicit_validity(self) -> None:
        """Explicit bounds are used as given."""
        start = datetime(2030, 1, 1, tzinfo=timezone.utc)
        end = datetime(2030, 2, 1, tzinfo=timezone.utc)
        cert = _cert(CA.issue_client("later", not_before=start, not_after=end).cert_pem)
        self.assertEqual((cert.not_valid_before_utc, cert.not_valid_after_utc), (start, end))

    def test_inverted_validity(self) -> None:
        """not_after before not_before is a mistake, not an empty certificate."""
        now = datetime.now(timezone.utc)
        self.assertRaises(
            ValueError,
            CA.issue_client,
            "x",
            not_before=now,
            not_after=now - timedelta(days=1),
        )


class VerificationTests(SynchronousTestCase):
    """OpenSSL chain verification accepts good certificates and rejects bad ones."""

    def test_valid_chain(self) -> None:
        """A fresh client and server certificate verify against their CA."""
        _verify(CA, CA.issue_client("prometheus"))
        _verify(CA, CA.issue_server(["localhost"]))

    def test_expired(self) -> None:
        """A client certificate whose not_after has passed fails verification."""
        expired = CA.issue_client("late", not_after=datetime.now(timezone.utc) - timedelta(days=1))
        error = self.assertRaises(crypto.X509StoreContextError, _verify, CA, expired)
        self.assertIn("expired", str(error))

    def test_not_yet_valid(self) -> None:
        """Verification at a time before not_before fails too."""
        issued = CA.issue_client("early")
        at = datetime.now(timezone.utc) - timedelta(days=1)
        self.assertRaises(crypto.X509StoreContextError, _verify, CA, issued, at)

    def test_other_ca(self) -> None:
        """A certificate from a different CA (even one with the same name) fails verification."""
        other = CertificateAuthority.create()
        self.assertRaises(crypto.X509StoreContextError, _verify, CA, other.issue_client("x"))

    def test_mutual_tls_handshake(self) -> None:
        """A real in-memory TLS handshake with client certificates succeeds end to end."""
        recorder = _handshake(
            CA.issue_server(["localhost"], ["127.0.0.1"]), CA.issue_client("prometheus"), CA
        )
        self.assertEqual(recorder.received, b"hello")
        self.assertIsNone(recorder.reason)

    def test_handshake_rejects_foreign_client(self) -> None:
        """The server refuses a client certificate from another CA: no data gets through."""
        foreign = CertificateAuthority.create().issue_client("intruder")
        recorder = _handshake(CA.issue_server(["localhost"]), foreign, CA)
        self.assertEqual(recorder.received, b"")
        self.assertIsNotNone(recorder.reason)
        assert recorder.reason is not None
        self.assertTrue(recorder.reason.check(SSL.Error), recorder.reason)


class CertificateAuthorityTests(SynchronousTestCase):
    """A CA is checked when it is built or loaded."""

    def test_create(self) -> None:
        """A new CA is a CA: CA:TRUE, keyCertSign, self-signed, about ten years long."""
        now = datetime(2026, 1, 1, tzinfo=timezone.utc)
        cert = _cert(CertificateAuthority.create("Test CA", now=now).cert_pem)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertTrue(constraints.value.ca)
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(usage.key_cert_sign)
        self.assertEqual(cert.subject, cert.issuer)
        self.assertEqual(cert.not_valid_before_utc, now - timedelta(minutes=5))
        self.assertEqual(cert.not_valid_after_utc, now + timedelta(days=3650))

    def test_round_trip(self) -> None:
        """A CA written to disk loads back and issues certificates that verify."""
        directory = Path(self.mktemp())
        directory.mkdir()
        CA.write(directory / "ca.pem", directory / "ca-key.pem")
        self.assertEqual(_mode(directory / "ca-key.pem"), 0o600)
        loaded = CertificateAuthority.load(directory / "ca.pem", directory / "ca-key.pem")
        self.assertEqual(loaded, CA)
        _verify(CA, loaded.issue_client("x"))

    def test_mismatched_key(self) -> None:
        """A CA certificate paired with someone else's key is refused."""
        other = CertificateAuthority.create()
        self.assertRaises(ValueError, CertificateAuthority, CA.cert_pem, other.key_pem)

    def test_leaf_is_not_a_ca(self) -> None:
        """A leaf certificate cannot be loaded as a CA."""
        leaf = CA.issue_client("x")
        self.assertRaises(ValueError, CertificateAuthority, leaf.cert_pem, leaf.key_pem)


class IssuedCertTests(SynchronousTestCase):
    """Written certificates and keys get safe permissions."""

    def test_write_modes(self) -> None:
        """The key is 0600 and the certificate 0644, even when replacing a looser file."""
        directory = Path(self.mktemp())
        directory.mkdir()
        key = directory / "k.pem"
        key.write_bytes(b"old")
        key.chmod(0o666)
        issued = CA.issue_client("x")
        issued.write(directory / "c.pem", key)
        self.assertEqual(_mode(key), 0o600)
        self.assertEqual(_mode(directory / "c.pem"), 0o644)
        self.assertEqual(key.read_bytes(), issued.key_pem)
        self.assertEqual((directory / "c.pem").read_bytes(), issued.cert_pem)


class InitDevPKITests(SynchronousTestCase):
    """init_dev_pki lays out a complete, idempotent development PKI."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()) / "pki"

    def test_creates_everything(self) -> None:
        """All files appear, keys are 0600, the directory is 0700, and certs chain to the CA."""
        created = init_dev_pki(self.directory, ["prometheus", "ops"])
        names = {
            "ca.pem",
            "ca-key.pem",
            "gate.pem",
            "gate-key.pem",
            "prometheus.pem",
            "prometheus-key.pem",
            "ops.pem",
            "ops-key.pem",
            "audit.key",
        }
        self.assertEqual({p.name for p in created}, names)
        self.assertEqual({p.name for p in self.directory.iterdir()}, names)
        self.assertEqual(_mode(self.directory), 0o700)
        for path in created:
            expected = 0o600 if path.name.endswith(("-key.pem", ".key")) else 0o644
            self.assertEqual(_mode(path), expected, path.name)

        ca = CertificateAuthority.load(self.directory / "ca.pem", self.directory / "ca-key.pem")
        gate = IssuedCert(
            (self.directory / "gate.pem").read_bytes(),
            (self.directory / "gate-key.pem").read_bytes(),
        )
        _verify(ca, gate)
        san = _cert(gate.cert_pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(san.value.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            san.value.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )

        prometheus = IssuedCert(
            (self.directory / "prometheus.pem").read_bytes(),
            (self.directory / "prometheus-key.pem").read_bytes(),
        )
        _verify(ca, prometheus)
        cert = _cert(prometheus.cert_pem)
        self.assertEqual(
            [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)],
            ["prometheus"],
        )
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(
            san.value.get_values_for_type(x509.UniformResourceIdentifier),
            ["spiffe://promgate.local/prometheus"],
        )
        self.assertEqual(_handshake(gate, prometheus, ca).received, b"hello")

        audit_key = (self.directory / "audit.key").read_text()
        self.assertRegex(audit_key, re.compile(r"\A[0-9a-f]{64}\n\Z"))

    def test_trust_domain(self) -> None:
        """The SPIFFE trust domain in identity URIs can be chosen."""
        init_dev_pki(self.directory, ["agent"], trust_domain="example.org")
        cert = _cert((self.directory / "agent.pem").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(
            san.get_values_for_type(x509.UniformResourceIdentifier),
            ["spiffe://example.org/agent"],
        )

    def test_idempotent(self) -> None:
        """A second run creates nothing and changes nothing, the first CA included."""
        init_dev_pki(self.directory, ["prometheus"])
        before = {p.name: p.read_bytes() for p in self.directory.iterdir()}
        self.assertEqual(init_dev_pki(self.directory, ["prometheus"]), [])
        after = {p.name: p.read_bytes() for p in self.directory.iterdir()}
        self.assertEqual(after, before)

    def test_adds_identity_with_existing_ca(self) -> None:
        """A new identity on a later run is issued by the CA already there."""
        init_dev_pki(self.directory, ["prometheus"])
        ca_pem = (self.directory / "ca.pem").read_bytes()
        created = init_dev_pki(self.directory, ["prometheus", "grafana"])
        self.assertEqual(
            created, [self.directory / "grafana.pem", self.directory / "grafana-key.pem"]
        )
        self.assertEqual((self.directory / "ca.pem").read_bytes(), ca_pem)
        ca = CertificateAuthority.load(self.directory / "ca.pem", self.directory / "ca-key.pem")
        _verify(
            ca,
            IssuedCert(
                (self.directory / "grafana.pem").read_bytes(),
                (self.directory / "grafana-key.pem").read_bytes(),
            ),
        )

    def test_existing_directory_mode_kept(self) -> None:
        """An existing directory is used as it is."""
        self.directory.mkdir(parents=True)
        self.directory.chmod(0o750)
        init_dev_pki(self.directory, [])
        self.assertEqual(_mode(self.directory), 0o750)

    def test_half_pair_is_an_error(self) -> None:
        """A certificate whose key is missing is reported, not silently replaced."""
        init_dev_pki(self.directory, ["prometheus"])
        (self.directory / "prometheus-key.pem").unlink()
        self.assertRaises(ValueError, init_dev_pki, self.directory, ["prometheus"])
        self.assertFalse((self.directory / "prometheus-key.pem").exists())

    def test_invalid_names(self) -> None:
        """Names outside the identity grammar, or that would clash with PKI files, are refused."""
        for name in ["", "-x", ".hidden", "a/b", "a b", "x" * 64, "ca", "gate", "prom-key"]:
            self.assertRaises(ValueError, init_dev_pki, self.directory, [name])
        self.assertFalse(self.directory.exists())

    def test_valid_names(self) -> None:
        """Names within the grammar are accepted."""
        init_dev_pki(self.directory, ["a", "A_b.c-d", "9" * 63])
        self.assertTrue((self.directory / ("9" * 63 + ".pem")).exists())
