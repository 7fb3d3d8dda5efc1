"""The forward proxy (``protocol: forward``): what Prometheus's ``proxy_url`` talks to.

Two kinds of request, through the same identity, policy, rate limit, audit and metrics
pipeline as ``/scrape``:

- absolute-form ``GET http://HOST:PORT/PATH`` (plain targets): ``HOST:PORT`` must be a
  target of an ``http`` route the caller may use, the path (normalised once, strictly) one
  of that route's paths; the upstream then gets origin-form with ``Host: HOST:PORT``,
  through the same pooled relay (``Exchange``) as ``/scrape``.
- ``CONNECT HOST:PORT`` (TLS targets): ``HOST:PORT`` must be a target of an ``https``
  route the caller may use; then ``200 Connection established`` and a byte-exact tunnel
  with back-pressure both ways and an idle deadline, audited once, when it ends.

Target addresses are compared with the configured ``host:port`` strings (names in lower
case, IPv6 addresses compressed), never with what a name resolves to: the gateway connects
to the configured target it matched, so a name is resolved once, by the connect itself.
When several routes qualify, the first by name that allows the request is used.

``ForwardGateway`` extends the reverse gateway (same refusals, records and relay);
``ForwardProtocol`` is the reverse gateway's connection with one addition, handing the
byte stream to a ``Tunnel`` after a CONNECT; ``ForwardPolicy`` is the pure decision.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectingCancelledError, ConnectionDone, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from promgate.addresses import canonical_address
from promgate.authn import door_headers
from promgate.config.model import Config, Listener, Route, Target
from promgate.http.refusals import decision_status, refusal_body
from promgate.http.targets import AbsoluteForm, parse_absolute_form, parse_authority_form
from promgate.http.upstream import no_delay
from promgate.http.wire import HTTPError, RequestHead
from promgate.identity import Recognition
from promgate.listeners.scrape import DownstreamProtocol, ReverseGateway, connection_event
from promgate.policy import BAD_REQUEST, Decision, ForwardPolicy, parse_query

__all__ = [
    "AbsoluteForm",
    "ForwardGateway",
    "ForwardGatewayFactory",
    "ForwardProtocol",
    "Tunnel",
    "canonical_address",
    "parse_absolute_form",
    "parse_authority_form",
]

#: The answer that opens a tunnel.
CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
#: Bytes a client may send after its CONNECT head, before the tunnel is open, before the
#: gateway stops reading it.
MAX_EARLY_DATA = 64 * 1024
_METHODS = ((b"Allow", b"GET, HEAD, CONNECT"),)
#: The idle deadline is checked this close to its due time (clock rounding).
_IDLE_SLACK = 0.001


# -- the gateway ------------------------------------------------------------------------------


class ForwardGateway(ReverseGateway):
    """Routing, authorisation, limits and audit for one ``forward`` listener.

    ``reactor`` connects tunnels (``IReactorTCP``); everything else is the reverse
    gateway's, passed through unchanged.
    """

    log = Logger()

    def __init__(self, listener: Listener, config: Config, *, reactor: Any, **kw: Any) -> None:
        super().__init__(listener, config, **kw)
        self.reactor = reactor
        self.forward_policy = ForwardPolicy(
            config.routes_of(listener.name),
            challenge=self.authenticator.accepts_headers,
            membership=self.policy.membership,
        )
        self.tunnel_idle = listener.deadlines.tunnel_idle
        self.challenges = tuple(
            (b"Proxy-Authenticate", value) for _, value in self.authenticator.challenges
        )
        self.open_tunnels = self.metrics.open_tunnels.labels(listener.name)

    # -- entry point from DownstreamProtocol -------------------------------------------------

    def handle(self, conn: DownstreamProtocol, req: RequestHead) -> None:
        """Answer one complete request head: a CONNECT or an absolute-form GET/HEAD."""
        start = self.clock.seconds()
        if req.method == b"CONNECT":
            # Whatever the answer, a refused CONNECT closes its connection: the bytes the
            # client sent after the head were meant for the tunnel, never for this parser.
            req = attrs.evolve(req, keep_alive=False)
            try:
                address = parse_authority_form(req.target)
            except HTTPError as e:
                self.refuse(conn, req, start, e.status, e.reason, rule=e.message)
                return
            self.recognise(conn, req, start, lambda r: self.tunnel(conn, req, start, address, r))
        elif req.target[:1] == b"/" or req.target == b"*":
            self.refuse(
                conn,
                req,
                start,
                400,
                BAD_REQUEST,
                rule="origin-form request on a forward listener",
            )
        elif req.method != b"GET" and req.method != b"HEAD":
            self.refuse(
                conn,
                req,
                start,
                405,
                "method_not_allowed",
                extra=_METHODS,
            )
        else:
            try:
                form = parse_absolute_form(req.target)
            except HTTPError as e:
                self.refuse(conn, req, start, e.status, e.reason, rule=e.message)
                return
            self.recognise(conn, req, start, lambda r: self.forward(conn, req, start, form, r))

    def recognise(
        self,
        conn: DownstreamProtocol,
        req: RequestHead,
        start: float,
        then: Callable[[Recognition], None],
    ) -> None:
        """Who is asking: the connection's certificate, combined with ``Proxy-Authorization``
        (bearer or basic, checked exactly as ``Authorization`` is on ``http`` listeners).

        A bcrypt check runs in a thread; meanwhile the connection reads no further request.
        """
        header = req.headers.get(b"proxy-authorization")
        if header is None:
            then(conn.recognition)
            return
        result = self.authenticator.authenticate(conn.recognition, header, conn.peer)
        if not isinstance(result, Deferred):
            then(result)
            return
        conn.begin_authentication(req, start, result)

        def authenticated(recognition: Recognition) -> None:
            if conn.end_authentication():
                then(recognition)

        result.addCallback(authenticated).addErrback(
            lambda f: self.log.failure("serving after authentication", f)
        )

    # -- absolute-form GET / HEAD -----------------------------------------------------------------

    def forward(
        self,
        conn: DownstreamProtocol,
        req: RequestHead,
        start: float,
        form: AbsoluteForm,
        recognition: Recognition,
    ) -> None:
        params = parse_query(form.query)
        if isinstance(params, Decision):
            self.refuse_decision(conn, req, start, params, form.address, recognition)
            return
        decision = self.forward_policy.decide_request(recognition, form.address, form.path, params)
        route, target, identity = decision.route, decision.target, recognition.identity
        if not decision.allowed or route is None or target is None or identity is None:
            self.refuse_decision(conn, req, start, decision, form.address, recognition)
            return
        self.relay(conn, req, start, decision, route, target, identity, recognition)

    # -- CONNECT -------------------------------------------------------------------------------

    def tunnel(
        self,
        conn: DownstreamProtocol,
        req: RequestHead,
        start: float,
        address: str,
        recognition: Recognition,
    ) -> None:
        decision = self.forward_policy.decide_connect(recognition, address)
        route, target, identity = decision.route, decision.target, recognition.identity
        if not decision.allowed or route is None or target is None or identity is None:
            self.refuse_decision(conn, req, start, decision, address, recognition)
            return
        if not self.admit(conn, req, start, route, target, identity, recognition):
            return
        assert isinstance(conn, ForwardProtocol)
        Tunnel(self, conn, req, route, target, recognition, start).start()

    def connect_upstream(self, target: Target, factory: Factory) -> Deferred[Protocol]:
        """Connect to the configured ``target`` itself: an address directly, a name through
        one resolution (HostnameEndpoint), bounded by the upstream connect deadline."""
        timeout = self.deadlines.upstream_connect
        endpoint: Any
        try:
            address = ipaddress.ip_address(target.host)
        except ValueError:
            endpoint = HostnameEndpoint(self.reactor, target.host, target.port, timeout=timeout)
        else:
            kind = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
            endpoint = kind(self.reactor, target.host, target.port, timeout=timeout)
        d: Deferred[Protocol] = endpoint.connect(factory)
        return d

    # -- shared steps ----------------------------------------------------------------------------

    def refuse_decision(
        self,
        conn: DownstreamProtocol,
        req: RequestHead,
        start: float,
        decision: Decision,
        address: str,
        recognition: Recognition,
    ) -> None:
        status = decision_status(decision)
        self.refuse(
            conn,
            req,
            start,
            status,
            decision.reason,
            route=decision.route,
            target=address,
            extra=self.challenges if status == 407 else door_headers(recognition, ()),
            rule=decision.rule,
            recognition=recognition,
        )

    def record_tunnel(self, tunnel: Tunnel, reason: str) -> None:
        """Audit and count one tunnel, at its end: one record for its whole life."""
        now = self.clock.seconds()
        duration = now - tunnel.start_time
        route = tunnel.route
        counters = self.metrics.route(self.name, route.name)
        counters.answered(200)
        counters.bytes_in.inc(tunnel.bytes_in)
        counters.bytes_out.inc(tunnel.bytes_out)
        self.metrics.tunnel_duration.labels(self.name, route.name).observe(duration)
        conn = tunnel.conn
        self.audit.record(
            connection_event(
                "request",
                self.name,
                conn.peer,
                conn.tls_info,
                tunnel.recognition.identity,
                route=route.name,
                target=tunnel.target.address,
                method="CONNECT",
                decision="allow",
                reason=reason,
                status=200,
                bytes_in=tunnel.bytes_in,
                bytes_out=tunnel.bytes_out,
                duration=duration,
                detail=tunnel.detail,
            )
        )


# -- the tunnel --------------------------------------------------------------------------------


@implementer(IPushProducer)
class Tunnel:
    """One CONNECT tunnel: connect, ``200``, then bytes both ways until one side ends.

    As the producer registered with the upstream connection, it stops reading the client
    while the upstream cannot take more; the client connection, in turn, pauses reading the
    upstream while the client cannot take more (``client_full``). Bytes the client sent
    before the tunnel opened are held (up to MAX_EARLY_DATA, then reading stops) and go
    upstream first. ``bytes_in`` counts the CONNECT head and what the client sent through;
    ``bytes_out`` the ``200`` and what the upstream sent back.
    """

    log = Logger()

    def __init__(
        self,
        gw: ForwardGateway,
        conn: ForwardProtocol,
        req: RequestHead,
        route: Route,
        target: Target,
        recognition: Recognition,
        start: float,
    ) -> None:
        self.gw = gw
        self.conn = conn
        self.req = req
        self.route = route
        self.target = target
        self.recognition = recognition
        self.start_time = start
        self.bytes_in = req.size
        self.bytes_out = 0
        self.detail: str | None = None
        self.upstream: TunnelUpstream | None = None
        self.connecting: Deferred[Protocol] | None = None
        self.open = False
        self.done = False
        self._early: list[bytes] = []
        self._early_size = 0
        self._idle: IDelayedCall | None = None
        self._last = start
        self._reading_paused = False
        self._upstream_full = False
        self._client_full = False

    def start(self) -> None:
        early = self.conn.take_over(self)
        if early:
            self.client_data(early)
        d = self.gw.connect_upstream(self.target, _TunnelUpstreamFactory(self))
        self.connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    # -- connecting ----------------------------------------------------------------------------

    def _connected(self, upstream: Protocol) -> None:
        self.connecting = None
        assert isinstance(upstream, TunnelUpstream)
        transport: Any = upstream.transport
        if self.done:
            transport.abortConnection()
            return
        self.upstream = upstream
        self.open = True
        transport.registerProducer(self, True)
        if self._client_full:
            transport.pauseProducing()
        self.gw.open_tunnels.inc()
        self.bytes_out += len(CONNECT_OK)
        self.conn.send(CONNECT_OK)
        early, self._early, self._early_size = self._early, [], 0
        if early:
            self.bytes_in += sum(len(b) for b in early)
            transport.writeSequence(early)
        self._last = self.gw.clock.seconds()
        self._idle = self.gw.clock.callLater(self.gw.tunnel_idle, self._idle_check)
        self._update_reading()

    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        if self.done or failure.check(ConnectingCancelledError):
            return
        self.done = True
        if failure.check(TimeoutError):
            status, reason, detail = 504, "upstream_timeout", "upstream connect timed out"
        else:
            status, reason, detail = 502, "upstream_refused", failure.getErrorMessage()
        gw = self.gw
        gw.metrics.upstream_errors.labels(self.route.name, reason).inc()
        gw.log.info(
            "route {route} target {target}: {reason} ({detail})",
            route=self.route.name,
            target=self.target.address,
            reason=reason,
            detail=detail,
        )
        gw.limiter.release(self.route.name)
        gw.answer(
            self.conn,
            self.req,
            self.start_time,
            status,
            reason,
            refusal_body(status, reason),
            decision="allow",
            route=self.route,
            target=self.target.address,
            detail=detail,
            recognition=self.recognition,
        )

    # -- bytes -------------------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        """Bytes from the client, for the upstream."""
        if self.open:
            self.bytes_in += len(data)
            self._last = self.gw.clock.seconds()
            assert self.upstream is not None and self.upstream.transport is not None
            self.upstream.transport.write(data)
        elif not self.done:
            self._early.append(data)
            self._early_size += len(data)
            if self._early_size > MAX_EARLY_DATA:
                self._update_reading()

    def upstream_data(self, data: bytes) -> None:
        """Bytes from the upstream, for the client."""
        if self.open:
            self.bytes_out += len(data)
            self._last = self.gw.clock.seconds()
            self.conn.send(data)

    # -- back-pressure -----------------------------------------------------------------------

    def pauseProducing(self) -> None:
        """The upstream cannot take more: stop reading the client."""
        self._upstream_full = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._upstream_full = False
        self._update_reading()

    def stopProducing(self) -> None:
        pass  # the upstream's connectionLost follows and ends the tunnel

    def client_full(self, full: bool) -> None:
        """The client cannot take more (or can again): pause (resume) reading the upstream."""
        self._client_full = full
        if self.upstream is not None and self.upstream.transport is not None and self.open:
            transport: Any = self.upstream.transport
            if full:
                transport.pauseProducing()
            else:
                transport.resumeProducing()

    def _update_reading(self) -> None:
        pause = self._upstream_full if self.open else self._early_size > MAX_EARLY_DATA
        if self.done or pause == self._reading_paused:
            return
        self._reading_paused = pause
        self.conn.pause_reading(pause)

    # -- endings ---------------------------------------------------------------------------

    def _idle_check(self) -> None:
        self._idle = None
        now = self.gw.clock.seconds()
        due = self._last + self.gw.tunnel_idle
        if due - now > _IDLE_SLACK:
            self._idle = self.gw.clock.callLater(due - now, self._idle_check)
            return
        self.detail = f"nothing sent either way for {self.gw.tunnel_idle:g}s"
        self._end("tunnel_idle_timeout", abort_upstream=True, close_client=True)

    def client_lost(self, reason: str = "client_aborted") -> None:
        """The client connection is gone (DownstreamProtocol.connectionLost)."""
        if not self.open:
            if self.connecting is not None:
                self.connecting.cancel()
            if not self.done:
                # Not yet answered: audited as an abandoned CONNECT, like any request.
                self.done = True
                self.gw.limiter.release(self.route.name)
                self.gw.record(
                    self.conn,
                    self.req,
                    self.start_time,
                    None,
                    reason,
                    "allow",
                    route=self.route,
                    target=self.target.address,
                    recognition=self.recognition,
                )
            return
        if reason == "client_aborted":
            reason = "client_closed"
        self._end(reason, abort_upstream=reason == "gateway_shutdown", close_client=False)

    def upstream_lost(self, reason: Failure) -> None:
        """The upstream connection is gone."""
        if not self.open:
            return  # connecting failed, or the client went first
        clean = reason.check(ConnectionDone) is not None
        if not clean:
            self.detail = reason.getErrorMessage()
        self.upstream = None
        self._end(
            "upstream_closed" if clean else "upstream_reset",
            abort_upstream=False,
            close_client=True,
        )

    def _end(self, reason: str, *, abort_upstream: bool, close_client: bool) -> None:
        if self.done:
            return
        self.done = True
        self.open = False
        gw = self.gw
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        gw.open_tunnels.dec()
        gw.limiter.release(self.route.name)
        upstream, self.upstream = self.upstream, None
        if upstream is not None and upstream.transport is not None:
            transport: Any = upstream.transport
            transport.unregisterProducer()
            if abort_upstream:
                transport.abortConnection()
            else:
                transport.loseConnection()  # after what the client sent has been written
        gw.record_tunnel(self, reason)
        if close_client:
            self.conn.end_tunnel()


class TunnelUpstream(Protocol):
    """The upstream end of a tunnel: bytes in and out, nothing parsed."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def connectionMade(self) -> None:
        no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.tunnel.upstream_data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.tunnel.upstream_lost(reason)


class _TunnelUpstreamFactory(Factory):
    noisy = False

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def buildProtocol(self, addr: object) -> TunnelUpstream:
        return TunnelUpstream(self.tunnel)


# -- the connection -----------------------------------------------------------------------------


class ForwardProtocol(DownstreamProtocol):
    """One client connection to a ``forward`` listener.

    Exactly the reverse gateway's connection (TLS, deadlines, request heads, keep-alive,
    relayed responses) until a CONNECT is allowed; from then on its bytes belong to the
    tunnel and are never parsed again.
    """

    def __init__(self, gw: ForwardGateway) -> None:
        super().__init__(gw)
        self.tunnel: Tunnel | None = None

    def dataReceived(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.client_data(data)  # dropped once the tunnel is over
        else:
            super().dataReceived(data)

    def readConnectionLost(self) -> None:
        tunnel = self.tunnel
        if tunnel is None:
            super().readConnectionLost()
        elif not self._lost:
            # The client's FIN ends its tunnel, as its full close does.
            tunnel.client_lost("client_aborted")
            self.end_tunnel()

    def pauseProducing(self) -> None:
        super().pauseProducing()
        if self.tunnel is not None:
            self.tunnel.client_full(True)

    def resumeProducing(self) -> None:
        super().resumeProducing()
        if self.tunnel is not None:
            self.tunnel.client_full(False)

    def take_over(self, tunnel: Tunnel) -> bytes:
        """Hand this connection's byte stream to ``tunnel``; return the bytes the client sent
        after its CONNECT head (they belong to the tunnel)."""
        self.begin_exchange(tunnel)
        self.tunnel = tunnel
        early, self._buf = self._buf, b""
        if self._reading_paused:
            # Paused while the request's credentials were checked: the tunnel decides now.
            self.pause_reading(False)
            self._reading_paused = False
        return early

    def pause_reading(self, pause: bool) -> None:
        if not self._lost and self.transport is not None:
            transport: Any = self.transport
            if pause:
                transport.pauseProducing()
            else:
                transport.resumeProducing()

    def end_tunnel(self) -> None:
        """The tunnel is over from the upstream's side (or idle): close once flushed."""
        self.close_truncated()


class ForwardGatewayFactory(Factory):
    """Builds a ForwardProtocol per connection for one ``forward`` listener."""

    noisy = False

    def __init__(self, gateway: ForwardGateway) -> None:
        self.gateway = gateway

    def buildProtocol(self, addr: Any) -> ForwardProtocol:
        return ForwardProtocol(self.gateway)
