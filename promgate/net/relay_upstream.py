"""The upstream end of a byte relay: connecting (a PROXY header first, then TLS if the
route says so) and the connection itself."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from promgate.config.model import Route, Target
from promgate.net.connector import endpoint_for, no_delay
from promgate.net.relay import Relay, Side
from promgate.reactors import IConnectReactor
from promgate.tls import UpstreamTLSError, client_options


class IUpstreamConnector(Interface):
    """Opens the upstream side of a relay."""

    def connect(
        route: Route,  # noqa: N805 (zope.interface: no self)
        target: Target,
        header: bytes,
        tls: bool,
    ) -> Deferred[UpstreamConnection]:
        """Connect to ``target``, send ``header`` (a PROXY header, or nothing) first, then
        TLS if ``tls``; fire with the connection once it is ready to carry data."""


@implementer(IUpstreamConnector)
class EndpointConnector:
    """Connects with client endpoints; upstream TLS verified as every upstream is
    (``promgate.tls.client_options``: service_identity, the route's CA)."""

    def __init__(self, reactor: IConnectReactor, *, connect_timeout: float = 5.0) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout

    def connect(
        self, route: Route, target: Target, header: bytes, tls: bool
    ) -> Deferred[UpstreamConnection]:
        creator = None
        if tls:
            try:
                creator = client_options(target.host, route.upstream_tls)
            except UpstreamTLSError as e:
                return fail(e)
        endpoint = endpoint_for(self._reactor, target, self._timeout)
        d: Deferred[UpstreamConnection] = endpoint.connect(_UpstreamFactory(header, creator))
        d.addCallback(lambda upstream: upstream.ready)
        return d


class _UpstreamFactory(Factory):
    noisy = False

    def __init__(self, header: bytes, tls: IOpenSSLClientConnectionCreator | None) -> None:
        self._header = header
        self._tls = tls

    def buildProtocol(self, addr: object) -> UpstreamConnection:
        if self._tls is not None:
            return TLSUpstream(self._header, self._tls)
        return TCPUpstream(self._header)


class UpstreamConnection(Protocol):
    """The upstream connection of a relay: TCPUpstream or TLSUpstream.

    ``ready`` fires with the protocol once it can carry data: after the PROXY header is
    written and, for TLS, after the handshake (the upstream verified). Anything the upstream
    sends before the relay attaches is held and delivered then.
    """

    side: Side

    def __init__(
        self, header: bytes = b"", tls: IOpenSSLClientConnectionCreator | None = None
    ) -> None:
        self._header = header
        self._tls = tls
        self.ready: Deferred[UpstreamConnection] = Deferred(self._cancel)
        self.relay: Relay | None = None
        self._early: list[bytes] = []
        self._early_eof = False
        self._early_lost: Failure | None = None

    def _cancel(self, d: Deferred[UpstreamConnection]) -> None:
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.side.abort()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.side = Side(self.transport, secure=self._tls is not None)
        no_delay(self.transport)
        if self._header:
            self.transport.write(self._header)
        if self._tls is not None:
            # Bytes written before startTLS (the PROXY header) go out in the clear first.
            self.transport.startTLS(self._tls)  # type: ignore[attr-defined]
        else:
            self.ready.callback(self)

    def handshakeCompleted(self) -> None:
        if not self.ready.called:
            self.ready.callback(self)

    def attach(self, relay: Relay) -> None:
        self.relay = relay

    def deliver_early(self) -> None:
        """Hand the relay what arrived before it attached (a server that speaks first)."""
        relay = self.relay
        assert relay is not None
        early, self._early = self._early, []
        for data in early:
            relay.upstream_data(data)
        if self._early_eof:
            relay.upstream_closed_write()
        if self._early_lost is not None:
            relay.upstream_lost(self._early_lost)

    def dataReceived(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:
            relay.upstream_data(data)
        else:
            self._early.append(data)

    def readConnectionLost(self) -> None:
        self.side.gate.eof = True
        if self.relay is not None:
            self.relay.upstream_closed_write()
        else:
            self._early_eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.side.lost = True
        if not self.ready.called:
            self.ready.errback(reason)
        elif self.relay is not None:
            self.relay.upstream_lost(reason)
        else:
            self._early_lost = reason


# twisted.internet.endpoints._WrappingProtocol passes on only the *last* of
# IHalfCloseableProtocol and IHandshakeListener that the protocol provides (it calls
# directlyProvides once per interface), so one class providing both would lose half-close:
# a plain upstream's FIN would end its whole connection. Hence one class for each.


@implementer(IHalfCloseableProtocol)
class TCPUpstream(UpstreamConnection):
    """A plain upstream connection: its FIN is relayed as a half-close."""


@implementer(IHandshakeListener)
class TLSUpstream(UpstreamConnection):
    """An upstream connection re-encrypted with TLS (a route with scheme https); its end,
    close_notify or not, ends the whole connection (see promgate.net.relay)."""


__all__ = [
    "EndpointConnector",
    "IUpstreamConnector",
    "TCPUpstream",
    "TLSUpstream",
    "UpstreamConnection",
]
