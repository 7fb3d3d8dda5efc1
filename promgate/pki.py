"""A small development PKI: a CA, and server and client certificates issued from it.

This is what ``promgate`` uses to bootstrap a working mutual-TLS setup on a laptop or in CI,
and what the test suite (and integrators, through ``promgate.testing``) use to make
certificates on the fly. Keys are EC P-256 so that generating many is fast. It is not a
production CA: there is no revocation, and the CA key sits unencrypted next to its certificate.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertificateAuthority",
    "IssuedCert",
    "init_dev_pki",
]

#: How far back ``not_before`` defaults to, so that small clock skew does not break a fresh cert.
BACKDATE = timedelta(minutes=5)
#: Default lifetime of leaf certificates (the most that public CAs were ever allowed).
LEAF_LIFETIME = timedelta(days=825)
#: Lifetime of a development CA.
CA_LIFETIME = timedelta(days=3650)

_IDENTITY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
#: Identity names whose files would collide with the CA's or the gateway's own files.
_RESERVED_NAMES = frozenset({"ca", "gate"})

#: Key types a loaded CA may have (anything that can sign an X.509 certificate).
_SIGNING_KEYS = (
    rsa.RSAPrivateKey,
    dsa.DSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

_CERT_MODE = 0o644
_KEY_MODE = 0o600
_DIR_MODE = 0o700


def _utc(moment: datetime) -> datetime:
    """Return ``moment`` as an aware UTC datetime; a naive one is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _validity(
    not_before: datetime | None, not_after: datetime | None, lifetime: timedelta
) -> tuple[datetime, datetime]:
    """Fill in default validity bounds around the current time.

    If only ``not_after`` is given and it lies in the past, ``not_before`` defaults to one day
    before it, so that an expired certificate takes one argument to make.
    """
    now = datetime.now(timezone.utc)
    after = _utc(not_after) if not_after is not None else None
    if not_before is not None:
        before = _utc(not_before)
    elif after is not None and after <= now - BACKDATE:
        before = after - timedelta(days=1)
    else:
        before = now - BACKDATE
    if after is None:
        after = before + BACKDATE + lifetime
    if after <= before:
        raise ValueError(f"not_after ({after.isoformat()}) must be later than not_before")
    return before, after


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    """Ed25519 and Ed448 sign without a separate digest; everything else uses SHA-256."""
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _spki(key: x509.Certificate | CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode``, set before any byte is written (umask aside)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


@attrs.frozen
class IssuedCert:
    """A freshly issued certificate and its private key, both PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes = attrs.field(repr=False)

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write the certificate (mode 0644) and the key (mode 0600), replacing existing files."""
        _write(key_path, self.key_pem, _KEY_MODE)
        _write(cert_path, self.cert_pem, _CERT_MODE)


@attrs.frozen
class CertificateAuthority:
    """A CA certificate and its key, able to issue server and client certificates.

    Constructing one checks that the key belongs to the certificate and that the certificate
    is allowed to sign others.
    """

    cert_pem: bytes
    key_pem: bytes = attrs.field(repr=False)
    _cert: x509.Certificate = attrs.field(init=False, repr=False, eq=False)
    _key: CertificateIssuerPrivateKeyTypes = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        cert = x509.load_pem_x509_certificate(self.cert_pem)
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        if not isinstance(key, _SIGNING_KEYS):
            raise ValueError(f"a {type(key).__name__} cannot sign certificates")
        if _spki(key) != _spki(cert):
            raise ValueError("the CA key does not belong to the CA certificate")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise ValueError("the CA certificate lacks basicConstraints CA:TRUE")
        object.__setattr__(self, "_cert", cert)
        object.__setattr__(self, "_key", key)

    @classmethod
    def create(
        cls, name: str = "promgate development CA", *, now: datetime | None = None
    ) -> CertificateAuthority:
        """Make a new self-signed CA, valid for ten years from ``now`` (minus a little skew)."""
        start = _utc(now if now is not None else datetime.now(timezone.utc)) - BACKDATE
        key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + BACKDATE + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        """Load an existing CA from its PEM certificate and unencrypted PEM key."""
        return cls(cert_path.read_bytes(), key_path.read_bytes())

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write the CA certificate (mode 0644) and key (mode 0600)."""
        IssuedCert(self.cert_pem, self.key_pem).write(cert_path, key_path)

    def issue_server(
        self,
        hostnames: Sequence[str],
        ips: Sequence[str] = (),
        *,
        uris: Sequence[str] = (),
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> IssuedCert:
        """Issue a TLS server certificate for ``hostnames`` and ``ips``; CN = first hostname.

        ``uris`` adds URI SANs, such as the SPIFFE ID of a workload that serves metrics.
        """
        if isinstance(hostnames, str) or isinstance(ips, str) or isinstance(uris, str):
            raise TypeError("hostnames, ips and uris are sequences of strings, not a string")
        if not hostnames:
            raise ValueError("a server certificate needs at least one hostname")
        names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        names += [x509.UniformResourceIdentifier(u) for u in uris]
        return self._issue(
            hostnames[0],
            names,
            ExtendedKeyUsageOID.SERVER_AUTH,
            _validity(not_before, not_after, LEAF_LIFETIME),
        )

    def issue_client(
        self,
        name: str,
        *,
        uris: Sequence[str] = (),
        dns: Sequence[str] = (),
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        client_auth: bool = True,
    ) -> IssuedCert:
        """Issue a TLS client certificate with CN ``name`` and the given URI and DNS SANs.

        ``client_auth=False`` leaves out the clientAuth extended key usage, which makes a
        certificate that a correct server refuses (useful in tests).
        """
        if isinstance(uris, str) or isinstance(dns, str):
            raise TypeError("uris and dns are sequences of strings, not a string")
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.DNSName(d) for d in dns]
        return self._issue(
            name,
            names,
            ExtendedKeyUsageOID.CLIENT_AUTH if client_auth else None,
            _validity(not_before, not_after, LEAF_LIFETIME),
        )

    def _issue(
        self,
        common_name: str,
        names: list[x509.GeneralName],
        usage: x509.ObjectIdentifier | None,
        validity: tuple[datetime, datetime],
    ) -> IssuedCert:
        key = _new_key()
        try:
            ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(aki, critical=False)
        )
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, _signature_hash(self._key))
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _check_identity_name(name: str) -> None:
    if not _IDENTITY_NAME.match(name):
        raise ValueError(
            f"invalid identity name {name!r}: use 1-63 of A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    folded = name.lower()
    if folded in _RESERVED_NAMES or folded.endswith("-key"):
        raise ValueError(
            f"identity name {name!r} would clash with another file in the PKI directory "
            "(ca, gate and names ending in -key are reserved)"
        )


def init_dev_pki(
    directory: Path, identities: Sequence[str], trust_domain: str = "promgate.local"
) -> list[Path]:
    """Create (or complete) a development PKI in ``directory`` and return the files written.

    Existing files are never replaced: an existing CA is loaded and issues whatever is missing,
    so running this again with a longer identity list only adds the new identities. A
    certificate whose key is missing (or the reverse) is an error rather than a silent rewrite.
    """
    if isinstance(identities, str):
        raise TypeError("identities is a sequence of names, not a string")
    for name in identities:
        _check_identity_name(name)
    if not _TRUST_DOMAIN.match(trust_domain):
        raise ValueError(f"invalid SPIFFE trust domain {trust_domain!r}")

    created: list[Path] = []
    if not directory.exists():
        directory.mkdir(mode=_DIR_MODE, parents=True)
        directory.chmod(_DIR_MODE)

    def pair(stem: str) -> tuple[Path, Path] | None:
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
        have_cert, have_key = cert_path.exists(), key_path.exists()
        if have_cert and have_key:
            return None
        if have_cert or have_key:
            present, absent = (cert_path, key_path) if have_cert else (key_path, cert_path)
            raise ValueError(f"{present} exists but {absent} does not; restore or remove it")
        return cert_path, key_path

    ca_paths = pair("ca")
    if ca_paths is None:
        ca = CertificateAuthority.load(directory / "ca.pem", directory / "ca-key.pem")
    else:
        ca = CertificateAuthority.create()
        ca.write(*ca_paths)
        created += ca_paths

    gate_paths = pair("gate")
    if gate_paths is not None:
        ca.issue_server(["localhost"], ["127.0.0.1", "::1"]).write(*gate_paths)
        created += gate_paths

    for name in dict.fromkeys(identities):
        paths = pair(name)
        if paths is not None:
            ca.issue_client(name, uris=[f"spiffe://{trust_domain}/{name}"]).write(*paths)
            created += paths

    audit_key = directory / "audit.key"
    if not audit_key.exists():
        _write(audit_key, (secrets.token_hex(32) + "\n").encode("ascii"), _KEY_MODE)
        created.append(audit_key)
    return created
