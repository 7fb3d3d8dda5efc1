"""Connections from a front load balancer that begin with a PROXY protocol header.

A ``haproxy:`` listener's connections each start with a PROXY protocol header, version 1
(text) or 2 (binary), naming the client the load balancer accepted. Twisted's own wrapper
(``twisted.protocols.haproxy``) starts the wrapped protocol at once and only changes what
``getPeer`` answers once the header has arrived; promgate's connections note their peer when
they start, so here the wrapped protocol (TLS, then the listener's) starts only once the
header has been read: everything it records, the audit record first, carries the original
client's address. A header that is malformed, or not complete within the deadline, closes
the connection before the listener ever sees it. A ``LOCAL`` header (a v2 health check)
and ``PROXY UNKNOWN`` keep the load balancer's own address.

The header is parsed by Twisted's parsers; it is bounded (107 bytes for v1, 16 + 65535 for
v2, as the protocol defines).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

__all__ = ["HEADER_TIMEOUT", "ProxiedFactory", "ProxiedProtocol"]

#: How long a connection may take to send its PROXY header.
HEADER_TIMEOUT = 10.0

_V1 = b"PROXY "
_V2 = V2Parser.PREFIX
_V1_UNKNOWN = b"PROXY UNKNOWN\r\n"


def _canonical(address: IAddress | None) -> IAddress | None:
    """An IPv6 address written the short way (``2001:db8::7``), as everywhere else in
    promgate; Twisted's v2 parser writes every group."""
    if isinstance(address, IPv6Address):
        short = ipaddress.IPv6Address(address.host).compressed
        return IPv6Address(address.type, short, address.port)
    return address


class ProxiedProtocol(ProtocolWrapper):
    """Reads the PROXY header, then starts the wrapped protocol with the addresses it
    names."""

    log = Logger()

    def __init__(self, factory: ProxiedFactory, wrapped: IProtocol) -> None:
        super().__init__(factory, wrapped)
        self.proxied: ProxiedFactory = factory
        self.info: ProxyInfo | None = None
        self._started = False
        self._buf = b""
        self._parser: V1Parser | V2Parser | None = None
        self._timer: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:
        # Not ProtocolWrapper's: the wrapped protocol waits for the header.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._timer = self.proxied.clock.callLater(self.proxied.timeout, self._too_slow)

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.transport is None or self._timer is None:
            return  # refused already
        try:
            rest = self._header(data)
        except InvalidProxyHeader:
            self._refuse("not a valid PROXY protocol header")
            return
        if rest is None:
            return
        self._cancel()
        self._started = True
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]
        if rest and self.transport is not None:
            self.wrappedProtocol.dataReceived(rest)

    def _header(self, data: bytes) -> bytes | None:
        """Feed the header parser; what follows the header once it is complete."""
        parser = self._parser
        if parser is None:
            self._buf += data
            buf = self._buf
            if buf.startswith(_V1):
                parser = V1Parser()
            elif buf.startswith(_V2) and len(buf) >= 16:
                parser = V2Parser()
            elif _V1.startswith(buf[:6]) or _V2.startswith(buf[:12]):
                return None  # not enough to tell yet
            else:
                raise InvalidProxyHeader()
            self._parser = parser
            data, self._buf = buf, b""
        if isinstance(parser, V1Parser) and (parser.buffer + data).startswith(_V1_UNKNOWN):
            # The specification allows a bare "PROXY UNKNOWN"; Twisted's parser wants more.
            data = parser.buffer + data
            self.info = ProxyInfo(_V1_UNKNOWN[:-2], None, None)
            return data[len(_V1_UNKNOWN) :]
        info, rest = parser.feed(data)
        if info is None:
            return None
        self.info = ProxyInfo(info.header, _canonical(info.source), _canonical(info.destination))
        return rest or b""

    def _too_slow(self) -> None:
        self._timer = None
        self._refuse("no complete PROXY protocol header within the deadline")

    def _refuse(self, why: str) -> None:
        self._cancel()
        self._timer = None
        assert self.transport is not None
        self.log.debug(
            "{listener}: {peer}: {why}",
            listener=self.proxied.name,
            peer=self.transport.getPeer(),
            why=why,
        )
        self.proxied.on_refused()
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel()
        self._timer = None
        if self._started:
            super().connectionLost(reason)  # type: ignore[no-untyped-call]
        else:
            self.factory.unregisterProtocol(self)

    def getPeer(self) -> IAddress:
        if self.info is not None and self.info.source is not None:
            return self.info.source
        assert self.transport is not None
        peer: IAddress = self.transport.getPeer()
        return peer

    def getHost(self) -> IAddress:
        if self.info is not None and self.info.destination is not None:
            return self.info.destination
        assert self.transport is not None
        host: IAddress = self.transport.getHost()
        return host


class ProxiedFactory(WrappingFactory[ProxiedProtocol]):
    """Wraps a listener's factory: its connections start after their PROXY header."""

    protocol = ProxiedProtocol
    noisy = False

    def __init__(
        self,
        wrapped: Any,
        clock: IReactorTime,
        *,
        name: str = "",
        timeout: float = HEADER_TIMEOUT,
        on_refused: Any = None,
    ) -> None:
        super().__init__(wrapped)  # type: ignore[no-untyped-call]
        self.clock = clock
        self.name = name
        self.timeout = timeout
        self.refused = 0
        self._on_refused = on_refused

    def on_refused(self) -> None:
        self.refused += 1
        if self._on_refused is not None:
            self._on_refused()

    def logPrefix(self) -> str:
        return f"{self.name} (PROXY)"
