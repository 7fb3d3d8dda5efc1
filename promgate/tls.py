"""TLS contexts: the gateway's server side (mutual TLS) and verified upstream clients.

Server contexts follow Mozilla's "intermediate" profile: TLS 1.2 and later, forward-secret
AEAD ciphers only, no compression, no renegotiation, and ALPN that only ever selects
http/1.1. Upstream contexts always verify the upstream with service_identity.
"""

from __future__ import annotations

import datetime
import re
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from service_identity import VerificationError
from service_identity.exceptions import URIMismatch
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    KeyPair,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from promgate.config.model import TLSFiles, UpstreamTLS

#: The TLS 1.2 cipher suites the server offers (TLS 1.3 suites are always on): Mozilla's
#: "intermediate" list without its DHE suites. The gateway loads no DH parameters, so DHE
#: could never be negotiated; every client that matters (Go's crypto/tls, which Prometheus
#: uses, has no DHE at all) speaks ECDHE. The ECDSA suites serve an EC or Ed25519 key, the
#: RSA ones an RSA key. docs/deployment.md lists exactly these.
MOZILLA_INTERMEDIATE = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)

#: Mozilla's "intermediate" key exchange groups, for TLS 1.2 ECDHE and TLS 1.3 key shares.
KEY_EXCHANGE_GROUPS = ("X25519", "prime256v1", "secp384r1")

#: SSL_MODE_NO_AUTO_CHAIN (ssl.h): never complete the server's chain from the trust store.
_MODE_NO_AUTO_CHAIN = 0x00000008


def _load_certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----\r?\n.+?\r?\n-----END X509 CRL-----", re.DOTALL)


def load_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    """Every certificate revocation list in PEM ``data``; ValueError if there is none, or
    one does not parse."""
    blocks = _PEM_CRL.findall(data)
    if not blocks:
        raise ValueError("no BEGIN X509 CRL block")
    return [x509.load_pem_x509_crl(block) for block in blocks]


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
    23: "certificate_revoked",
    # The client's issuer has no usable CRL: none in client_crl, or it is past its next
    # update, not yet valid, or its signature does not verify.
    3: "crl_unavailable",
    8: "crl_unavailable",
    11: "crl_unavailable",
    12: "crl_unavailable",
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
        ("certificate revoked", "certificate_revoked"),
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
        _require_client_certificates(options.getContext())

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N803
        connection: SSL.Connection = self.options.serverConnectionForTLS(tlsProtocol)  # type: ignore[arg-type]
        connection.set_app_data(tlsProtocol)
        return connection


def allows_client_auth(cert: x509.Certificate) -> bool:
    """Is this leaf certificate meant for TLS client authentication?

    The extension must be there and list clientAuth. OpenSSL accepts a leaf with no
    extended key usage at all for any purpose; the gateway does not. A leaf whose only
    usage is anyExtendedKeyUsage is refused too: OpenSSL's own check for a TLS client
    refuses it before the gateway is asked, and RFC 5280 leaves that choice to the
    application; the CA/Browser Forum does not allow it in end-entity certificates.
    """
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    except ValueError:  # a malformed extension
        return False
    return ExtendedKeyUsageOID.CLIENT_AUTH in eku


_VERIFY_MODE = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE


def _require_client_certificates(ctx: SSL.Context) -> None:
    """Install the client certificate check on a server context.

    pyOpenSSL's ``set_verify`` callback can only say yes or no; when it says no to a
    certificate OpenSSL found nothing wrong with (no clientAuth usage), OpenSSL records
    "unspecified" and sends the client an ``internal_error`` alert. This callback is
    installed through the same OpenSSL bindings pyOpenSSL uses, so that it can set the
    verification error itself: X509_V_ERR_INVALID_PURPOSE, which OpenSSL announces with
    the ``unsupported_certificate`` alert, as it does for a certificate made for servers.
    """

    def verify(ok: int, store: Any) -> int:
        try:
            return _verify_client(ok, store)
        except BaseException:
            # An exception escaping an OpenSSL callback would be lost; log it, refuse.
            _log.failure("while checking a client certificate")
            _lib.X509_STORE_CTX_set_error(store, _lib.X509_V_ERR_APPLICATION_VERIFICATION)
            return 0

    callback = _ffi.callback("int (*)(int, X509_STORE_CTX *)", verify)
    _lib.SSL_CTX_set_verify(ctx._context, _VERIFY_MODE, callback)
    _KEEP_ALIVE[ctx] = callback  # OpenSSL holds only a pointer to the callback


#: The verify callbacks installed on live contexts (cffi frees a callback nobody holds).
_KEEP_ALIVE: weakref.WeakKeyDictionary[SSL.Context, object] = weakref.WeakKeyDictionary()

_log = Logger()


def _verify_client(ok: int, store: Any) -> int:
    errno: int = _lib.X509_STORE_CTX_get_error(store)
    depth: int = _lib.X509_STORE_CTX_get_error_depth(store)
    raw = _lib.X509_STORE_CTX_get_current_cert(store)
    _lib.X509_up_ref(raw)
    cert = crypto.X509._from_raw_x509_ptr(raw).to_cryptography()
    if ok and depth == 0 and not allows_client_auth(cert):
        ok, errno = 0, _lib.X509_V_ERR_INVALID_PURPOSE
        _lib.X509_STORE_CTX_set_error(store, errno)
    if not ok:
        ssl = _lib.X509_STORE_CTX_get_ex_data(store, _lib.SSL_get_ex_data_X509_STORE_CTX_idx())
        connection = SSL.Connection._reverse_mapping.get(ssl)
        tls_protocol = connection.get_app_data() if connection is not None else None
        report = getattr(getattr(tls_protocol, "wrappedProtocol", None), "tls_verify_error", None)
        if report is not None:
            report(errno, depth, cert)
    return 1 if ok else 0


def set_groups(ctx: SSL.Context, groups: Sequence[str]) -> None:
    """Offer exactly ``groups`` for key exchange: TLS 1.2 ECDHE and TLS 1.3 key shares.

    pyOpenSSL has no call for this (``set_tmp_ecdh`` sets a single curve), so this is
    OpenSSL's SSL_CTX_set1_groups_list, through the bindings pyOpenSSL itself uses.
    Raises ValueError if OpenSSL knows none of the names.
    """
    if not _lib.SSL_CTX_set1_curves_list(ctx._context, ":".join(groups).encode("ascii")):
        _lib.ERR_clear_error()
        raise ValueError(f"OpenSSL refused the key exchange groups {':'.join(groups)}")


def server_tls(files: TLSFiles, *, alpn: Sequence[bytes] | None = (b"http/1.1",)) -> ServerTLS:
    """The connection creator a mutual-TLS listener wraps its endpoint with."""
    return ServerTLS(server_options(files, alpn=alpn))


def server_options(
    files: TLSFiles, *, alpn: Sequence[bytes] | None = (b"http/1.1",)
) -> CertificateOptions:
    """Build the server context for a mutual-TLS listener from its files.

    ``alpn`` lists the only protocols ALPN may select (HTTP listeners: http/1.1 alone);
    None leaves ALPN out, as a ``tcp`` listener relaying any protocol does.
    """
    chain = _load_certs(files.certificate)
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    cas = _load_certs(files.client_ca)
    crls = load_crls(files.client_crl.read_bytes()) if files.client_crl is not None else []
    return options_from(chain, key, cas, crls, alpn=alpn)


def options_from(
    chain: Sequence[x509.Certificate],
    key: Any,
    cas: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList] = (),
    *,
    alpn: Sequence[bytes] | None = (b"http/1.1",),
) -> CertificateOptions:
    """The server context of :func:`server_options`, from what its files hold.

    With ``crls``, OpenSSL checks the client's certificate (the leaf) against the CRL of
    its issuer, which must be among them: a revoked certificate is refused with the
    ``certificate_revoked`` alert, and one whose issuer has no current CRL is refused too.

    Sessions are never resumed: no session cache and no tickets, as Twisted sets up by
    default and as is set again here. A resumed session skips certificate verification,
    so it would let a client past a CRL or client CA loaded after its first handshake.
    """
    options = CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in _intermediates(list(chain))],
        verify=True,
        caCerts=[crypto.X509.from_cryptography(c) for c in cas],
        requireCertificate=True,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(MOZILLA_INTERMEDIATE),
        acceptableProtocols=list(alpn) if alpn is not None else None,
    )
    # getContext() caches the context, so options set here stay for every handshake.
    ctx = options.getContext()
    ctx.set_options(SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if crls:
        store = ctx.get_cert_store()
        assert store is not None  # a server context always has one
        for crl in crls:
            store.add_crl(crl)
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    set_groups(ctx, KEY_EXCHANGE_GROUPS)
    # The chain sent is the certificate file's, never one OpenSSL completes from the
    # client CAs (which would send the client CA's root when it also issued the leaf).
    ctx.set_mode(_MODE_NO_AUTO_CHAIN)
    if alpn is None:
        # Twisted installs an ALPN callback even with no protocols, and it then fails every
        # client that offers ALPN (an "internal error" alert). Decline ALPN instead.
        ctx.set_alpn_select_callback(_decline_alpn)
    return options


def _intermediates(chain: list[x509.Certificate]) -> list[x509.Certificate]:
    """The certificates after the leaf that the server sends: a self-signed (root)
    certificate among them is left out, since a client must already have it to trust it."""
    return [c for c in chain[1:] if not _self_signed(c)]


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _decline_alpn(connection: SSL.Connection, offered: list[bytes]) -> Any:
    return SSL.NO_OVERLAPPING_PROTOCOLS


class UpstreamTLSError(Exception):
    """A route's upstream TLS files could not be loaded when connecting to the upstream."""


def client_options(host: str, settings: UpstreamTLS) -> IOpenSSLClientConnectionCreator:
    """Build a verifying client context for an ``https`` upstream.

    The chain is always verified against ``ca`` (or the platform's trust store). The name
    checked, by optionsForClientTLS with service_identity, is ``identity.dns``, else
    ``server_name``, else the target's host; SNI is ``server_name``, else that same name.
    With ``identity.uri`` the leaf certificate must instead carry that URI SAN (see
    UpstreamClientTLS). ``cert`` and ``key`` answer an upstream that asks for a client
    certificate. Raises UpstreamTLSError if a file cannot be loaded.
    """
    try:
        if settings.ca is not None:
            trust = trustRootFromCertificates(
                [
                    Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
                    for c in _load_certs(settings.ca)
                ]
            )
        else:
            trust = platformTrust()
        client: PrivateCertificate | None = None
        extra: dict[str, object] = {}
        if settings.cert is not None and settings.key is not None:
            client, chain = _client_certificate(settings.cert, settings.key)
            if chain:
                extra["extraCertChain"] = chain
    except (OSError, ValueError, TypeError, SSL.Error) as e:
        raise UpstreamTLSError(f"cannot load the route's TLS files: {e}") from e
    identity = settings.identity
    sni = settings.server_name
    checked = (identity.dns if identity is not None else None) or sni or host
    options = optionsForClientTLS(
        checked, trustRoot=trust, clientCertificate=client, extraCertificateOptions=extra
    )
    uri = identity.uri if identity is not None else None
    if uri is None and (sni is None or sni == checked):
        return options
    try:
        return UpstreamClientTLS(options, server_name=sni if sni != checked else None, uri=uri)
    except UnicodeError as e:
        raise UpstreamTLSError(f"server_name {sni!r} is not a usable host name: {e}") from e


def _client_certificate(cert: Path, key: Path) -> tuple[PrivateCertificate, list[crypto.X509]]:
    """The client certificate (and its intermediates) shown to an upstream that asks."""
    chain = _load_certs(cert)
    private_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
    leaf = PrivateCertificate.fromCertificateAndKeyPair(
        Certificate(crypto.X509.from_cryptography(chain[0])),
        KeyPair(crypto.PKey.from_cryptography_key(private_key)),  # type: ignore[arg-type]
    )
    return leaf, [crypto.X509.from_cryptography(c) for c in chain[1:]]


@attrs.frozen
class ExpectedURI:
    """The URI SAN an upstream must carry, as reported in a failed check.

    service_identity's URI_ID cannot stand here: it compares only a URI's scheme and host
    (RFC 6125) and refuses any URI with a path, so it cannot check a SPIFFE ID. The
    comparison is exact instead.
    """

    uri: str


@implementer(IOpenSSLClientConnectionCreator)
class UpstreamClientTLS:
    """optionsForClientTLS plus what it cannot do for an upstream: an SNI name other than
    the name checked, and an expected URI SAN checked instead of a host name.

    The URI is checked where Twisted checks a host name, in the certificate verify callback,
    for the leaf: a mismatch fails the handshake itself, the protocol's ``connectionLost``
    gets a service_identity VerificationError, and no application byte is ever written.
    The trust root, chain verification and everything else stay optionsForClientTLS's.
    """

    log = Logger()

    def __init__(
        self,
        options: IOpenSSLClientConnectionCreator,
        *,
        server_name: str | None = None,
        uri: str | None = None,
    ) -> None:
        self._options = options
        self._server_name = server_name.encode("idna") if server_name is not None else None
        self._uri = uri

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N803
        connection: SSL.Connection = self._options.clientConnectionForTLS(tlsProtocol)  # type: ignore[arg-type]
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        if self._uri is not None:
            connection.set_verify(
                SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                self._uri_verifier(tlsProtocol, self._uri),
            )
        return connection

    def _uri_verifier(
        self, tls_protocol: object, uri: str
    ) -> Callable[[SSL.Connection, crypto.X509, int, int, int], bool]:
        protocol: object | None = tls_protocol

        def verify(
            connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
        ) -> bool:
            nonlocal protocol
            if depth != 0 or not ok:
                return bool(ok)
            try:
                if uri in PeerCertificate.from_x509(cert.to_cryptography()).uris:
                    return True
                mismatch = URIMismatch(mismatched_id=ExpectedURI(uri))  # type: ignore[arg-type]
                if protocol is not None:
                    protocol.failVerification(Failure(VerificationError(errors=[mismatch])))  # type: ignore[attr-defined]
            except BaseException:
                # An exception escaping an OpenSSL callback would be lost; log it, refuse.
                self.log.failure("while checking the upstream's URI SAN")
            finally:
                protocol = None  # no reference cycle through the connection
            return False

        return verify


@attrs.frozen
class PeerCertificate:
    """What the gateway knows about a verified client certificate."""

    sha256: str
    subject: str
    cn: tuple[str, ...]
    dns: tuple[str, ...]
    uris: tuple[str, ...]
    #: SHA-256 of the DER SubjectPublicKeyInfo (what a ``spki_sha256`` pin names).
    spki_sha256: str = ""

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
            spki_sha256=spki_sha256(cert),
        )


def spki_sha256(cert: x509.Certificate) -> str:
    """The SHA-256 of a certificate's SubjectPublicKeyInfo, lower-case hex (a key pin)."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return digest.finalize().hex()


def not_after(path: Path) -> datetime.datetime:
    """Expiry of the first certificate in ``path``."""
    return _load_certs(path)[0].not_valid_after_utc
