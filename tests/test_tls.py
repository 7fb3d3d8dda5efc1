"""The server TLS context, over real TLS in memory (iosim): the key exchange groups it
offers, the chain it sends, which client certificate usages it accepts and the alert it
sends for the others, and that docs/deployment.md lists exactly the suites it offers."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from promgate.config.model import TLSFiles
from promgate.pki import CertificateAuthority
from promgate.testing import TestPKI
from promgate.tls import (
    KEY_EXCHANGE_GROUPS,
    MOZILLA_INTERMEDIATE,
    allows_client_auth,
    server_options,
    server_tls,
    set_groups,
    verify_reason,
)

ROOT = Path(__file__).resolve().parent.parent
#: OpenSSL X509_V_ERR_INVALID_PURPOSE.
INVALID_PURPOSE = 26
ANY_EKU = ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE


def _ca_cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, Any] | None
) -> x509.Certificate:
    """A CA certificate: self-signed (a root, path length 1) or issued by ``issuer``."""
    now = datetime.now(timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_cert, issuer_key = issuer if issuer is not None else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=1 if issuer is None else 0), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _issue_with_usages(
    ca: CertificateAuthority,
    name: str,
    usages: list[x509.ObjectIdentifier],
    directory: Path,
    *,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
) -> tuple[Path, Path]:
    """A certificate for ``name`` (CN, and DNS name) from ``ca`` whose extended key usage
    is exactly ``usages``; an EC P-256 key unless ``key`` is given."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(_pem(cert))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class _PKI:
    """One test PKI for the module: the client CA issues the gateway's certificate too (as
    ``promgate pki init`` does), plus a gateway chain through an intermediate CA."""

    def __init__(self, directory: Path) -> None:
        self.test = TestPKI(directory)
        self.directory = directory
        self.files = TLSFiles(self.test.gate_cert, self.test.gate_key, self.test.ca_cert)
        self.prometheus = self.test.client("prometheus")
        ca = self.test.ca
        self.any_eku = _issue_with_usages(ca, "any-eku", [ANY_EKU], directory)
        self.both = _issue_with_usages(
            ca, "client-and-any", [ExtendedKeyUsageOID.CLIENT_AUTH, ANY_EKU], directory
        )
        self.server_only = _issue_with_usages(
            ca, "server-only", [ExtendedKeyUsageOID.SERVER_AUTH], directory
        )
        # RSA certificates: in TLS 1.2 a client's groups also limit the curves of the EC
        # certificates either side may use, so the groups are tested with RSA there.
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        server_auth = [ExtendedKeyUsageOID.SERVER_AUTH]
        rsa_gate = _issue_with_usages(ca, "localhost", server_auth, directory, key=rsa_key)
        self.rsa_files = TLSFiles(rsa_gate[0], rsa_gate[1], self.test.ca_cert)
        client_auth = [ExtendedKeyUsageOID.CLIENT_AUTH]
        self.rsa_client = _issue_with_usages(ca, "rsa-client", client_auth, directory, key=rsa_key)
        noeku = ca.issue_client("noeku", client_auth=False)
        self.noeku = directory / "noeku.pem", directory / "noeku-key.pem"
        noeku.write(*self.noeku)
        # A gateway certificate issued by an intermediate, with the intermediate and the
        # root in its file, as operators often have them.
        root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = _ca_cert("server root", root_key, None)
        inter_key = ec.generate_private_key(ec.SECP256R1())
        self.intermediate = _ca_cert("server intermediate", inter_key, (self.root, root_key))
        inter = CertificateAuthority(
            _pem(self.intermediate),
            inter_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        leaf = inter.issue_server(["localhost"], ["127.0.0.1"])
        chained = directory / "chained.pem"
        chained.write_bytes(leaf.cert_pem + _pem(self.intermediate, self.root))
        (directory / "chained-key.pem").write_bytes(leaf.key_pem)
        (directory / "server-root.pem").write_bytes(_pem(self.root))
        self.chained = TLSFiles(chained, directory / "chained-key.pem", self.test.ca_cert)


_SHARED: _PKI | None = None


def _pki(case: SynchronousTestCase) -> _PKI:
    global _SHARED
    if _SHARED is None:
        _SHARED = _PKI(Path(case.mktemp()).resolve())
    return _SHARED


class _Peer(Protocol):
    """Either end of a test connection: records what arrived and why it ended; on the
    server side also the verification errors the TLS layer reports."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: Failure | None = None
        self.verify_errors: list[tuple[int, int, str]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason if reason is not None else Failure(ConnectionError())

    def tls_verify_error(self, errno: int, depth: int, cert: x509.Certificate) -> None:
        self.verify_errors.append((errno, depth, cert.subject.rfc4514_string()))


@implementer(IOpenSSLClientConnectionCreator)
class _ClientTLS:
    """A pyOpenSSL client that verifies the gateway and offers only what a test says."""

    def __init__(
        self,
        pki: _PKI,
        cert: tuple[Path, Path] | None,
        *,
        groups: tuple[str, ...] | None = None,
        ciphers: str | None = None,
        version: int | None = None,
        trust: Path | None = None,
    ) -> None:
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.load_verify_locations(str(trust or pki.test.ca_cert))
        ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
        if cert is not None:
            ctx.use_certificate_chain_file(str(cert[0]))
            ctx.use_privatekey_file(str(cert[1]))
        if groups is not None:
            set_groups(ctx, groups)
        if ciphers is not None:
            ctx.set_cipher_list(ciphers.encode("ascii"))
        if version is not None:
            ctx.set_min_proto_version(version)
            ctx.set_max_proto_version(version)
        self.ctx = ctx

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N803
        connection = SSL.Connection(self.ctx, None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(b"localhost")
        connection.set_connect_state()
        return connection


class _Connection:
    """A client and the gateway's TLS server context, connected in memory and pumped."""

    def __init__(self, files: TLSFiles, client_tls: _ClientTLS) -> None:
        clock = MemoryReactorClock()
        self.server = _Peer()
        self.client = _Peer()
        server_factory = TLSMemoryBIOFactory(
            server_tls(files), False, Factory.forProtocol(lambda: self.server), clock=clock
        )
        client_factory = TLSMemoryBIOFactory(
            client_tls, True, ClientFactory.forProtocol(lambda: self.client), clock=clock
        )
        client_wire, server_wire, pump = iosim.connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            greet=False,
            clock=clock,
        )
        self.client_wire: TLSMemoryBIOProtocol = client_wire
        self.server_wire: TLSMemoryBIOProtocol = server_wire
        pump.flush()
        if self.client.lost is None:
            # With TLS 1.3 the client finishes first; its first write meets the verdict.
            client_wire.write(b"ping")
            pump.flush()
        self.pump = pump

    @property
    def accepted(self) -> bool:
        return self.server.data == b"ping" and self.client.lost is None

    def client_error(self) -> str:
        """What the client's TLS library said when the connection ended."""
        assert self.client.lost is not None
        return str(self.client.lost.value)


class GroupTests(SynchronousTestCase):
    """The server offers X25519, P-256 and P-384 for key exchange, and nothing else."""

    def setUp(self) -> None:
        self.pki = _pki(self)

    def connect(self, groups: tuple[str, ...], version: int) -> _Connection:
        if version == SSL.TLS1_2_VERSION:
            client = _ClientTLS(self.pki, self.pki.rsa_client, groups=groups, version=version)
            return _Connection(self.pki.rsa_files, client)
        client = _ClientTLS(self.pki, self.pki.prometheus, groups=groups, version=version)
        return _Connection(self.pki.files, client)

    def test_mozilla_groups_accepted(self) -> None:
        """A client offering only X25519, only P-256 or only P-384 gets that group, with
        TLS 1.2 (ECDHE) and with TLS 1.3."""
        self.assertEqual(KEY_EXCHANGE_GROUPS, ("X25519", "prime256v1", "secp384r1"))
        for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
            for group, name in [
                ("X25519", "x25519"),
                ("P-256", "secp256r1"),
                ("P-384", "secp384r1"),
            ]:
                conn = self.connect((group,), version)
                self.assertTrue(conn.accepted, (version, group, conn.client.lost))
                handle = conn.client_wire.getHandle()
                self.assertEqual(handle.get_group_name(), name)

    def test_other_groups_refused(self) -> None:
        """A client offering only X448 or only P-521 finds no group in common."""
        for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
            for group in ("X448", "P-521", "ffdhe2048"):
                conn = self.connect((group,), version)
                self.assertFalse(conn.accepted, (version, group))
                self.assertEqual(conn.server.data, b"")

    def test_unknown_group_name(self) -> None:
        """set_groups refuses a list in which OpenSSL knows no group."""
        self.assertRaises(ValueError, set_groups, SSL.Context(SSL.TLS_METHOD), ["no-such-group"])


class CipherTests(SynchronousTestCase):
    """docs/deployment.md lists exactly the TLS 1.2 suites the server offers: no DHE."""

    def setUp(self) -> None:
        self.pki = _pki(self)

    def documented(self, setting: str) -> list[str]:
        text = (ROOT / "docs" / "deployment.md").read_text()
        (row,) = [line for line in text.splitlines() if line.startswith(f"| {setting} |")]
        return re.findall(r"`([^`]+)`", row)

    def test_docs_list_what_is_offered(self) -> None:
        """The TLS 1.2 cipher row of docs/deployment.md is the context's TLS 1.2 list."""
        ctx = server_options(self.pki.files).getContext()
        offered = [c for c in SSL.Connection(ctx, None).get_cipher_list() if "-" in c]
        self.assertEqual(sorted(offered), sorted(self.documented("TLS 1.2 ciphers")))
        self.assertEqual(sorted(offered), sorted(MOZILLA_INTERMEDIATE.split(":")))
        self.assertFalse([c for c in offered if c.startswith("DHE-")])

    def test_docs_list_groups(self) -> None:
        """The key exchange row of docs/deployment.md names exactly the groups offered."""
        self.assertEqual(self.documented("key exchange groups"), list(KEY_EXCHANGE_GROUPS))

    def test_dhe_only_client_refused(self) -> None:
        """A TLS 1.2 client offering only DHE suites finds no cipher in common."""
        client = _ClientTLS(
            self.pki,
            self.pki.prometheus,
            ciphers="DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384",
            version=SSL.TLS1_2_VERSION,
        )
        conn = _Connection(self.pki.files, client)
        self.assertFalse(conn.accepted)


class ChainTests(SynchronousTestCase):
    """The server sends its certificate and intermediates: never a root, never the client
    CA (which OpenSSL would add on its own when the client CA issued the gateway's leaf)."""

    def setUp(self) -> None:
        self.pki = _pki(self)

    def chain(self, files: TLSFiles, trust: Path) -> list[str]:
        conn = _Connection(files, _ClientTLS(self.pki, self.pki.prometheus, trust=trust))
        self.assertTrue(conn.accepted, conn.client.lost)
        sent = conn.client_wire.getHandle().get_peer_cert_chain(as_cryptography=True)
        return [c.subject.rfc4514_string() for c in sent]

    def test_leaf_only_when_client_ca_issued_it(self) -> None:
        """The gateway's leaf issued by the client CA: the leaf alone is sent."""
        self.assertEqual(self.chain(self.pki.files, self.pki.test.ca_cert), ["CN=localhost"])

    def test_leaf_and_intermediate(self) -> None:
        """A file with leaf, intermediate and root: the root is left out."""
        sent = self.chain(self.pki.chained, self.pki.directory / "server-root.pem")
        self.assertEqual(sent, ["CN=localhost", "CN=server intermediate"])


class ClientUsageTests(SynchronousTestCase):
    """Client certificates must list clientAuth; the others are refused in the handshake
    with the ``unsupported_certificate`` alert and the reason reported for the audit."""

    def setUp(self) -> None:
        self.pki = _pki(self)

    def connect(self, cert: tuple[Path, Path], version: int) -> _Connection:
        return _Connection(self.pki.files, _ClientTLS(self.pki, cert, version=version))

    def test_client_auth_accepted(self) -> None:
        """clientAuth, alone or next to anyExtendedKeyUsage, is accepted."""
        for cert in (self.pki.prometheus, self.pki.both):
            for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
                conn = self.connect(cert, version)
                self.assertTrue(conn.accepted, conn.client.lost)
                self.assertEqual(conn.server.verify_errors, [])

    def test_refused_with_unsupported_certificate(self) -> None:
        """No extended key usage, serverAuth only, or anyExtendedKeyUsage only: refused,
        the client told ``unsupported certificate`` (not ``internal error``), and the
        server side told X509_V_ERR_INVALID_PURPOSE for the leaf."""
        for name, cert in [
            ("CN=noeku", self.pki.noeku),
            ("CN=server-only", self.pki.server_only),
            ("CN=any-eku", self.pki.any_eku),
        ]:
            for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
                conn = self.connect(cert, version)
                self.assertFalse(conn.accepted, (name, version))
                self.assertEqual(conn.server.data, b"")
                self.assertIn("unsupported certificate", conn.client_error(), (name, version))
                self.assertEqual(conn.server.verify_errors, [(INVALID_PURPOSE, 0, name)])
                self.assertEqual(verify_reason(INVALID_PURPOSE), "certificate_purpose")

    def test_allows_client_auth(self) -> None:
        """allows_client_auth agrees with the handshake: clientAuth must be listed."""

        def load(path: tuple[Path, Path]) -> x509.Certificate:
            return x509.load_pem_x509_certificate(path[0].read_bytes())

        self.assertTrue(allows_client_auth(load(self.pki.prometheus)))
        self.assertTrue(allows_client_auth(load(self.pki.both)))
        self.assertFalse(allows_client_auth(load(self.pki.any_eku)))
        self.assertFalse(allows_client_auth(load(self.pki.noeku)))
        self.assertFalse(allows_client_auth(load(self.pki.server_only)))

    def test_unknown_ca_alert(self) -> None:
        """Errors OpenSSL finds itself keep their own alert (here ``unknown ca``)."""
        foreign = self.pki.test.foreign_client("foreign")
        conn = self.connect(foreign, SSL.TLS1_3_VERSION)
        self.assertFalse(conn.accepted)
        self.assertIn("unknown ca", conn.client_error())
        self.assertEqual(verify_reason(conn.server.verify_errors[0][0]), "unknown_ca")
