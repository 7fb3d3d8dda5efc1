"""The reverse gateway (``protocol: http``): ``GET /scrape?route=R&target=T`` and ``GET /sd``.

``ReverseGateway`` is the listener kind's one decision-making object: it parses the
request, asks ``ScrapePolicy``, and composes the shared steps of its ``HTTPListener``
(identity, admission, answers, audit, drain); an allowed scrape is relayed by an
``Exchange``. Connections are ``promgate.http.server.DownstreamProtocol``.
"""

from __future__ import annotations

import re

from twisted.internet.interfaces import IReactorTime

from promgate.audit import IAuditSink
from promgate.authn import REFUSED_AT_THE_DOOR, Authenticator, door_headers
from promgate.config.model import Config, Listener
from promgate.core.admission import Admitter
from promgate.core.context import Outcome, RequestContext
from promgate.core.reasons import Reason
from promgate.core.recording import Recorder
from promgate.http.exchange import admit_and_relay
from promgate.http.listener import HTTPListener
from promgate.http.refusals import decision_status
from promgate.http.server import DownstreamProtocol
from promgate.http.upstream import UpstreamPool
from promgate.http.wire import RequestHead
from promgate.identity import Recognition
from promgate.metrics import Metrics
from promgate.policy import Decision, Membership, ScrapePolicy, parse_scrape_query
from promgate.ratelimit import IRateLimiter, SharedAdmission
from promgate.sd import render_http_sd

_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253})(:[0-9]{1,5})?$")
_GET_HEAD = ((b"Allow", b"GET, HEAD"),)


def http_listener(
    listener: Listener,
    config: Config,
    *,
    clock: IReactorTime,
    limiter: IRateLimiter,
    audit: IAuditSink,
    metrics: Metrics,
    pool: UpstreamPool,
    authenticator: Authenticator | None,
    reuse: HTTPListener | None = None,
    shared: SharedAdmission | None = None,
) -> HTTPListener:
    """The shared steps of one HTTP listener, assembled from the gateway's parts; or, on a
    reload, ``reuse`` (the running listener, its connections kept) reconfigured."""
    admitter = Admitter(limiter, audit, metrics, config.audit.on_failure == "deny", shared)
    authenticator = authenticator or Authenticator(config.identities)
    if reuse is not None:
        reuse.reconfigure(listener, admitter, authenticator)
        return reuse
    return HTTPListener(
        listener,
        clock=clock,
        admitter=admitter,
        recorder=Recorder(listener.name, audit, metrics),
        metrics=metrics,
        pool=pool,
        authenticator=authenticator,
    )


class ReverseGateway:
    """Routing and authorisation of ``/scrape`` and ``/sd`` for one ``http`` listener."""

    def __init__(
        self,
        listener: Listener,
        config: Config,
        *,
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
        self.listener = listener
        self.audit = audit
        self.deny_unaudited = config.audit.on_failure == "deny"
        #: ``membership`` is the routes' current (discovered) targets, shared by every
        #: listener; without it, the configuration's static targets.
        #: Only the routes this listener serves: to it, the others do not exist.
        self.policy = ScrapePolicy(config.routes_of(listener.name), membership=membership)
        self.sd_route_label = listener.sd_route_label

    def handle(self, conn: DownstreamProtocol, req: RequestHead) -> None:
        """Answer one complete request head."""
        http = self.http
        start = http.clock.seconds()
        path, _, query = req.target.partition(b"?")
        method = req.method
        if method != b"GET" and method != b"HEAD":
            outcome = Outcome("deny", Reason.METHOD_NOT_ALLOWED, 405)
            http.refuse(conn, req, http.context(conn, req, start), outcome, _GET_HEAD)
        elif path == b"/scrape" or path == b"/sd":
            header = req.headers.get(b"authorization")
            http.authenticate(
                conn,
                req,
                start,
                header,
                lambda recognition: self.serve(conn, req, path, query, start, recognition),
            )
        else:
            outcome = Outcome("deny", Reason.NOT_FOUND, 404)
            http.refuse(conn, req, http.context(conn, req, start), outcome)

    def serve(
        self,
        conn: DownstreamProtocol,
        req: RequestHead,
        path: bytes,
        query: bytes,
        start: float,
        recognition: Recognition,
    ) -> None:
        """Answer ``/scrape`` or ``/sd`` for a caller recognised as ``recognition``."""
        http = self.http
        ctx = http.context(conn, req, start, recognition)
        if recognition.identity is None and recognition.reason in REFUSED_AT_THE_DOOR:
            status = REFUSED_AT_THE_DOOR[recognition.reason]
            outcome = Outcome("deny", recognition.reason, status, detail=recognition.detail)
            extra = door_headers(recognition, http.authenticator.challenges)
            http.refuse(conn, req, ctx, outcome, extra)
        elif path == b"/scrape":
            self.scrape(conn, req, query, ctx)
        else:
            self.service_discovery(conn, req, ctx)

    def scrape(
        self, conn: DownstreamProtocol, req: RequestHead, query: bytes, ctx: RequestContext
    ) -> None:
        http = self.http
        parsed = parse_scrape_query(query)
        if isinstance(parsed, Decision):
            outcome = Outcome("deny", parsed.reason, decision_status(parsed), detail=parsed.rule)
            http.refuse(conn, req, ctx, outcome)
            return
        decision = self.policy.decide(ctx.recognition, parsed)
        route, target = decision.route, decision.target
        if not decision.allowed or route is None or target is None:
            outcome = Outcome(
                "deny",
                decision.reason,
                decision_status(decision),
                route.name if route is not None else None,
                parsed.target,
                detail=decision.rule,
            )
            http.refuse(conn, req, ctx, outcome)
            return
        admit_and_relay(http, conn, req, ctx, route, target, decision.path or "", decision.params)

    def service_discovery(
        self, conn: DownstreamProtocol, req: RequestHead, ctx: RequestContext
    ) -> None:
        http = self.http
        identity = ctx.recognition.identity
        if identity is None:
            http.refuse(conn, req, ctx, Outcome("deny", ctx.recognition.reason, 403))
            return
        if self.deny_unaudited and not self.audit.healthy:
            http.refuse(conn, req, ctx, Outcome("deny", Reason.AUDIT_UNAVAILABLE, 503))
            return
        routes = self.policy.visible_routes(identity)
        body = render_http_sd(
            routes,
            self.advertise(conn, req),
            "https" if conn.secure else "http",
            self.policy.targets,
            route_label=self.sd_route_label,
        )
        http.answer(
            conn,
            req,
            ctx,
            Outcome("allow", Reason.OK, 200),
            body,
            content_type=b"application/json",
        )

    def advertise(self, conn: DownstreamProtocol, req: RequestHead) -> str:
        """The address Prometheus should scrape this listener at."""
        if self.listener.advertise:
            return self.listener.advertise
        host = req.headers.get(b"host", b"").decode("ascii", "replace")
        if _HOST.match(host):
            return host
        return conn.local_address


__all__ = ["ReverseGateway", "http_listener"]
