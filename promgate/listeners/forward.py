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

from collections.abc import Mapping

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from promgate.addresses import canonical_address
from promgate.audit import IAuditSink
from promgate.authn import Authenticator, door_headers, token_challenges
from promgate.config.model import Config, Identity, Listener, Route, Target
from promgate.core.admission import Ticket
from promgate.core.context import Outcome, RequestContext
from promgate.core.reasons import Reason
from promgate.http.exchange import admit_and_relay
from promgate.http.listener import HTTPListener
from promgate.http.refusals import decision_status, refusal_body
from promgate.http.server import DownstreamProtocol
from promgate.http.targets import AbsoluteForm, parse_absolute_form, parse_authority_form
from promgate.http.upstream import UpstreamPool
from promgate.http.wire import HTTPError, RequestHead
from promgate.identity import Recognition
from promgate.jwt_authn import looks_like_jwt
from promgate.listeners.scrape import http_listener
from promgate.metrics import Metrics
from promgate.net.relay import Relay, Side
from promgate.net.relay_upstream import EndpointConnector, UpstreamConnection
from promgate.policy import BAD_REQUEST, Decision, ForwardPolicy, Membership, parse_query
from promgate.ratelimit import IRateLimiter, SharedAdmission
from promgate.reactors import IConnectReactor

__all__ = ["CONNECT_OK", "ForwardGateway", "Tunnel"]

#: The answer that opens a tunnel.
CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
_METHODS = ((b"Allow", b"GET, HEAD, CONNECT"),)
#: How a tunnel's end is named in its audit record, where the relay's name differs.
_TUNNEL_ENDINGS: dict[str, str] = {
    Reason.CLIENT_ABORTED: Reason.CLIENT_CLOSED,
    Reason.IDLE_TIMEOUT: Reason.TUNNEL_IDLE_TIMEOUT,
}


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
        reuse: HTTPListener | None = None,
        shared: SharedAdmission | None = None,
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
            reuse=reuse,
            shared=shared,
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
        self.connector = EndpointConnector(reactor, connect_timeout=self.connect_timeout)
        self.challenges = tuple(
            (b"Proxy-Authenticate", value) for _, value in authenticator.challenges
        )
        self.open_tunnels = metrics.open_tunnels.labels(listener.name)

    def revoke_tunnels(self, identities: Mapping[str, Identity]) -> int:
        """After a reload: cut the open tunnels this gateway's policy no longer allows
        (their caller gone or no longer allowed, their target in no route it may use),
        audited ``policy_revoked``; how many."""
        revoked = 0
        for conn in list(self.http.open):
            relay = getattr(conn, "tunnel", None)
            tunnel = getattr(relay, "owner", None)
            if not isinstance(relay, Relay) or not isinstance(tunnel, Tunnel):
                continue
            if tunnel.req.headers.get(b"proxy-authorization") is None:
                # Recognised from the connection's certificate: as the new configuration
                # names it (the listener recognised every connection anew).
                recognition = conn.recognition
            else:
                old = tunnel.ctx.recognition.identity
                identity = identities.get(old.name) if old is not None else None
                recognition = Recognition(identity, Reason.OK)
            address = canonical_address(tunnel.target.address) or tunnel.target.address
            decision = self.policy.decide_connect(recognition, address)
            route = decision.route
            if not decision.allowed or route is None or route.name != tunnel.route.name:
                relay.revoke(f"reload: {decision.rule}")
                revoked += 1
        return revoked

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
            if header is None:
                header = self.oauth2_token(req)
            http.authenticate(
                conn, req, start, header, lambda r: self.forward(conn, req, start, form, r)
            )

    def oauth2_token(self, req: RequestHead) -> bytes | None:
        """An absolute-form request's ``Authorization: Bearer`` JWT, when identity
        providers are configured: Prometheus's ``oauth2`` sends its token so through a
        ``proxy_url``. It stands for ``Proxy-Authorization`` (and, like any client
        ``Authorization``, is never forwarded)."""
        if self.http.authenticator.jwt is None:
            return None
        header = req.headers.get(b"authorization")
        if header is None or header[:7].lower() != b"bearer ":
            return None
        return header if looks_like_jwt(header[7:].strip(b" \t")) else None

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
        admit_and_relay(http, conn, req, ctx, route, target, decision.path or "", decision.params)

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
        if isinstance(ticket, Ticket):
            Tunnel(self, conn, req, ctx, route, target, ticket).start()
        elif ticket is not None:  # the shared limits answer later
            ticket.addCallback(self.open_tunnel, conn, req, ctx, route, target)

    def open_tunnel(
        self,
        ticket: Ticket | None,
        conn: DownstreamProtocol,
        req: RequestHead,
        ctx: RequestContext,
        route: Route,
        target: Target,
    ) -> None:
        """Open an admitted CONNECT's tunnel (nothing, if ``ticket`` is None)."""
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
        if status == 407:
            extra = token_challenges(ctx.recognition, self.challenges)
        else:
            extra = door_headers(ctx.recognition, ())
        self.http.refuse(conn, req, ctx, outcome, extra)

    def record_tunnel(self, tunnel: Tunnel, relay: Relay) -> None:
        """Audit and count one tunnel, at its end: one record for its whole life."""
        outcome = Outcome(
            "allow",
            _TUNNEL_ENDINGS.get(relay.ended or "", relay.ended or Reason.CLIENT_CLOSED),
            200,
            tunnel.route.name,
            tunnel.target.address,
            bytes_in=tunnel.req.size + relay.bytes_in,
            bytes_out=len(CONNECT_OK) + relay.bytes_out,
            detail=relay.detail,
        )
        self.http.recorder.tunnel(tunnel.ctx, outcome, self.http.clock.seconds())


# -- the tunnel ------------------------------------------------------------------------------


class Tunnel:
    """One CONNECT tunnel: the owner of the relay (promgate.net.relay) that carries it.

    Connects to the target, answers ``200`` once it is there, then leaves the bytes to the
    relay; at the end, one audit record for the tunnel's whole life. ``bytes_in`` counts
    the CONNECT head and what the client sent through, ``bytes_out`` the ``200`` and what
    the upstream sent back.
    """

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
        #: Connecting failed and the client was answered (a 502 or 504).
        self.answered = False

    def start(self) -> None:
        gw = self.gw
        relay = Relay(
            self,
            Side(self.conn.transport, secure=self.conn.secure),
            clock=gw.http.clock,
            connect_timeout=gw.connect_timeout,
            idle=gw.tunnel_idle,
        )
        relay.start(self.conn.take_over(relay))

    # -- RelayOwner --------------------------------------------------------------------------

    def connect(self, relay: Relay) -> Deferred[UpstreamConnection]:
        return self.gw.connector.connect(self.route, self.target, b"", False)

    def opened(self, relay: Relay) -> None:
        self.gw.open_tunnels.inc()
        self.conn.send(CONNECT_OK)

    def connect_failed(self, relay: Relay, reason: str, detail: str) -> None:
        if reason == Reason.GATEWAY_SHUTDOWN:
            self.conn.abort()  # recorded when the client is gone, as an abandoned CONNECT
            return
        self.answered = True
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
        status = 504 if reason == Reason.UPSTREAM_TIMEOUT else 502
        outcome = Outcome(
            "allow", reason, status, self.route.name, self.target.address, detail=detail
        )
        gw.http.answer(self.conn, self.req, self.ctx, outcome, refusal_body(status, reason))

    def finished(self, relay: Relay) -> None:
        gw = self.gw
        self.ticket.release()
        if relay.opened:
            gw.open_tunnels.dec()
            gw.record_tunnel(self, relay)
        elif not self.answered:
            # Not yet answered: audited as an abandoned CONNECT, like any request (or as
            # revoked, when a reload cut it while its upstream was being connected).
            reason = Reason.CLIENT_ABORTED
            detail = None
            if relay.ended in (Reason.GATEWAY_SHUTDOWN, Reason.POLICY_REVOKED):
                reason = Reason(relay.ended)
                detail = relay.detail
            outcome = Outcome(
                "allow", reason, None, self.route.name, self.target.address, detail=detail
            )
            gw.http.record(self.ctx, outcome)
