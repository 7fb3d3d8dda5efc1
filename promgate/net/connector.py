"""Connecting upstream, one way for every listener: the endpoint for a configured target,
Nagle off, and what a failed connect means."""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import TimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from promgate.config.model import Target
from promgate.core.reasons import Reason
from promgate.reactors import IConnectReactor
from promgate.tls import UpstreamTLSError


def endpoint_for(reactor: IConnectReactor, target: Target, timeout: float) -> Any:
    """A client endpoint for the configured ``target`` itself: an address is connected to
    directly, a name through one resolution (HostnameEndpoint: resolution, then happy
    eyeballs), so that what was matched is what is connected to."""
    try:
        address = ipaddress.ip_address(target.host)
    except ValueError:
        return HostnameEndpoint(reactor, target.host, target.port, timeout=timeout)
    if address.version == 6:
        return TCP6ClientEndpoint(reactor, target.host, target.port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, target.host, target.port, timeout=timeout)


def connect(
    reactor: IConnectReactor, target: Target, factory: Factory, timeout: float
) -> Deferred[Protocol]:
    """Connect ``factory`` to ``target``, bounded by ``timeout``."""
    d: Deferred[Protocol] = endpoint_for(reactor, target, timeout).connect(factory)
    return d


def connect_failure(failure: Failure) -> tuple[Reason, str]:
    """Why connecting upstream failed, for the audit record and the metrics: the reason
    and the detail (never told to the client)."""
    if failure.check(TimeoutError):
        return Reason.UPSTREAM_TIMEOUT, "upstream connect timed out"
    if failure.check(SSL.Error, VerificationError, UpstreamTLSError):
        return Reason.UPSTREAM_TLS_FAILED, f"upstream TLS: {failure.getErrorMessage()}"
    # ConnectError and its kind: refused, unreachable, no such host.
    return Reason.UPSTREAM_REFUSED, failure.getErrorMessage()


def no_delay(transport: Any) -> None:
    """Turn Nagle's algorithm off: a response head and its body go out at once instead of
    waiting on the peer's delayed ACK. TLS wrappers pass this on to their TCP transport."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        with contextlib.suppress(OSError):
            set_no_delay(True)


__all__ = ["connect", "connect_failure", "endpoint_for", "no_delay"]
