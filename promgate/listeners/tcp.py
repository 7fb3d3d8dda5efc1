"""TCP forwarding (``protocol: tcp``): layer-4 tunnels through the same identity, policy,
limit, audit and metrics pipeline as ``/scrape``.

A listener sends each connection to one route's target, chosen by the listener (``route``)
or by the server name (SNI) the client asked for (``sni``). In ``terminate`` mode the
gateway terminates mutual TLS, recognises the caller from its certificate and relays the
plaintext (re-encrypted when the route's scheme is ``https``); in ``passthrough`` mode it
reads the server name from the ClientHello and relays the client's TLS untouched, so there
is no identity and only the route's ``sni:`` allow entries can admit the connection.

The pieces, thin protocols over plain objects:

- ``ConnectionPolicy`` (promgate.policy): the whole per-connection decision (destination,
  recognition, ``allow``) as a pure function of the configuration.
- ``TCPGateway``: one per listener; decides, admits past the route's limits, writes the one
  audit record per connection and keeps the metrics.
- ``TCPDownstream``: one client connection; once admitted, it owns the ``Relay``
  (promgate.net.relay) that moves its bytes to and from the upstream.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from promgate.addresses import ip_endpoint, peer_address
from promgate.audit import IAuditSink
from promgate.config.model import Config, Listener, Route, Target
from promgate.core.admission import Admitter, Ticket
from promgate.core.context import NO_TLS, ConnectionInfo, Outcome, Verdict
from promgate.core.reasons import Reason
from promgate.core.recording import Recorder
from promgate.drain import OpenSet
from promgate.identity import IdentityResolver, Recognition
from promgate.metrics import Metrics
from promgate.net.connector import no_delay
from promgate.net.handshake import classify_handshake_failure, tls_info
from promgate.net.proxyproto import (
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_PROMGATE_IDENTITY,
    encode_v2,
    ssl_tlv,
    tlv,
)
from promgate.net.relay import Relay, Side
from promgate.net.relay_upstream import IUpstreamConnector, UpstreamConnection
from promgate.net.sni import (
    NEED_MORE,
    ClientHello,
    ClientHelloError,
    normalise_server_name,
    read_client_hello,
)
from promgate.policy import ConnectionPolicy
from promgate.ratelimit import Admission, IRateLimiter, SharedAdmission
from promgate.tls import PeerCertificate, verify_reason

__all__ = ["TCPDownstream", "TCPGateway", "TCPGatewayFactory"]


# -- the protocols -----------------------------------------------------------------------------


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class TCPDownstream(Protocol):
    """One client connection to a ``tcp`` listener, and the owner of its relay."""

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
        self.side: Side | None = None
        #: Once admitted: the relay, its route and target, and the route's ticket.
        self.relay: Relay | None = None
        self.route: Route | None = None
        self.target: Target | None = None
        self.ticket: Ticket | None = None
        #: While the shared limits decide its admission: the route and target asked for.
        self.admitting: tuple[Route, Target] | None = None
        self.decided = False
        self._buf = b""
        #: The client half-closed while its admission was being decided.
        self._closed_write = False
        self._timer: IDelayedCall | None = None
        self._verify_error: tuple[str, PeerCertificate | None] | None = None
        self._timed_out = False
        self._shutdown = False

    # -- Twisted callbacks ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        gw = self.gw
        assert self.transport is not None
        self.start = gw.clock.seconds()
        self.peer = peer_address(self.transport.getPeer())
        self.peer_address = ip_endpoint(self.transport.getPeer())
        self.local_address = ip_endpoint(self.transport.getHost())
        self.side = Side(self.transport, secure=self.secure)
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
        relay = self.relay
        if relay is not None:
            relay.client_data(data)
        elif not self.decided:
            self._buf += data
            self._read_client_hello(complete=False)
        elif self.admitting is not None:
            self._buf += data  # for the upstream, once admitted (reading is paused)

    def readConnectionLost(self) -> None:
        assert self.side is not None
        self.side.gate.eof = True
        if self.relay is not None:
            self.relay.client_closed_write()
        elif not self.decided:
            self._read_client_hello(complete=True)
        elif self.admitting is not None:
            self._closed_write = True  # passed on once the relay is there

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.side is not None:
            self.side.lost = True
        self._cancel_timer()
        self.gw.open_connections.dec()
        if self.relay is not None:
            self.relay.client_lost(reason)
            return
        self.gw.open.discard(self)
        if self.admitting is not None:
            # Audited now; what the admission grants is given back when it comes.
            (route, target), self.admitting = self.admitting, None
            why = Reason.GATEWAY_SHUTDOWN if self._shutdown else Reason.CLIENT_ABORTED
            detail = "connection lost while the route's shared limits were asked"
            self.gw.record(self, route, target, "deny", why, None, detail)
            return
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
        if self.relay is not None:
            self.relay.shut_down()
        else:
            self.abort()

    def abort(self) -> None:
        if self.side is not None:
            self.side.abort()

    # -- the relay's owner ---------------------------------------------------------------------

    def begin_admission(self, route: Route, target: Target) -> None:
        """The shared limits decide: read nothing meanwhile (what still arrives is kept)."""
        assert self.side is not None
        self.admitting = (route, target)
        self.side.gate.pause("admission")

    def end_admission(self) -> bytes | None:
        """Decided: what arrived meanwhile; None if the connection was lost first."""
        if self.admitting is None:
            return None
        assert self.side is not None
        self.admitting = None
        self.side.gate.resume("admission")
        early, self._buf = self._buf, b""
        return early

    def open_relay(self, route: Route, target: Target, ticket: Ticket, initial: bytes) -> None:
        """Admitted: relay this connection to ``target``."""
        gw = self.gw
        assert self.side is not None
        self.route, self.target, self.ticket = route, target, ticket
        self.relay = Relay(
            self,
            self.side,
            clock=gw.clock,
            connect_timeout=gw.deadlines.upstream_connect,
            idle=gw.deadlines.tunnel_idle,
            counters=(
                gw.metrics.bytes.labels(route.name, "in"),
                gw.metrics.bytes.labels(route.name, "out"),
            ),
        )
        self.relay.start(initial)
        if self._closed_write:
            self.relay.client_closed_write()

    def connect(self, relay: Relay) -> Deferred[UpstreamConnection]:
        gw = self.gw
        assert self.route is not None and self.target is not None
        tls = not gw.passthrough and self.route.scheme == "https"
        gw.metrics.upstream_connections.labels(self.route.name).inc()
        return gw.connector.connect(self.route, self.target, gw.proxy_header(self), tls)

    def opened(self, relay: Relay) -> None:
        assert self.route is not None
        self.gw.metrics.tcp_tunnels_open.labels(self.gw.name, self.route.name).inc()

    def connect_failed(self, relay: Relay, reason: str, detail: str) -> None:
        assert self.route is not None
        self.gw.metrics.upstream_errors.labels(self.route.name, reason).inc()
        self.abort()

    def finished(self, relay: Relay) -> None:
        assert self.route is not None and self.ticket is not None
        if relay.opened:
            self.gw.metrics.tcp_tunnels_open.labels(self.gw.name, self.route.name).dec()
        self.ticket.release()
        self.gw.tunnel_finished(self, relay)

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
        shared: SharedAdmission | None = None,
    ) -> None:
        if listener.tcp is None:
            raise ValueError(f"listener {listener.name!r} has no tcp settings")
        self.listener = listener
        self.name = listener.name
        self.settings = listener.tcp
        self.passthrough = self.settings.mode == "passthrough"
        self.deadlines = listener.deadlines
        self.clock = clock
        self._limiter = limiter
        self._audit = audit
        self._shared = shared
        self.admitter = Admitter(limiter, audit, metrics, config.audit.on_failure == "deny", shared)
        self.recorder = Recorder(listener.name, audit, metrics)
        self.metrics = metrics
        self.connector = connector
        self.policy = ConnectionPolicy(self.settings, config.routes_of(listener.name))
        self.resolver = IdentityResolver(config.identities)
        self.connections = metrics.connections.labels(listener.name)
        self.open_connections = metrics.open_connections.labels(listener.name)
        #: Client connections not yet audited (a tunnel's stays until both sides are gone).
        self.open: OpenSet[TCPDownstream] = OpenSet(clock)

    def reconfigure(self, listener: Listener, config: Config) -> int:
        """A reload: the same listener under a new configuration. New connections are
        decided by it; open relays it no longer allows (another destination, or a caller or
        server name no longer admitted) are cut and audited ``policy_revoked``. Returns
        how many were cut."""
        if listener.tcp is None:
            raise ValueError(f"listener {listener.name!r} has no tcp settings")
        self.listener = listener
        self.settings = listener.tcp
        self.passthrough = self.settings.mode == "passthrough"
        self.deadlines = listener.deadlines
        self.admitter = Admitter(
            self._limiter,
            self._audit,
            self.metrics,
            config.audit.on_failure == "deny",
            self._shared,
        )
        self.policy = ConnectionPolicy(self.settings, config.routes_of(listener.name))
        self.resolver = IdentityResolver(config.identities)
        revoked = 0
        for conn in list(self.open):
            relay = conn.relay
            if relay is None or conn.route is None or conn.target is None:
                continue
            recognition = None
            if not self.passthrough:
                recognition = conn.recognition = self.resolver.for_certificate(conn.tls_info.peer)
            decision = self.policy.decide(recognition, conn.server_name)
            same = (
                decision.route is not None
                and decision.route.name == conn.route.name
                and decision.target is not None
                and decision.target.address == conn.target.address
            )
            if not decision.allowed or not same:
                why = decision.rule if not decision.allowed else "the destination changed"
                relay.revoke(f"reload: {why}")
                revoked += 1
        return revoked

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
        if isinstance(admitted, Ticket):
            conn.open_relay(route, target, admitted, initial)
        elif isinstance(admitted, Deferred):  # the shared limits answer later
            conn.begin_admission(route, target)
            admitted.addCallback(self._admitted, conn, route, target, initial).addErrback(
                self._admission_failed, conn
            )
        else:
            self.refuse(conn, admitted.reason, route, target)

    def _admitted(
        self,
        admitted: Ticket | Admission,
        conn: TCPDownstream,
        route: Route,
        target: Target,
        initial: bytes,
    ) -> None:
        early = conn.end_admission()
        if early is None:  # lost meanwhile, and audited then
            if isinstance(admitted, Ticket):
                admitted.release()
        elif isinstance(admitted, Ticket):
            conn.open_relay(route, target, admitted, initial + early)
        else:
            self.refuse(conn, admitted.reason, route, target)

    def _admission_failed(self, failure: Failure, conn: TCPDownstream) -> None:
        """Not expected (the shared limits always answer): logged, the connection cut
        (and audited as lost while its admission was pending)."""
        self.log.failure("admission", failure)
        conn.abort()

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
        self.record(conn, route, target, "deny", reason, None, detail)

    def tunnel_finished(self, conn: TCPDownstream, relay: Relay) -> None:
        self.open.discard(conn)
        self.record(
            conn,
            conn.route,
            conn.target,
            "allow",
            relay.ended or Reason.CLIENT_CLOSED,
            relay,
            relay.detail,
        )

    def record(
        self,
        conn: TCPDownstream,
        route: Route | None,
        target: Target | None,
        decision: Verdict,
        reason: str,
        relay: Relay | None,
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
            bytes_in=relay.bytes_in if relay is not None else 0,
            bytes_out=relay.bytes_out if relay is not None else 0,
            detail=detail,
        )
        self.recorder.connection(
            ConnectionInfo(self.name, conn.peer, conn.tls_info),
            identity.name if identity is not None else None,
            outcome,
            duration=self.clock.seconds() - conn.start,
            server_name=conn.server_name,
            relayed=relay is not None,
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
