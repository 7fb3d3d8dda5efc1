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

``ForwardGateway`` composes the same ``HTTPListener`` steps as the reverse gateway (same
refusals, records and relay) and asks ``ForwardPolicy`` (the pure decision); after an
allowed CONNECT, the connection hands its byte stream to a ``Tunnel``.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectingCancelledError, ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from promgate.audit import IAuditSink
from promgate.authn import Authenticator, door_headers
from promgate.config.model import Config, Listener, Route, Target
from promgate.core.admission import Ticket
from promgate.core.context import Outcome, RequestContext
from promgate.core.reasons import Reason
from promgate.http.exchange import Exchange
from promgate.http.refusals import decision_status, refusal_body
from promgate.http.server import DownstreamProtocol
from promgate.http.targets import AbsoluteForm, parse_absolute_form, parse_authority_form
from promgate.http.upstream import UpstreamPool
from promgate.http.wire import HTTPError, RequestHead
from promgate.identity import Recognition
from promgate.listeners.scrape import http_listener
from promgate.metrics import Metrics
from promgate.net.connector import connect, connect_failure, no_delay
from promgate.policy import BAD_REQUEST, Decision, ForwardPolicy, Membership, parse_query
from promgate.ratelimit import IRateLimiter
from promgate.reactors import IConnectReactor

__all__ = ["CONNECT_OK", "MAX_EARLY_DATA", "ForwardGateway", "Tunnel", "TunnelUpstream"]

#: The answer that opens a tunnel.
CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
#: Bytes a client may send after its CONNECT head, before the tunnel is open, before the
#: gateway stops reading it.
MAX_EARLY_DATA = 64 * 1024
_METHODS = ((b"Allow", b"GET, HEAD, CONNECT"),)
#: The idle deadline is checked this close to its due time (clock rounding).
_IDLE_SLACK = 0.001


# -- the gateway ------------------------------------------------------------------------------


class ForwardGateway:
    """Routing and authorisation of absolute-form requests and CONNECT for one
    ``forward`` listener; ``reactor`` connects tunnels."""

    log = Logger()

    def __init__(
        self,
        listener: Listener,
        config: Config,
        *,
        reactor: IConnectReactor,
        clock: IReactorTime,
        limiter: IRateLimiter,
        audit: IAuditSink,
        metrics: Metrics,
        pool: UpstreamPool,
        authenticator: Authenticator | None = None,
        membership: Membership | None = None,
    ) -> None:
        self.http = http_listener(
            listener,
            config,
            clock=clock,
            limiter=limiter,
            audit=audit,
            metrics=metrics,
            pool=pool,
            authenticator=authenticator,
        )
        self.http.handler = self
        self.reactor = reactor
        self.name = listener.name
        authenticator = self.http.authenticator
        self.policy = ForwardPolicy(
            config.routes_of(listener.name),
            challenge=authenticator.accepts_headers,
            membership=membership,
        )
        self.connect_timeout = listener.deadlines.upstream_connect
        self.tunnel_idle = listener.deadlines.tunnel_idle
        self.challenges = tuple(
            (b"Proxy-Authenticate", value) for _, value in authenticator.challenges
        )
        self.open_tunnels = metrics.open_tunnels.labels(listener.name)

    def handle(self, conn: DownstreamProtocol, req: RequestHead) -> None:
        """Answer one complete request head: a CONNECT or an absolute-form GET/HEAD."""
        http = self.http
        start = http.clock.seconds()
        if req.method == b"CONNECT":
            # Whatever the answer, a refused CONNECT closes its connection: the bytes the
            # client sent after the head were meant for the tunnel, never for this parser.
            req = attrs.evolve(req, keep_alive=False)
            try:
                address = parse_authority_form(req.target)
            except HTTPError as e:
                self.refuse_malformed(conn, req, start, e)
                return
            header = req.headers.get(b"proxy-authorization")
            http.authenticate(
                conn, req, start, header, lambda r: self.tunnel(conn, req, start, address, r)
            )
        elif req.target[:1] == b"/" or req.target == b"*":
            error = HTTPError(400, BAD_REQUEST, "origin-form request on a forward listener")
            self.refuse_malformed(conn, req, start, error)
        elif req.method != b"GET" and req.method != b"HEAD":
            outcome = Outcome("deny", Reason.METHOD_NOT_ALLOWED, 405)
            http.refuse(conn, req, http.context(conn, req, start), outcome, _METHODS)
        else:
            try:
                form = parse_absolute_form(req.target)
            except HTTPError as e:
                self.refuse_malformed(conn, req, start, e)
                return
            header = req.headers.get(b"proxy-authorization")
            http.authenticate(
                conn, req, start, header, lambda r: self.forward(conn, req, start, form, r)
            )

    def refuse_malformed(
        self, conn: DownstreamProtocol, req: RequestHead, start: float, error: HTTPError
    ) -> None:
        http = self.http
        outcome = Outcome("deny", error.reason, error.status, detail=error.message)
        http.refuse(conn, req, http.context(conn, req, start), outcome)

    # -- absolute-form GET / HEAD -----------------------------------------------------------

    def forward(
        self,
        conn: DownstreamProtocol,
        req: RequestHead,
        start: float,
        form: AbsoluteForm,
        recognition: Recognition,
    ) -> None:
        http = self.http
        ctx = http.context(conn, req, start, recognition)
        params = parse_query(form.query)
        if isinstance(params, Decision):
            self.refuse_decision(conn, req, ctx, params, form.address)
            return
        decision = self.policy.decide_request(recognition, form.address, form.path, params)
        route, target = decision.route, decision.target
        if not decision.allowed or route is None or target is None:
            self.refuse_decision(conn, req, ctx, decision, form.address)
            return
        ticket = http.admit(conn, req, ctx, route, target)
        if ticket is not None:
            path = decision.path or ""
            Exchange(http, conn, req, ctx, route, target, path, decision.params, ticket).start()

    # -- CONNECT ----------------------------------------------------------------------------

    def tunnel(
        self,
        conn: DownstreamProtocol,
        req: RequestHead,
        start: float,
        address: str,
        recognition: Recognition,
    ) -> None:
        http = self.http
        ctx = http.context(conn, req, start, recognition)
        decision = self.policy.decide_connect(recognition, address)
        route, target = decision.route, decision.target
        if not decision.allowed or route is None or target is None:
            self.refuse_decision(conn, req, ctx, decision, address)
            return
        ticket = http.admit(conn, req, ctx, route, target)
        if ticket is not None:
            Tunnel(self, conn, req, ctx, route, target, ticket).start()

    # -- shared steps -----------------------------------------------------------------------

    def refuse_decision(
        self,
        conn: DownstreamProtocol,
        req: RequestHead,
        ctx: RequestContext,
        decision: Decision,
        address: str,
    ) -> None:
        status = decision_status(decision)
        route = decision.route
        outcome = Outcome(
            "deny",
            decision.reason,
            status,
            route.name if route is not None else None,
            address,
            detail=decision.rule,
        )
        extra = self.challenges if status == 407 else door_headers(ctx.recognition, ())
        self.http.refuse(conn, req, ctx, outcome, extra)

    def record_tunnel(self, tunnel: Tunnel, reason: str) -> None:
        """Audit and count one tunnel, at its end: one record for its whole life."""
        outcome = Outcome(
            "allow",
            reason,
            200,
            tunnel.route.name,
            tunnel.target.address,
            bytes_in=tunnel.bytes_in,
            bytes_out=tunnel.bytes_out,
            detail=tunnel.detail,
        )
        self.http.recorder.tunnel(tunnel.ctx, outcome, self.http.clock.seconds())


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
        conn: DownstreamProtocol,
        req: RequestHead,
        ctx: RequestContext,
        route: Route,
        target: Target,
        ticket: Ticket,
    ) -> None:
        self.gw = gw
        self.conn = conn
        self.req = req
        self.ctx = ctx
        self.route = route
        self.target = target
        self.ticket = ticket
        start = ctx.start
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
        gw = self.gw
        d = connect(gw.reactor, self.target, _TunnelUpstreamFactory(self), gw.connect_timeout)
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
        self._last = self.gw.http.clock.seconds()
        self._idle = self.gw.http.clock.callLater(self.gw.tunnel_idle, self._idle_check)
        self._update_reading()

    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        if self.done or failure.check(ConnectingCancelledError):
            return
        self.done = True
        reason, detail = connect_failure(failure)
        status = 504 if reason is Reason.UPSTREAM_TIMEOUT else 502
        gw = self.gw
        gw.http.metrics.upstream_errors.labels(self.route.name, reason).inc()
        gw.log.info(
            "route {route} target {target}: {reason} ({detail})",
            route=self.route.name,
            target=self.target.address,
            reason=reason,
            detail=detail,
        )
        self.ticket.release()
        outcome = Outcome("allow", reason, status, self.route.name, self.target.address)
        gw.http.answer(
            self.conn,
            self.req,
            self.ctx,
            attrs.evolve(outcome, detail=detail),
            refusal_body(status, reason),
        )

    # -- bytes -------------------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        """Bytes from the client, for the upstream."""
        if self.open:
            self.bytes_in += len(data)
            self._last = self.gw.http.clock.seconds()
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
            self._last = self.gw.http.clock.seconds()
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
        now = self.gw.http.clock.seconds()
        due = self._last + self.gw.tunnel_idle
        if due - now > _IDLE_SLACK:
            self._idle = self.gw.http.clock.callLater(due - now, self._idle_check)
            return
        self.detail = f"nothing sent either way for {self.gw.tunnel_idle:g}s"
        self._end("tunnel_idle_timeout", abort_upstream=True, close_client=True)

    def client_lost(self, reason: str = Reason.CLIENT_ABORTED) -> None:
        """The client connection is gone (DownstreamProtocol.connectionLost)."""
        if not self.open:
            if self.connecting is not None:
                self.connecting.cancel()
            if not self.done:
                # Not yet answered: audited as an abandoned CONNECT, like any request.
                self.done = True
                self.ticket.release()
                outcome = Outcome("allow", reason, None, self.route.name, self.target.address)
                self.gw.http.record(self.ctx, outcome)
            return
        if reason == Reason.CLIENT_ABORTED:
            reason = Reason.CLIENT_CLOSED
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
        self.ticket.release()
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
