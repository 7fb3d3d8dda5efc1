"""Facts about certificates and revocation lists that loading a configuration and serving
TLS both need; it imports nothing of promgate, so both can use it."""

from __future__ import annotations

from cryptography import x509

__all__ = ["crl_signed_by"]


def crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    """Whether ``ca`` issued and signed ``crl``."""
    if crl.issuer != ca.subject:
        return False
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
