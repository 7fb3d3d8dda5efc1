"""TLS contexts: the gateway's server side (mutual TLS) and verified upstream clients.

Server contexts follow Mozilla's "intermediate" profile: TLS 1.2 and later, forward-secret
AEAD ciphers only, no compression, no renegotiation, and ALPN that only ever selects
http/1.1. Upstream contexts always verify the upstream with service_identity.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtensionOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from zope.interface import implementer

from promgate.config.model import TLSFiles, UpstreamTLS

#: Mozilla's "intermediate" TLS 1.2 cipher list (TLS 1.3 suites are always on).
MOZILLA_INTERMEDIATE = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)


def _load_certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


#: OpenSSL X509_V_ERR_* codes, mapped to the reasons audit records and metrics use.
_VERIFY_REASONS = {
    9: "certificate_not_yet_valid",
    10: "certificate_expired",
    2: "unknown_ca",
    18: "unknown_ca",
    19: "unknown_ca",
    20: "unknown_ca",
    21: "unknown_ca",
    26: "certificate_purpose",
}


def verify_reason(errno: int) -> str:
    """Name an OpenSSL certificate verification error."""
    return _VERIFY_REASONS.get(errno, "certificate_invalid")


def handshake_reason(error: BaseException) -> str:
    """Name why a TLS handshake failed, from the OpenSSL error it raised."""
    text = repr(error.args).lower()
    for needle, reason in (
        ("peer did not return a certificate", "no_client_certificate"),
        ("certificate required", "no_client_certificate"),
        ("certificate verify failed", "certificate_invalid"),
        ("wrong version number", "protocol_version"),
        ("unsupported protocol", "protocol_version"),
        ("version too low", "protocol_version"),
        ("no shared cipher", "no_shared_cipher"),
        ("http request", "plain_http"),
        ("no application protocol", "alpn_mismatch"),
    ):
        if needle in text:
            return reason
    return "handshake_error"


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Creates server-side TLS connections and reports each verification error to the
    wrapped protocol (``tls_verify_error``), so a refused handshake can be audited with
    its precise reason (expired, unknown CA, ...)."""

    def __init__(self, options: CertificateOptions) -> None:
        self.options = options
        ctx = options.getContext()
        ctx.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE,
            _verify_callback,
        )

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N803
        connection: SSL.Connection = self.options.serverConnectionForTLS(tlsProtocol)  # type: ignore[arg-type]
        connection.set_app_data(tlsProtocol)
        return connection


def _verify_callback(
    connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
) -> bool:
    if not ok:
        wrapped = getattr(connection.get_app_data(), "wrappedProtocol", None)
        report = getattr(wrapped, "tls_verify_error", None)
        if report is not None:
            report(errno, depth, cert.to_cryptography())
    return bool(ok)


def server_tls(files: TLSFiles) -> ServerTLS:
    """The connection creator a mutual-TLS listener wraps its endpoint with."""
    return ServerTLS(server_options(files))


def server_options(files: TLSFiles) -> CertificateOptions:
    """Build the server context for a mutual-TLS listener from its files."""
    chain = _load_certs(files.certificate)
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    cas = _load_certs(files.client_ca)
    options = CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        verify=True,
        caCerts=[crypto.X509.from_cryptography(c) for c in cas],
        requireCertificate=True,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(MOZILLA_INTERMEDIATE),
        acceptableProtocols=[b"http/1.1"],
    )
    # getContext() caches the context, so options set here stay for every handshake.
    ctx = options.getContext()
    ctx.set_options(SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION)
    return options


def client_options(host: str, settings: UpstreamTLS) -> IOpenSSLClientConnectionCreator:
    """Build a verifying client context for an ``https`` upstream."""
    if settings.ca is not None:
        trust = trustRootFromCertificates(
            [
                Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
                for c in _load_certs(settings.ca)
            ]
        )
    else:
        trust = platformTrust()
    return optionsForClientTLS(settings.server_name or host, trustRoot=trust)


@attrs.frozen
class PeerCertificate:
    """What the gateway knows about a verified client certificate."""

    sha256: str
    subject: str
    cn: tuple[str, ...]
    dns: tuple[str, ...]
    uris: tuple[str, ...]

    @classmethod
    def from_x509(cls, cert: x509.Certificate) -> PeerCertificate:
        cns = tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
        dns: tuple[str, ...] = ()
        uris: tuple[str, ...] = ()
        try:
            san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        except x509.ExtensionNotFound:
            pass
        else:
            assert isinstance(san, x509.SubjectAlternativeName)
            dns = tuple(san.get_values_for_type(x509.DNSName))
            uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        return cls(
            sha256=cert.fingerprint(hashes.SHA256()).hex(),
            subject=cert.subject.rfc4514_string(),
            cn=cns,
            dns=dns,
            uris=uris,
        )


def not_after(path: Path) -> datetime.datetime:
    """Expiry of the first certificate in ``path``."""
    return _load_certs(path)[0].not_valid_after_utc
