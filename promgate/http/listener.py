"""One HTTP listener (``http`` or ``forward``): the steps every request on it shares.

``HTTPListener`` holds a listener's part of the pipeline (who is asking, admission, the
answers the gateway makes itself, the audit record and metrics of every request, the
drain) and hands each complete request head to its ``RequestHandler``: the reverse
gateway (``/scrape``, ``/sd``) or the forward proxy. Connections are
``promgate.http.server.DownstreamProtocol``; relays are ``promgate.http.exchange.Exchange``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from promgate.authn import Authenticator
from promgate.config.model import Listener, Route, Target
from promgate.core.admission import Admitter, Ticket
from promgate.core.context import ConnectionInfo, Outcome, RequestContext
from promgate.core.reasons import Reason
from promgate.core.recording import Recorder
from promgate.drain import InFlight, OpenSet, Phase
from promgate.http.refusals import refusal_body
from promgate.http.upstream import UpstreamPool, UpstreamProtocol
from promgate.http.wire import RequestHead, simple_response
from promgate.identity import Recognition
from promgate.metrics import Metrics
from promgate.ratelimit import Admission, RateLimiter
from promgate.tls import PeerCertificate

#: Headers that go with every answer of the gateway's own.
Headers = tuple[tuple[bytes, bytes], ...]


class ClientConnection(Protocol):
    """What the shared steps and a relay do with a client connection
    (promgate.http.server.DownstreamProtocol)."""

    info: ConnectionInfo
    recognition: Recognition
    peer: str
    #: Whether this connection is over TLS: fixed when it is accepted, whatever a reload
    #: later makes of its listener.
    secure: bool

    def send(self, data: bytes) -> None: ...

    def send_sequence(self, data: tuple[bytes, ...]) -> None: ...

    def request_done(self, keep_alive: bool) -> None: ...

    def begin_authentication(
        self, req: RequestHead, start: float, check: Deferred[Recognition] | None = None
    ) -> None: ...

    def end_authentication(self) -> bool: ...

    def begin_exchange(self, exchange: Any) -> None: ...

    def begin_admission(self, pending: Any) -> None: ...

    def end_admission(self) -> bool: ...

    def attach_upstream(self, upstream: UpstreamProtocol) -> None: ...

    def detach_upstream(self) -> None: ...

    def close_truncated(self) -> None: ...

    def close_if_idle(self) -> None: ...

    def recognise(self) -> None: ...

    def shut_down(self) -> None: ...

    def abort(self) -> None: ...


class RequestHandler(Protocol):
    """What a listener kind does with one complete request head."""

    def handle(self, conn: Any, req: RequestHead) -> None:
        """``conn`` is the DownstreamProtocol the request came on."""


class HTTPListener:
    """The shared steps of one ``http`` or ``forward`` listener."""

    log = Logger()

    def __init__(
        self,
        listener: Listener,
        *,
        clock: IReactorTime,
        admitter: Admitter,
        recorder: Recorder,
        metrics: Metrics,
        pool: UpstreamPool,
        authenticator: Authenticator,
    ) -> None:
        self.listener = listener
        self.name = listener.name
        self.tls = listener.tls is not None
        self.deadlines = listener.deadlines
        self.clock = clock
        self.admitter = admitter
        self.recorder = recorder
        self.metrics = metrics
        self.pool = pool
        self.authenticator = authenticator
        self.handler: RequestHandler | None = None
        self.open_connections = metrics.open_connections.labels(listener.name)
        self.connections = metrics.connections.labels(listener.name)
        self.open: OpenSet[ClientConnection] = OpenSet(clock)
        #: Requests relayed right now, or waiting for the shared limits: what a shutdown
        #: drains (tunnels are cut instead).
        self.in_flight = InFlight(clock)
        self.phase = Phase.SERVING

    def reconfigure(
        self, listener: Listener, admitter: Admitter, authenticator: Authenticator
    ) -> None:
        """A reload: the same listener (same endpoint, same open connections) under a new
        configuration. Requests already admitted finish under the old one; the next
        request on every connection is judged by the new one, its caller recognised anew
        from the connection's certificate."""
        self.listener = listener
        self.tls = listener.tls is not None
        self.deadlines = listener.deadlines
        self.admitter = admitter
        self.authenticator = authenticator
        for conn in list(self.open):
            conn.recognise()

    # -- the drain -------------------------------------------------------------------------

    @property
    def exchanges(self) -> int:
        """How many requests are being relayed now."""
        return self.in_flight.count

    def begin_drain(self) -> None:
        """The gateway is stopping: from now on a connection closes once its answer is
        written, and idle keep-alive connections close now."""
        self.phase = Phase.DRAINING
        for conn in list(self.open):
            conn.close_if_idle()

    def shut_down_connections(self) -> int:
        """After the drain: close the connections whose answers are all written (once
        sent), and cut the others, auditing what they interrupt; how many were open."""
        for conn in list(self.open):
            conn.shut_down()
        return len(self.open)

    def abort_connections(self) -> None:
        """Cut every connection still open (its answer was not taken in time)."""
        for conn in list(self.open):
            conn.abort()

    # -- steps -----------------------------------------------------------------------------

    def handle(self, conn: Any, req: RequestHead) -> None:
        assert self.handler is not None
        self.handler.handle(conn, req)

    def context(
        self,
        conn: ClientConnection,
        req: RequestHead | None,
        start: float,
        recognition: Recognition | None = None,
    ) -> RequestContext:
        """The context of ``req`` on ``conn``, asked by ``recognition`` (by default the
        connection's certificate)."""
        return RequestContext(
            conn.info,
            start,
            recognition if recognition is not None else conn.recognition,
            req.method.decode("latin-1") if req is not None else None,
            req.target.decode("latin-1") if req is not None else None,
            req.size if req is not None else 0,
        )

    def authenticate(
        self,
        conn: ClientConnection,
        req: RequestHead,
        start: float,
        header: bytes | None,
        then: Callable[[Recognition], None],
    ) -> None:
        """Who is asking: the connection's certificate, combined with ``header``
        (``Authorization`` or ``Proxy-Authorization``: bearer or basic). A bcrypt check
        runs in a thread; meanwhile the connection reads no further request."""
        if header is None:
            then(conn.recognition)  # the usual case: recognised once, at the handshake
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

    def admit(
        self,
        conn: ClientConnection,
        req: RequestHead,
        ctx: RequestContext,
        route: Route,
        target: Target,
    ) -> Ticket | Deferred[Ticket | None] | None:
        """The route's limits, then the audit log's health; refuses (429, 503) and
        returns None, or the ticket of the admitted request. With shared limits, the
        answer comes later: a Deferred of the ticket, or of None once refused (or once
        the connection was lost meanwhile: audited then, and what was granted given
        back); meanwhile the connection reads no further request."""
        identity = ctx.recognition.identity
        who = identity.name if identity is not None else ""
        admitted = self.admitter.admit(route.name, route.limits, who, target.address)
        if isinstance(admitted, Ticket):
            return admitted
        if isinstance(admitted, Deferred):
            pending = PendingAdmission(self, conn, req, ctx, route, target)
            conn.begin_admission(pending)
            answer: Deferred[Ticket | None] = admitted.addCallback(pending.answered)
            return answer.addErrback(pending.failed)
        self.refuse_admission(conn, req, ctx, route, target, admitted)
        return None

    def refuse_admission(
        self,
        conn: ClientConnection,
        req: RequestHead,
        ctx: RequestContext,
        route: Route,
        target: Target,
        admitted: Admission,
    ) -> None:
        """Answer a refusal of the limits (429 with ``Retry-After``) or of the audit log or
        an unreachable Redis under ``on_unavailable: deny`` (503)."""
        unavailable = (Reason.AUDIT_UNAVAILABLE, Reason.LIMITS_UNAVAILABLE)
        status = 503 if admitted.reason in unavailable else 429
        extra: Headers = ()
        if status == 429:
            extra = ((b"Retry-After", RateLimiter.retry_after_header(admitted).encode()),)
        outcome = Outcome("deny", admitted.reason, status, route.name, target.address)
        self.refuse(conn, req, ctx, outcome, extra)

    # -- answers made by the gateway itself ------------------------------------------------

    def refuse(
        self,
        conn: ClientConnection,
        req: RequestHead | None,
        ctx: RequestContext,
        outcome: Outcome,
        extra: Headers = (),
    ) -> None:
        """Answer with a refusal: the short constant body of its status and reason
        (promgate.http.refusals); ``outcome.detail`` (the policy rule that decided, or the
        precise problem) goes to the audit record, never to the caller."""
        assert outcome.status is not None
        self.recorder.refused(outcome.route, outcome.reason)
        body = refusal_body(outcome.status, outcome.reason)
        self.answer(conn, req, ctx, outcome, body, extra)

    def answer(
        self,
        conn: ClientConnection,
        req: RequestHead | None,
        ctx: RequestContext,
        outcome: Outcome,
        body: bytes,
        extra: Headers = (),
        content_type: bytes = b"text/plain; charset=utf-8",
    ) -> None:
        """Answer ``req`` with ``body``, record the outcome, and go on to the next request
        (or close)."""
        status = outcome.status
        assert status is not None
        keep_alive = (
            req is not None and req.keep_alive and status < 500 and status not in (400, 408)
        )
        data = simple_response(
            status,
            body,
            keep_alive=keep_alive,
            head_only=req is not None and req.method == b"HEAD",
            extra=extra,
            content_type=content_type,
        )
        conn.send(data)
        self.record(ctx, attrs.evolve(outcome, bytes_out=len(data)))
        conn.request_done(keep_alive)

    def record(self, ctx: RequestContext, outcome: Outcome) -> None:
        """Audit and count one answered (or abandoned) request."""
        self.recorder.request(ctx, outcome, self.clock.seconds())

    def handshake_failed(
        self, conn: ClientConnection, reason: str, detail: str, cert: PeerCertificate | None
    ) -> None:
        self.recorder.handshake_failed(conn.peer, reason, detail, cert)


class PendingAdmission:
    """A request whose admission the shared limits are deciding (promgate.shared_limits);
    it holds the connection (``ClientRelay``) until the answer comes, and counts as in
    flight meanwhile (a shutdown's drain waits for it, at most the limits' timeout)."""

    __slots__ = ("conn", "ctx", "http", "lost", "pending", "req", "route", "target")

    def __init__(
        self,
        http: HTTPListener,
        conn: ClientConnection,
        req: RequestHead,
        ctx: RequestContext,
        route: Route,
        target: Target,
    ) -> None:
        self.http = http
        self.conn = conn
        self.req = req
        self.ctx = ctx
        self.route = route
        self.target = target
        self.lost = False
        self.pending = True
        http.in_flight.begin()

    def _decided(self) -> None:
        if self.pending:
            self.pending = False
            self.http.in_flight.end()

    def client_lost(self, reason: str = Reason.CLIENT_ABORTED) -> None:
        """The connection is gone before the answer: audited now (the audit log may be
        closing); what the answer grants is given back when it comes."""
        self.lost = True
        self._decided()
        self.http.record(
            self.ctx,
            Outcome(
                "deny",
                reason,
                None,
                self.route.name,
                self.target.address,
                detail="connection lost while the route's shared limits were asked",
            ),
        )

    def answered(self, admitted: Ticket | Admission) -> Ticket | None:
        self._decided()
        if self.lost or not self.conn.end_admission():
            if isinstance(admitted, Ticket):
                admitted.release()
            return None
        if isinstance(admitted, Ticket):
            return admitted
        self.http.refuse_admission(self.conn, self.req, self.ctx, self.route, self.target, admitted)
        return None

    def failed(self, failure: Failure) -> None:
        """Not expected (the shared limits always answer): logged, and the connection
        cut (and audited, as lost while its admission was pending)."""
        self.http.log.failure("admission", failure)
        self._decided()
        if not self.lost:
            self.conn.abort()


__all__ = ["HTTPListener", "Headers", "PendingAdmission", "RequestHandler"]
