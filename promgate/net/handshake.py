"""What a client's TLS handshake established, or why it failed."""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.python.failure import Failure

from promgate.core.context import TLSInfo
from promgate.core.reasons import Reason
from promgate.tls import PeerCertificate, handshake_reason


def tls_info(transport: Any) -> TLSInfo:
    """Version, cipher and client certificate of a completed handshake."""
    handle: SSL.Connection = transport.getHandle()
    cert = handle.get_peer_certificate(as_cryptography=True)
    peer = PeerCertificate.from_x509(cert) if cert is not None else None
    return TLSInfo(handle.get_protocol_version_name(), handle.get_cipher_name(), peer)


def classify_handshake_failure(
    reason: Failure,
    *,
    shutdown: bool,
    timed_out: bool,
    verify_error: tuple[str, PeerCertificate | None] | None,
) -> tuple[str, str, PeerCertificate | None]:
    """Why a TLS handshake ended before completing: (reason, detail, the refused cert)."""
    if shutdown:
        return Reason.GATEWAY_SHUTDOWN, "the gateway stopped during the handshake", None
    if timed_out:
        return Reason.HANDSHAKE_TIMEOUT, "TLS handshake not completed in time", None
    if verify_error is not None:
        return verify_error[0], reason.getErrorMessage(), verify_error[1]
    if reason.check(SSL.Error):
        return handshake_reason(reason.value or Exception()), reason.getErrorMessage(), None
    return Reason.CLOSED_BEFORE_HANDSHAKE, reason.getErrorMessage(), None


__all__ = ["classify_handshake_failure", "tls_info"]
