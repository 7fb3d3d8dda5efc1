"""Checks of the files a configuration names: certificates, keys, secrets and hashes.

Certificates and keys must parse and belong together; secret and token files must be
readable, not empty, and preferably private. Problems name the file, never what is in it.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from promgate.certificates import crl_signed_by
from promgate.config.fields import Reader
from promgate.config.model import TLSFiles
from promgate.config.yaml_source import Item

__all__ = [
    "audit_key_file",
    "bcrypt_hash",
    "certificates",
    "client_certificate",
    "private_key",
    "revocation_lists",
    "secret_file",
    "tls_files",
    "token_file",
]

#: The private keys the gateway's TLS accepts.
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

#: A bcrypt hash as exporter-toolkit's web-config.yml holds it (``htpasswd -B`` makes $2y$).
_BCRYPT = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
#: Above this bcrypt cost one check takes about a second or more.
_BCRYPT_SLOW_COST = 14
#: A bearer token as it can arrive in a header: one line of visible ASCII, no spaces.
_TOKEN_TEXT = re.compile(rb"^[\x21-\x7e]+$")


def certificates(r: Reader, item: Item, path: Path) -> list[x509.Certificate]:
    """The PEM certificates in ``path``; an expired one is worth a warning."""
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (ValueError, OSError) as e:
        r.error(item.src, item.key, f"{path}: not a PEM certificate ({e})")
        return []
    now = datetime.datetime.now(datetime.timezone.utc)
    for cert in certs:
        if cert.not_valid_after_utc < now:
            r.warn(
                item.src,
                item.key,
                f"{path}: certificate {cert.subject.rfc4514_string()} has expired",
            )
    return certs


def private_key(r: Reader, item: Item, path: Path) -> PrivateKey | None:
    """The unencrypted PEM private key in ``path``, of a type TLS here supports."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as e:
        r.error(item.src, item.key, f"{path}: not an unencrypted PEM private key ({e})")
        return None
    if not isinstance(
        key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)
    ):
        r.error(item.src, item.key, f"{path}: unsupported key type")
        return None
    return key


def _key_matches(
    r: Reader, key_item: Item, cert: x509.Certificate, key: PrivateKey, paths: tuple[Path, Path]
) -> bool:
    """Whether ``key`` is the private key of ``cert``; if not, say so at ``key_item``."""
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki):
        return True
    cert_path, key_path = paths
    r.error(key_item.src, key_item.key, f"key {key_path} does not match certificate {cert_path}")
    return False


def tls_files(r: Reader, item: Item) -> TLSFiles | None:
    """A listener's (or the top-level) ``tls``: certificate, its key, the client CA, and
    optionally the client CRL."""
    required = ("certificate", "key", "client_ca")
    f = r.fields(item, (*required, "client_crl"), required)
    if f is None or any(k not in f for k in required):
        return None
    cert_path = r.existing_file(f["certificate"])
    key_path = r.existing_file(f["key"])
    ca_path = r.existing_file(f["client_ca"])
    crl_path = r.existing_file(f["client_crl"]) if "client_crl" in f else None
    if cert_path is None or key_path is None or ca_path is None:
        return None
    if "client_crl" in f and crl_path is None:
        return None
    certs = certificates(r, f["certificate"], cert_path)
    key = private_key(r, f["key"], key_path)
    cas = certificates(r, f["client_ca"], ca_path)
    if certs and key is not None:
        _key_matches(r, f["key"], certs[0], key, (cert_path, key_path))
    if crl_path is not None:
        revocation_lists(r, f["client_crl"], crl_path, cas)
    return TLSFiles(cert_path, key_path, ca_path, crl_path)


def revocation_lists(
    r: Reader, item: Item, path: Path, cas: list[x509.Certificate]
) -> list[x509.CertificateRevocationList]:
    """The PEM certificate revocation lists in ``path``: each must be signed by one of the
    client CAs ``cas``. One past its next update is worth a warning: OpenSSL then refuses
    every client certificate from that CA until the file is refreshed."""
    try:
        crls = _pem_crls(path.read_bytes())
    except (ValueError, OSError) as e:
        r.error(item.src, item.key, f"{path}: not a PEM certificate revocation list ({e})")
        return []
    now = datetime.datetime.now(datetime.timezone.utc)
    for crl in crls:
        issuer = crl.issuer.rfc4514_string()
        if cas and not any(crl_signed_by(crl, ca) for ca in cas):
            r.error(item.src, item.key, f"{path}: CRL of {issuer} is not signed by a client_ca CA")
        next_update = crl.next_update_utc
        if next_update is not None and next_update < now:
            r.warn(
                item.src,
                item.key,
                f"{path}: CRL of {issuer} is past its next update "
                f"({next_update.isoformat()}); certificates it covers will be refused",
            )
    return crls


_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----\r?\n.+?\r?\n-----END X509 CRL-----", re.DOTALL)


def _pem_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM file (at least one)."""
    blocks = _PEM_CRL.findall(data)
    if not blocks:
        raise ValueError("no BEGIN X509 CRL block")
    return [x509.load_pem_x509_crl(block) for block in blocks]


def client_certificate(
    r: Reader, cert_item: Item, key_item: Item
) -> tuple[Path | None, Path | None]:
    """The certificate and key the gateway shows an upstream: both parse, and match."""
    cert_path = r.existing_file(cert_item)
    key_path = r.existing_file(key_item)
    if cert_path is None or key_path is None:
        return cert_path, key_path
    certs = certificates(r, cert_item, cert_path)
    key = private_key(r, key_item, key_path)
    if not certs or key is None:
        return cert_path, key_path
    if not _key_matches(r, key_item, certs[0], key, (cert_path, key_path)):
        return cert_path, key_path
    try:
        usage = certs[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return cert_path, key_path
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        r.warn(
            cert_item.src,
            cert_item.key,
            f"{cert_path}: extended key usage lacks clientAuth; upstreams will refuse it",
        )
    return cert_path, key_path


def secret_file(r: Reader, item: Item) -> tuple[Path, str] | None:
    """A credentials file's text, surrounding whitespace stripped; never empty.

    Problems name the file, never what is in it.
    """
    path = r.existing_file(item)
    if path is None:
        return None
    try:
        text = path.read_bytes().decode("utf-8").strip()  # no newline translation
        mode = path.stat().st_mode
    except OSError as e:
        r.error(item.src, item.key, f"cannot read {path}: {e.strerror or e}")
        return None
    except UnicodeDecodeError:
        r.error(item.src, item.key, f"{path} is not UTF-8 text")
        return None
    if not text:
        r.error(item.src, item.key, f"{path} is empty")
        return None
    if mode & 0o077:
        r.warn(item.src, item.key, f"{path} is readable by others; chmod 600 it")
    return path, text


def token_file(r: Reader, item: Item) -> bytes | None:
    """Read a bearer token file (the token itself) and return the SHA-256 of the token;
    the token is not kept."""
    path = r.existing_file(item)
    if path is None:
        return None
    try:
        token = path.read_bytes().strip()
        mode = path.stat().st_mode
    except OSError as e:
        r.error(item.src, item.key, f"cannot read {path}: {e.strerror or e}")
        return None
    if not token:
        r.error(item.src, item.key, f"token file {path} is empty")
        return None
    if not _TOKEN_TEXT.match(token):
        r.error(
            item.src,
            item.key,
            f"token file {path} must hold one token of visible ASCII characters "
            "(no spaces or line breaks inside it)",
        )
        return None
    if mode & 0o044:
        r.warn(
            item.src, item.key, f"token file {path} is readable by group or others; chmod 600 it"
        )
    return hashlib.sha256(token).digest()


def audit_key_file(r: Reader, item: Item) -> Path | None:
    """The audit chain's HMAC key file: it exists, is not empty, and is private."""
    key_file = r.existing_file(item)
    if key_file is None:
        return None
    try:
        if not key_file.read_text().strip():
            r.error(item.src, item.key, f"{key_file} is empty")
        elif key_file.stat().st_mode & 0o077:
            r.warn(item.src, item.key, f"{key_file} is readable by others; chmod 600 it")
    except (OSError, UnicodeDecodeError) as e:
        r.error(item.src, item.key, f"cannot read {key_file}: {e}")
    return key_file


def bcrypt_hash(r: Reader, item: Item) -> bytes | None:
    """A bcrypt hash in the exporter-toolkit format; a slow cost is worth a warning."""
    text = item.value
    if not isinstance(text, str) or not _BCRYPT.match(text):
        r.error(
            item.src,
            item.key,
            "must be a bcrypt hash: $2a$, $2b$ or $2y$, a cost from 04 to 31, "
            "then 53 characters of salt and hash (htpasswd -nBC 10 USER makes one)",
        )
        return None
    cost = int(text[4:6])
    if cost > _BCRYPT_SLOW_COST:
        r.warn(
            item.src,
            item.key,
            f"bcrypt cost {cost}: each new login costs seconds of CPU "
            f"(at most {_BCRYPT_SLOW_COST} is usual)",
        )
    return text.encode("ascii")
