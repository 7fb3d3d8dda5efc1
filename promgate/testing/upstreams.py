"""Upstreams in memory: the connections a gateway opens on a ``MemoryReactorClock`` are
answered by the test, never by a socket.

The gateway connects upstream through client endpoints, which end in ``connectTCP`` on
the reactor it was given. On a memory reactor those attempts wait in
``reactor.tcpClients``. :class:`PendingUpstreams` completes them one by one with a
``StringTransport`` (a protocol-level test feeds the upstream's bytes itself);
:class:`UpstreamNetwork` wires them over ``twisted.test.iosim`` to :class:`FakeUpstream`
servers registered per ``host:port``, and refuses the rest.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionRefusedError, TimeoutError
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IProtocol,
    IProtocolFactory,
    IResolutionReceiver,
)
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from promgate.addresses import address_parts, host_port
from promgate.testing.clients import Response

__all__ = [
    "FakeUpstream",
    "Handler",
    "PendingUpstreams",
    "UpstreamNetwork",
    "UpstreamRequest",
]

Handler = Callable[["UpstreamRequest"], Response]

_REASONS = {200: "OK", 404: "Not Found", 500: "Internal Server Error", 503: "Service Unavailable"}
_EXPOSITION = "text/plain; version=0.0.4; charset=utf-8"


def _key(host: str, port: int) -> str:
    return host_port(host, port)


def _take_attempt(reactor: MemoryReactorClock, index: int = 0) -> tuple[str, int, Any, Any, float]:
    """Remove one connection attempt (and its connector) from the memory reactor."""
    host, port, factory, timeout, _ = reactor.tcpClients.pop(index)
    connector = reactor.connectors.pop(index)
    return host, port, factory, connector, timeout


def _unwrapped(proto: Any) -> Any:
    """The protocol the gateway built, inside the endpoint's wrapper."""
    return getattr(proto, "_wrappedProtocol", proto)


class PendingUpstreams:
    """The upstream connections a gateway asked ``reactor`` for, completed by the test.

    Use it with the real ``UpstreamPool`` (or a tcp listener's connector) on a
    ``MemoryReactorClock``: ``accept()`` gives the oldest attempt a ``StringTransport`` and
    returns the protocol the gateway built, to which the test feeds the upstream's bytes.
    An attempt the gateway gives up (cancelling its connect, which stops the connector and
    fails the endpoint's Deferred with ``ConnectingCancelledError``) leaves ``pending`` for
    ``cancelled``.
    """

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.reactor = reactor
        self._cancelled: list[str] = []

    def _drop_cancelled(self) -> None:
        dropped = []
        for i in reversed(range(len(self.reactor.tcpClients))):
            if self.reactor.connectors[i].stoppedConnecting:
                host, port, *_ = _take_attempt(self.reactor, i)
                dropped.append(_key(host, port))
        self._cancelled.extend(reversed(dropped))

    @property
    def cancelled(self) -> list[str]:
        """``host:port`` of each attempt the gateway gave up before it was answered."""
        self._drop_cancelled()
        return list(self._cancelled)

    @property
    def pending(self) -> list[str]:
        """``host:port`` of each attempt not yet answered nor given up, oldest first."""
        self._drop_cancelled()
        return [_key(host, port) for host, port, *_ in self.reactor.tcpClients]

    def accept(self) -> tuple[Any, StringTransport]:
        """Connect the oldest attempt; returns the gateway's protocol and its transport."""
        self._drop_cancelled()
        host, port, factory, _, _ = _take_attempt(self.reactor)
        peer = IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)
        proto = factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer, lenient=True)
        proto.makeConnection(transport)
        return _unwrapped(proto), transport

    def fail(self, reason: BaseException | None = None) -> None:
        """Fail the oldest attempt (refused, unless ``reason`` says otherwise)."""
        self._drop_cancelled()
        host, port, factory, connector, _ = _take_attempt(self.reactor)
        error = reason if reason is not None else ConnectionRefusedError(_key(host, port))
        factory.clientConnectionFailed(connector, Failure(error))


@attrs.frozen
class UpstreamRequest:
    """One request a fake upstream received, as it arrived."""

    method: str
    target: str  # "/metrics?module=x"
    headers: tuple[tuple[str, str], ...]
    raw: bytes  # the head, byte for byte

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), or None."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


class FakeUpstream:
    """An upstream at one ``host:port``: what it answers, and what it was asked.

    By default an exporter: ``body`` at each of ``paths`` (200, the Prometheus text
    format), 404 elsewhere. ``handler`` answers each request instead; ``factory`` speaks
    any protocol (for ``tcp`` listeners). ``hold`` keeps every answer back until
    :meth:`release`. ``connect_error`` makes each connection attempt fail with it (a
    refusal, a timeout, a TLS verification error) instead of connecting; ``unreachable``
    leaves it hanging until the attempt's own timeout.
    """

    def __init__(
        self,
        address: str,
        *,
        body: bytes = b"",
        paths: Sequence[str] = ("/metrics",),
        handler: Handler | None = None,
        factory: IProtocolFactory | None = None,
        hold: bool = False,
        connect_error: BaseException | None = None,
        unreachable: bool = False,
        settle: Callable[[], None] = lambda: None,
    ) -> None:
        self.address = address
        self.body = body
        self.paths = tuple(paths)
        self.handler = handler
        self.factory = factory
        self.hold = hold
        self.connect_error = connect_error
        self.unreachable = unreachable
        self._settle = settle
        #: Every request received, in order.
        self.requests: list[UpstreamRequest] = []
        #: How many connections were accepted.
        self.connections = 0
        self._held: list[tuple[_ExporterProtocol, UpstreamRequest]] = []

    def answer(self, request: UpstreamRequest) -> Response:
        """The response to ``request``."""
        if self.handler is not None:
            return self.handler(request)
        if request.path in self.paths:
            return Response(200, {"Content-Type": _EXPOSITION}, self.body)
        return Response(404, {"Content-Type": "text/plain"}, b"not found\n")

    def release(self) -> None:
        """Send every held answer now, and stop holding later ones."""
        self.hold = False
        held, self._held = self._held, []
        for proto, request in held:
            proto.respond(request)
        self._settle()

    def build_protocol(self, peer: Any) -> IProtocol:
        self.connections += 1
        if self.factory is not None:
            proto = self.factory.buildProtocol(peer)
            assert proto is not None, f"{self.address}: the factory built no protocol"
            return proto
        return _ExporterProtocol(self)

    def _received(self, proto: _ExporterProtocol, request: UpstreamRequest) -> None:
        self.requests.append(request)
        if self.hold:
            self._held.append((proto, request))
        else:
            proto.respond(request)


class _ExporterProtocol(Protocol):
    """The server side of one connection to a FakeUpstream: HTTP/1.1, keep-alive."""

    def __init__(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = tuple(
                (name.strip(), value.strip())
                for name, _, value in (line.partition(":") for line in lines[1:])
            )
            request = UpstreamRequest(method, target, headers, head + b"\r\n\r\n")
            self.upstream._received(self, request)

    def respond(self, request: UpstreamRequest) -> None:
        if self.transport is None or self.transport.disconnecting:  # type: ignore[attr-defined]
            return
        response = self.upstream.answer(request)
        reason = _REASONS.get(response.status, "Status")
        lines = [f"HTTP/1.1 {response.status} {reason}"]
        lines.extend(f"{name}: {value}" for name, value in response.headers.items())
        if not any(name.lower() == "content-length" for name in response.headers):
            lines.append(f"Content-Length: {len(response.body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.transport.write(head + (b"" if request.method == "HEAD" else response.body))
        if (request.header("Connection") or "").lower() == "close":
            self.transport.loseConnection()


@implementer(IHostResolution)
@attrs.frozen
class _Resolution:
    name: str

    def cancel(self) -> None:
        """Nothing to cancel: resolution is immediate."""


@implementer(IHostnameResolver)
class _Resolver:
    """Names of registered upstreams resolve to addresses of their own (198.18.0.0/15,
    the benchmarking range); every other name resolves to nothing."""

    def __init__(self, network: UpstreamNetwork) -> None:
        self._network = network

    def resolveHostName(  # IHostnameResolver's names: callers pass them by keyword
        self,
        resolutionReceiver: IResolutionReceiver,  # noqa: N803
        hostName: str,  # noqa: N803
        portNumber: int = 0,  # noqa: N803
        addressTypes: Iterable[Any] | None = None,  # noqa: N803
        transportSemantics: str = "TCP",  # noqa: N803
    ) -> IHostResolution:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        stand_in = self._network.stand_in(hostName)
        if stand_in is not None:
            resolutionReceiver.addressResolved(IPv4Address("TCP", stand_in, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


class UpstreamNetwork:
    """Wires the upstream connections attempted on ``reactor`` to registered fakes.

    :meth:`connect_pending` takes every waiting attempt: one to a registered address is
    connected to its :class:`FakeUpstream` over an iosim pump (added to ``pumps``); one to
    any other address is refused, as by a host with nothing listening.
    """

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.reactor = reactor
        self.upstreams: dict[str, FakeUpstream] = {}
        self.pumps: list[iosim.IOPump] = []
        self._names: dict[str, str] = {}  # host name -> stand-in address
        self._hosts: dict[str, str] = {}  # stand-in address -> host name
        self._ports = itertools.count(50000)
        reactor.installNameResolver(_Resolver(self))

    def add(self, upstream: FakeUpstream) -> FakeUpstream:
        self.upstreams[upstream.address] = upstream
        host = address_parts(upstream.address)[0].strip("[]")
        if not _is_address(host) and host not in self._names:
            n = len(self._names) + 1
            stand_in = f"198.18.{n // 256}.{n % 256}"
            self._names[host], self._hosts[stand_in] = stand_in, host
        return upstream

    def stand_in(self, name: str) -> str | None:
        return self._names.get(name)

    def connect_pending(self) -> bool:
        """Answer every waiting attempt; whether there was any."""
        attempts = 0
        while self.reactor.tcpClients:
            attempts += 1
            host, port, factory, connector, timeout = _take_attempt(self.reactor)
            if connector.stoppedConnecting:
                continue
            address = _key(self._hosts.get(host, host), port)
            upstream = self.upstreams.get(address)
            if upstream is None:
                refused = ConnectionRefusedError(address)
                factory.clientConnectionFailed(connector, Failure(refused))
            elif upstream.connect_error is not None:
                factory.clientConnectionFailed(connector, Failure(upstream.connect_error))
            elif upstream.unreachable:
                self.reactor.callLater(timeout, self._time_out, factory, connector)
            else:
                self._connect(upstream, host, port, factory)
        return attempts > 0

    def _time_out(self, factory: Any, connector: Any) -> None:
        if not connector.stoppedConnecting:
            factory.clientConnectionFailed(connector, Failure(TimeoutError()))

    def _connect(self, upstream: FakeUpstream, host: str, port: int, factory: Any) -> None:
        peer = IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)
        here = IPv4Address("TCP", "127.0.0.1", next(self._ports))
        client = factory.buildProtocol(peer)
        if client is None:
            return
        server = upstream.build_protocol(here)
        pump = iosim.connect(
            server,
            iosim.FakeTransport(server, True, hostAddress=peer, peerAddress=here),
            client,
            iosim.FakeTransport(client, False, hostAddress=here, peerAddress=peer),
            greet=False,
            clock=self.reactor,
        )
        self.pumps.append(pump)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
