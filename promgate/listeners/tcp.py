"""TCP forwarding (``protocol: tcp``): layer-4 tunnels through the same identity, policy,
limit, audit and metrics pipeline as ``/scrape``.

A listener sends each connection to one route's target, chosen by the listener (``route``)
or by the server name (SNI) the client asked for (``sni``). In ``terminate`` mode the
gateway terminates mutual TLS, recognises the caller from its certificate and relays the
plaintext (re-encrypted when the route's scheme is ``https``); in ``passthrough`` mode it
reads the server name from the ClientHello and relays the client's TLS untouched, so there
is no identity and only the route's ``sni:`` allow entries can admit the connection.

The pieces, thin protocols over plain objects:

- ``ConnectionPolicy``: the whole per-connection decision (destination, recognition,
  ``allow``) as a pure function of the configuration.
- ``TCPGateway``: one per listener; decides, applies the route's limits, writes the one
  audit record per connection and keeps the metrics.
- ``Tunnel``: relays one admitted connection, byte for byte, with back-pressure both ways,
  half-close propagation, an idle deadline and the bookkeeping of how it ended.
- ``TCPDownstream``, ``TCPUpstream``, ``TLSUpstream``: translate Twisted callbacks into
  calls on those.

Half-close: a plain TCP side (a passthrough client, a plain upstream) propagates a FIN as a
FIN. A TLS side closes its write direction with close_notify and keeps reading; but
Twisted's TLS layer ends the whole connection when it *receives* a close_notify (it
answers with its own and closes), so a TLS peer's close cannot be relayed as a half-close:
the other side is then closed once what was already written to it has been sent.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectingCancelledError, ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from promgate.addresses import peer_address
from promgate.audit import IAuditSink
from promgate.config.model import Config, Listener, Route, Target
from promgate.core.admission import Admitter, Ticket
from promgate.core.context import NO_TLS, ConnectionInfo, Outcome, Verdict
from promgate.core.reasons import Reason
from promgate.core.recording import Recorder
from promgate.drain import OpenSet
from promgate.identity import IdentityResolver, Recognition
from promgate.metrics import Metrics
from promgate.net.connector import connect_failure, endpoint_for, no_delay
from promgate.net.handshake import classify_handshake_failure, tls_info
from promgate.net.proxyproto import (
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_PROMGATE_IDENTITY,
    encode_v2,
    ssl_tlv,
    tlv,
)
from promgate.net.sni import (
    NEED_MORE,
    ClientHello,
    ClientHelloError,
    normalise_server_name,
    read_client_hello,
)
from promgate.policy import ConnectionPolicy
from promgate.ratelimit import IRateLimiter
from promgate.reactors import IConnectReactor
from promgate.tls import (
    PeerCertificate,
    UpstreamTLSError,
    client_options,
    verify_reason,
)

__all__ = [
    "CLOSE_LINGER",
    "EndpointConnector",
    "IUpstreamConnector",
    "TCPDownstream",
    "TCPGateway",
    "TCPGatewayFactory",
    "TCPUpstream",
    "TLSUpstream",
    "Tunnel",
    "UpstreamConnection",
]

#: Once one side of a tunnel is gone, how long the other may take to finish closing.
CLOSE_LINGER = 10.0
#: Client bytes held while the upstream connection is being made (reading is paused then,
#: so this is only ever reached by a transport that ignores the pause).
MAX_PENDING = 256 * 1024


# -- connecting upstream -----------------------------------------------------------------------


class IUpstreamConnector(Interface):
    """Opens the upstream side of a tunnel."""

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


# -- flow control ------------------------------------------------------------------------------


class _ReadGate:
    """Pauses reading from one transport while any reason to pause holds.

    Once the transport has read its end (``eof``), it is left alone: resuming a half-closed
    TCP transport would have it read the end, and report it, again.
    """

    __slots__ = ("_reasons", "_transport", "eof")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._reasons: set[str] = set()
        self.eof = False

    def pause(self, reason: str) -> None:
        if not self._reasons and not self.eof:
            self._transport.pauseProducing()
        self._reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._reasons:
            self._reasons.discard(reason)
            if not self._reasons and not self.eof:
                self._transport.resumeProducing()


@implementer(IPushProducer)
class _PeerProducer:
    """Registered with one side's transport: when its write buffer fills, stop reading the
    other side; when it drains, go on. Closing is the tunnel's business, not the producer's."""

    __slots__ = ("_gate",)

    def __init__(self, gate: _ReadGate) -> None:
        self._gate = gate

    def pauseProducing(self) -> None:
        self._gate.pause("peer")

    def resumeProducing(self) -> None:
        self._gate.resume("peer")

    def stopProducing(self) -> None:
        pass


class _Side(Protocol):
    """What a tunnel does to either of its connections."""

    secure = False  # TLS on this connection: close_notify instead of a FIN
    gate: _ReadGate
    _producing = False
    _lost = False

    def write(self, data: bytes) -> None:
        if not self._lost:
            assert self.transport is not None
            self.transport.write(data)

    def feed_from(self, other: _Side) -> None:
        """Back-pressure: this side's full write buffer pauses reading from ``other``."""
        assert self.transport is not None
        self.transport.registerProducer(_PeerProducer(other.gate), True)  # type: ignore[attr-defined]
        self._producing = True

    def _unregister(self) -> None:
        if self._producing and self.transport is not None:
            self._producing = False
            self.transport.unregisterProducer()  # type: ignore[attr-defined]

    def shutdown_write(self) -> None:
        """No more data for this side: a FIN, or over TLS a close_notify; reading goes on.

        The producer goes first: neither TCP's half-close nor TLS's close happens while
        one is registered.
        """
        if self._lost or self.transport is None:
            return
        self._unregister()
        if self.secure:
            self.transport.loseConnection()
        else:
            self.transport.loseWriteConnection()  # type: ignore[attr-defined]

    def close(self) -> None:
        """Close once what was written has been sent."""
        if self._lost or self.transport is None:
            return
        self._unregister()
        self.gate.resume("peer")
        self.transport.loseConnection()

    def abort(self) -> None:
        if not self._lost and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


# -- the relay ---------------------------------------------------------------------------------


class Tunnel:
    """One admitted connection relayed to its upstream, and how it ended."""

    log = Logger()

    def __init__(
        self, gw: TCPGateway, conn: TCPDownstream, route: Route, target: Target, ticket: Ticket
    ) -> None:
        self.gw = gw
        self.conn = conn
        self.route = route
        self.target = target
        self.ticket = ticket
        self.upstream: UpstreamConnection | None = None
        self.connecting: Deferred[UpstreamConnection] | None = None
        self._connect_timer: IDelayedCall | None = None
        self._timer: IDelayedCall | None = None
        self._timer_kind = ""
        self._pending: list[bytes] = []
        self._pending_size = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.client_eof = False
        self.upstream_eof = False
        self.client_gone = False
        self.upstream_gone = False
        self.ended: str | None = None
        self.detail: str | None = None
        self.done = False
        self._timed_out = False
        self._last = gw.clock.seconds()
        self._bytes_in = gw.metrics.bytes.labels(route.name, "in")
        self._bytes_out = gw.metrics.bytes.labels(route.name, "out")
        self._open = gw.metrics.tcp_tunnels_open.labels(gw.name, route.name)

    def _end(self, reason: str, detail: str | None = None) -> None:
        """Note the first cause of the end; later ones are consequences."""
        if self.ended is None:
            self.ended = reason
            self.detail = detail

    # -- opening -------------------------------------------------------------------------------

    def start(self, initial: bytes) -> None:
        gw = self.gw
        self.conn.gate.pause("connect")
        if initial:
            self.client_data(initial)
        header = gw.proxy_header(self.conn)
        tls = not gw.passthrough and self.route.scheme == "https"
        self._connect_timer = gw.clock.callLater(
            gw.deadlines.upstream_connect, self._connect_timed_out
        )
        gw.metrics.upstream_connections.labels(self.route.name).inc()
        d = gw.connector.connect(self.route, self.target, header, tls)
        self.connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    def _connect_timed_out(self) -> None:
        self._connect_timer = None
        self._timed_out = True
        if self.connecting is not None:
            self.connecting.cancel()

    def _cancel_connect_timer(self) -> None:
        timer, self._connect_timer = self._connect_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _connected(self, upstream: UpstreamConnection) -> None:
        self.connecting = None
        self._cancel_connect_timer()
        if self.client_gone or self.done:
            upstream.abort()
            return
        self.upstream = upstream
        self._open.inc()
        upstream.attach(self)
        if self._pending:
            pending, self._pending, self._pending_size = self._pending, [], 0
            upstream.write(b"".join(pending))
        upstream.feed_from(self.conn)
        self.conn.feed_from(upstream)
        if self.client_eof:
            upstream.shutdown_write()
        self.conn.gate.resume("connect")
        self._arm("idle", self.gw.deadlines.tunnel_idle)
        upstream.deliver_early()

    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        self._cancel_connect_timer()
        if self.client_gone:
            self._maybe_finish()
            return
        reason: str
        if self._timed_out:
            reason, detail = Reason.UPSTREAM_TIMEOUT, "upstream connect timed out"
        elif failure.check(CancelledError, ConnectingCancelledError):
            reason, detail = Reason.GATEWAY_SHUTDOWN, "connect cancelled"
        else:
            reason, detail = connect_failure(failure)
        self.gw.metrics.upstream_errors.labels(self.route.name, reason).inc()
        self._end(reason, detail)
        self.conn.abort()

    # -- relaying ------------------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        n = len(data)
        self.bytes_in += n
        self._bytes_in.inc(n)
        self._last = self.gw.clock.seconds()
        upstream = self.upstream
        if upstream is not None:
            upstream.write(data)
            return
        self._pending.append(data)
        self._pending_size += n
        if self._pending_size > MAX_PENDING:
            self._end(
                "client_buffer_overflow", "client sent too much before the upstream connected"
            )
            self.conn.abort()

    def upstream_data(self, data: bytes) -> None:
        n = len(data)
        self.bytes_out += n
        self._bytes_out.inc(n)
        self._last = self.gw.clock.seconds()
        self.conn.write(data)

    # -- closing -------------------------------------------------------------------------------

    def client_closed_write(self) -> None:
        """The client half-closed (a FIN on a plain connection): pass it on."""
        if self.client_eof:
            return
        self.client_eof = True
        self._end("client_closed")
        if self.upstream is not None and not self.upstream_gone:
            self.upstream.shutdown_write()
        self._both_closed()

    def upstream_closed_write(self) -> None:
        """The upstream half-closed: pass it on (over TLS as a close_notify)."""
        if self.upstream_eof:
            return
        self.upstream_eof = True
        self._end("upstream_closed")
        if not self.client_gone:
            self.conn.shutdown_write()
        self._both_closed()

    def _both_closed(self) -> None:
        if self.client_eof and self.upstream_eof:
            self.conn.close()
            if self.upstream is not None:
                self.upstream.close()
            self._arm("linger", CLOSE_LINGER)

    def client_lost(self, reason: Failure) -> None:
        self.client_gone = True
        clean = reason.check(ConnectionDone) is not None
        self._end("client_closed" if clean else "client_aborted")
        if self.connecting is not None:
            self.connecting.cancel()
        elif self.upstream is not None and not self.upstream_gone:
            # Over TLS an end without close_notify looks like a reset, and is common
            # (clients that just close the socket): what was relayed is still delivered.
            if clean or self.client_eof or self.conn.secure:
                self.upstream.close()
            else:
                self.upstream.abort()
            self._arm("linger", CLOSE_LINGER)
        self._maybe_finish()

    def upstream_lost(self, reason: Failure) -> None:
        self.upstream_gone = True
        if reason.check(ConnectionDone) is not None:
            self._end("upstream_closed")
        elif reason.check(SSL.Error, VerificationError):
            self._end("upstream_tls_failed", reason.getErrorMessage())
        else:
            self._end("upstream_reset", reason.getErrorMessage())
        if not self.client_gone:
            self.conn.close()
            self._arm("linger", CLOSE_LINGER)
        self._maybe_finish()

    def shut_down(self) -> None:
        """The gateway is stopping: cut both sides now."""
        self._end("gateway_shutdown")
        self._abort_both()

    def _abort_both(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
        if self.upstream is not None:
            self.upstream.abort()
        self.conn.abort()

    def _maybe_finish(self) -> None:
        if self.done or not self.client_gone or self.connecting is not None:
            return
        if self.upstream is not None and not self.upstream_gone:
            return
        self.done = True
        self._cancel_connect_timer()
        self._cancel_timer()
        if self.upstream is not None:
            self._open.dec()
        self.ticket.release()
        self.gw.tunnel_finished(self)

    # -- deadlines -----------------------------------------------------------------------------

    def _arm(self, kind: str, seconds: float) -> None:
        if self.done or (kind == "idle" and self._timer_kind == "linger"):
            return
        self._cancel_timer()
        self._timer_kind = kind
        self._timer = self.gw.clock.callLater(seconds, self._expired)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        self._timer_kind = ""
        if timer is not None and timer.active():
            timer.cancel()

    def _expired(self) -> None:
        self._timer = None
        kind, self._timer_kind = self._timer_kind, ""
        if kind == "idle":
            idle = self.gw.deadlines.tunnel_idle
            quiet = self.gw.clock.seconds() - self._last
            if quiet < idle:
                self._arm("idle", idle - quiet)
                return
            self._end("idle_timeout", f"nothing relayed for {idle:g}s")
        self._abort_both()


# -- the protocols -----------------------------------------------------------------------------


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class TCPDownstream(_Side):
    """One client connection to a ``tcp`` listener."""

    log = Logger()

    def __init__(self, gw: TCPGateway) -> None:
        self.gw = gw
        self.secure = not gw.passthrough
        self.peer = ""
        self.peer_address: tuple[str, int] | None = None
        self.local_address: tuple[str, int] | None = None
        self.start = 0.0
        self.tls_info = NO_TLS
        self.recognition: Recognition | None = None
        self.server_name: str | None = None
        self.tunnel: Tunnel | None = None
        self.decided = False
        self._buf = b""
        self._timer: IDelayedCall | None = None
        self._verify_error: tuple[str, PeerCertificate | None] | None = None
        self._timed_out = False
        self._shutdown = False

    # -- Twisted callbacks ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        gw = self.gw
        assert self.transport is not None
        self.start = gw.clock.seconds()
        self.peer, self.peer_address = _address(self.transport.getPeer())
        _, self.local_address = _address(self.transport.getHost())
        self.gate = _ReadGate(self.transport)
        gw.connections.inc()
        gw.open_connections.inc()
        gw.open.add(self)
        no_delay(self.transport)
        # TLS handshake (terminate) or ClientHello (passthrough): the same deadline.
        self._timer = gw.clock.callLater(gw.deadlines.tls_handshake, self._expired)

    def handshakeCompleted(self) -> None:
        assert self.transport is not None
        self._cancel_timer()
        self.tls_info = tls_info(self.transport)
        handle: SSL.Connection = self.transport.getHandle()  # type: ignore[attr-defined]
        name = handle.get_servername()
        if name:
            self.server_name = normalise_server_name(name.decode("ascii", "replace"))
        recognition = self.recognition = self.gw.resolver.for_certificate(self.tls_info.peer)
        self.decided = True
        self.gw.connection_ready(self, recognition, b"")

    def tls_verify_error(self, errno: int, depth: int, cert: x509.Certificate) -> None:
        """Called by the TLS layer for each certificate that fails verification."""
        if self._verify_error is None:
            self._verify_error = (verify_reason(errno), PeerCertificate.from_x509(cert))

    def dataReceived(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.client_data(data)
        elif not self.decided:
            self._buf += data
            self._read_client_hello(complete=False)

    def readConnectionLost(self) -> None:
        self.gate.eof = True
        if self.tunnel is not None:
            self.tunnel.client_closed_write()
        elif not self.decided:
            self._read_client_hello(complete=True)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._cancel_timer()
        self.gw.open_connections.dec()
        if self.tunnel is not None:
            self.tunnel.client_lost(reason)
            return
        self.gw.open.discard(self)
        if self.decided:
            return
        self.decided = True
        if self.secure:
            self._report_handshake_failure(reason)
        elif self._shutdown:
            self.gw.refuse(self, "gateway_shutdown", detail="the gateway stopped first")
        elif self._timed_out:
            self.gw.refuse(self, "client_hello_timeout", detail="no ClientHello in time")
        elif not self._buf:
            self.gw.refuse(self, "closed_before_client_hello", detail=reason.getErrorMessage())
        else:
            self._read_client_hello(complete=True)

    # -- used by the gateway -------------------------------------------------------------------

    def shut_down(self) -> None:
        """The gateway is stopping: cut this connection, auditing what it interrupts."""
        self._shutdown = True
        if self.tunnel is not None:
            self.tunnel.shut_down()
        else:
            self.abort()

    # -- internals -----------------------------------------------------------------------------

    def _read_client_hello(self, *, complete: bool) -> None:
        try:
            hello = read_client_hello(self._buf, complete=complete)
        except ClientHelloError as e:
            self._cancel_timer()
            self.decided = True
            self._buf = b""
            self.gw.refuse(self, e.reason, detail=e.detail)
            return
        if hello is NEED_MORE:
            return
        assert isinstance(hello, ClientHello)
        self._cancel_timer()
        self.decided = True
        self.server_name = hello.server_name
        data, self._buf = self._buf, b""
        self.gw.connection_ready(self, None, data)

    def _expired(self) -> None:
        self._timer = None
        self._timed_out = True
        if self.secure:
            self.abort()
        else:
            self.decided = True
            self.gw.refuse(self, "client_hello_timeout", detail="no ClientHello in time")

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _report_handshake_failure(self, reason: Failure) -> None:
        self.gw.handshake_failed(
            self,
            *classify_handshake_failure(
                reason,
                shutdown=self._shutdown,
                timed_out=self._timed_out,
                verify_error=self._verify_error,
            ),
        )


class UpstreamConnection(_Side):
    """The upstream connection of a tunnel: TCPUpstream or TLSUpstream.

    ``ready`` fires with the protocol once it can carry data: after the PROXY header is
    written and, for TLS, after the handshake (the upstream verified). Anything the upstream
    sends before the tunnel attaches is held and delivered then.
    """

    def __init__(
        self, header: bytes = b"", tls: IOpenSSLClientConnectionCreator | None = None
    ) -> None:
        self._header = header
        self._tls = tls
        self.secure = tls is not None
        self.ready: Deferred[UpstreamConnection] = Deferred(self._cancel)
        self.tunnel: Tunnel | None = None
        self._early: list[bytes] = []
        self._early_eof = False
        self._early_lost: Failure | None = None

    def _cancel(self, d: Deferred[UpstreamConnection]) -> None:
        self.abort()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.gate = _ReadGate(self.transport)
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

    def attach(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def deliver_early(self) -> None:
        """Hand the tunnel what arrived before it attached (a server that speaks first)."""
        tunnel = self.tunnel
        assert tunnel is not None
        early, self._early = self._early, []
        for data in early:
            tunnel.upstream_data(data)
        if self._early_eof:
            tunnel.upstream_closed_write()
        if self._early_lost is not None:
            tunnel.upstream_lost(self._early_lost)

    def dataReceived(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.upstream_data(data)
        else:
            self._early.append(data)

    def readConnectionLost(self) -> None:
        self.gate.eof = True
        if self.tunnel is not None:
            self.tunnel.upstream_closed_write()
        else:
            self._early_eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if not self.ready.called:
            self.ready.errback(reason)
        elif self.tunnel is not None:
            self.tunnel.upstream_lost(reason)
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
    close_notify or not, ends the whole connection (see the module docstring)."""


# -- one listener ------------------------------------------------------------------------------


class TCPGateway:
    """Routing, authorisation, limits, audit and metrics for one ``tcp`` listener."""

    log = Logger()

    def __init__(
        self,
        listener: Listener,
        config: Config,
        *,
        clock: IReactorTime,
        limiter: IRateLimiter,
        audit: IAuditSink,
        metrics: Metrics,
        connector: IUpstreamConnector,
    ) -> None:
        if listener.tcp is None:
            raise ValueError(f"listener {listener.name!r} has no tcp settings")
        self.listener = listener
        self.name = listener.name
        self.settings = listener.tcp
        self.passthrough = self.settings.mode == "passthrough"
        self.deadlines = listener.deadlines
        self.clock = clock
        self.admitter = Admitter(limiter, audit, metrics, config.audit.on_failure == "deny")
        self.recorder = Recorder(listener.name, audit, metrics)
        self.metrics = metrics
        self.connector = connector
        self.policy = ConnectionPolicy(self.settings, config.routes_of(listener.name))
        self.resolver = IdentityResolver(config.identities)
        self.connections = metrics.connections.labels(listener.name)
        self.open_connections = metrics.open_connections.labels(listener.name)
        #: Client connections not yet audited (a tunnel's stays until both sides are gone).
        self.open: OpenSet[TCPDownstream] = OpenSet(clock)

    def shut_down_connections(self) -> int:
        """Cut every open connection (at shutdown, after draining); how many there were."""
        for conn in list(self.open):
            conn.shut_down()
        return len(self.open)

    def abort_connections(self) -> None:
        """Nothing more to cut: shut_down_connections cut them all already."""

    # -- decisions -----------------------------------------------------------------------------

    def connection_ready(
        self, conn: TCPDownstream, recognition: Recognition | None, initial: bytes
    ) -> None:
        """The caller is known (terminate) or its ClientHello read (passthrough): decide,
        admit, and open the tunnel; or refuse and close at once."""
        decision = self.policy.decide(recognition, conn.server_name)
        route, target = decision.route, decision.target
        if not decision.allowed or route is None or target is None:
            self.refuse(conn, decision.reason, route, target, detail=decision.rule)
            return
        identity = recognition.identity if recognition is not None else None
        who = identity.name if identity is not None else ""
        admitted = self.admitter.admit(route.name, route.limits, who, target.address)
        if not isinstance(admitted, Ticket):
            self.refuse(conn, admitted.reason, route, target)
            return
        tunnel = conn.tunnel = Tunnel(self, conn, route, target, admitted)
        tunnel.start(initial)

    def refuse(
        self,
        conn: TCPDownstream,
        reason: str,
        route: Route | None = None,
        target: Target | None = None,
        *,
        detail: str | None = None,
    ) -> None:
        """Close at once and audit the refusal."""
        self.metrics.denied.labels(self.name, route.name if route else "", reason).inc()
        self.open.discard(conn)
        conn.abort()
        self.record(conn, route, target, "deny", reason, conn.tunnel, detail)

    def tunnel_finished(self, tunnel: Tunnel) -> None:
        self.open.discard(tunnel.conn)
        self.record(
            tunnel.conn,
            tunnel.route,
            tunnel.target,
            "allow",
            tunnel.ended or "client_closed",
            tunnel,
            tunnel.detail,
        )

    def record(
        self,
        conn: TCPDownstream,
        route: Route | None,
        target: Target | None,
        decision: Verdict,
        reason: str,
        tunnel: Tunnel | None,
        detail: str | None,
    ) -> None:
        """The one audit record of a connection, and its metrics."""
        recognition = conn.recognition
        identity = recognition.identity if recognition is not None else None
        outcome = Outcome(
            decision,
            reason,
            route=route.name if route is not None else None,
            target=target.address if target is not None else None,
            bytes_in=tunnel.bytes_in if tunnel is not None else 0,
            bytes_out=tunnel.bytes_out if tunnel is not None else 0,
            detail=detail,
        )
        self.recorder.connection(
            ConnectionInfo(self.name, conn.peer, conn.tls_info),
            identity.name if identity is not None else None,
            outcome,
            duration=self.clock.seconds() - conn.start,
            server_name=conn.server_name,
            relayed=tunnel is not None,
        )

    def handshake_failed(
        self, conn: TCPDownstream, reason: str, detail: str, cert: PeerCertificate | None
    ) -> None:
        self.recorder.tcp_handshake_failed(conn.peer, reason, detail, cert)

    # -- the PROXY header ----------------------------------------------------------------------

    def proxy_header(self, conn: TCPDownstream) -> bytes:
        """The PROXY v2 header for ``conn``'s upstream, or nothing (see proxyproto)."""
        if self.settings.proxy_protocol != "v2":
            return b""
        tlvs = []
        if conn.server_name:
            tlvs.append(tlv(PP2_TYPE_AUTHORITY, conn.server_name.encode("ascii", "replace")))
        peer = conn.tls_info.peer
        if not self.passthrough and peer is not None:
            tlvs.append(
                ssl_tlv(
                    version=conn.tls_info.version,
                    cipher=conn.tls_info.cipher,
                    cn=peer.cn[0] if peer.cn else None,
                )
            )
            identity = conn.recognition.identity if conn.recognition is not None else None
            if identity is not None:
                tlvs.append(tlv(PP2_TYPE_PROMGATE_IDENTITY, identity.name.encode("utf-8")))
        try:
            return encode_v2(conn.peer_address, conn.local_address, tlvs)
        except ValueError:  # an address ipaddress cannot pack: let the upstream use its own
            return encode_v2(None, None, tlvs)


class TCPGatewayFactory(Factory):
    """Builds a TCPDownstream per connection for one ``tcp`` listener."""

    noisy = False

    def __init__(self, gateway: TCPGateway) -> None:
        self.gateway = gateway

    def buildProtocol(self, addr: Any) -> TCPDownstream:
        return TCPDownstream(self.gateway)


def _address(addr: Any) -> tuple[str, tuple[str, int] | None]:
    """``ip:port`` for audit records, and (host, port) for a PROXY header (None if not IP)."""
    host = getattr(addr, "host", None)
    port = getattr(addr, "port", None)
    if not isinstance(host, str) or not isinstance(port, int):
        return peer_address(addr), None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return peer_address(addr), None
    return peer_address(addr), (host, port)
