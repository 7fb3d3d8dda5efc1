"""What is known of a client connection and of one request on it: frozen values that the
pipeline's steps take instead of long parameter lists."""

from __future__ import annotations

from typing import Literal

import attrs

from promgate.identity import Recognition
from promgate.tls import PeerCertificate

#: An audit record's ``decision``.
Verdict = Literal["allow", "deny"]


@attrs.frozen
class TLSInfo:
    """What the TLS layer told us about a client connection."""

    version: str | None = None
    cipher: str | None = None
    peer: PeerCertificate | None = None


NO_TLS = TLSInfo()


@attrs.frozen
class ConnectionInfo:
    """One client connection: the listener it came in on, who it is from and how."""

    listener: str
    #: ``ip:port`` of the client (or the socket path), as audit records show it.
    peer: str
    tls: TLSInfo = NO_TLS


@attrs.frozen
class RequestContext:
    """One request: its connection, when it started, what was asked and by whom.

    ``recognition`` is the caller as finally established for this request (the
    connection's certificate, combined with any credentials the request carried).
    """

    connection: ConnectionInfo
    start: float
    recognition: Recognition
    method: str | None = None
    #: The request target as received.
    path: str | None = None
    #: Bytes of the request head.
    size: int = 0


@attrs.frozen
class Outcome:
    """How a request (or a tunnel, or a connection) ended: what the audit record and the
    metrics say of it, beyond its context."""

    decision: Verdict
    reason: str
    status: int | None = None
    route: str | None = None
    target: str | None = None
    #: The path relayed upstream, when it is not the one requested.
    path: str | None = None
    #: Bytes from the client, when more than the request head (a tunnel).
    bytes_in: int | None = None
    bytes_out: int = 0
    #: The precise cause, for the audit record only; never told to the caller.
    detail: str | None = None


__all__ = ["NO_TLS", "ConnectionInfo", "Outcome", "RequestContext", "TLSInfo", "Verdict"]
