"""The reverse gateway (``protocol: http``): ``GET /scrape?route=R&target=T`` and ``GET /sd``.

``DownstreamProtocol`` only translates Twisted callbacks (bytes, handshakes, pauses,
losses) into calls on ``ReverseGateway``, a plain object that routes, authorises, limits
and audits; ``Exchange`` relays one scrape between a downstream connection and a pooled
upstream connection with back-pressure both ways.
"""

from __future__ import annotations

import re
from typing import Any
from typing import Protocol as TypingProtocol
from urllib.parse import urlencode

import attrs
from cryptography import x509
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectingCancelledError, TimeoutError
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from promgate.addresses import peer_address
from promgate.audit import AuditEvent, IAuditSink
from promgate.authn import AUTHN_FAILURES, REFUSED_AT_THE_DOOR, Authenticator, door_headers
from promgate.config.model import Config, Identity, Listener, Route, Target
from promgate.drain import InFlight, OpenSet, Phase
from promgate.http.refusals import decision_status, refusal_body
from promgate.http.upstream import (
    CHUNKED,
    CLOSE,
    LENGTH,
    UpstreamPool,
    UpstreamProtocol,
    no_delay,
)
from promgate.http.wire import (
    MAX_HEAD,
    MAX_REQUEST_LINE,
    HTTPError,
    RequestHead,
    parse_request_head,
    simple_response,
)
from promgate.identity import Recognition
from promgate.metrics import Metrics
from promgate.policy import Decision, Membership, ScrapePolicy, parse_scrape_query
from promgate.ratelimit import Admission, RateLimiter
from promgate.sd import render_http_sd
from promgate.tls import PeerCertificate, UpstreamTLSError, handshake_reason, verify_reason

_PASS_HEADERS = (
    (b"accept", b"Accept"),
    (b"accept-encoding", b"Accept-Encoding"),
    (b"user-agent", b"User-Agent"),
    (b"x-prometheus-scrape-timeout-seconds", b"X-Prometheus-Scrape-Timeout-Seconds"),
)
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253})(:[0-9]{1,5})?$")
_MAX_TIMEOUT = 600.0
#: The gateway answers a little before Prometheus gives up, so its 504 is what gets seen.
_TIMEOUT_MARGIN = 0.25


@attrs.frozen
class TLSInfo:
    """What the TLS layer told us about a downstream connection."""

    version: str | None = None
    cipher: str | None = None
    peer: PeerCertificate | None = None


NO_TLS = TLSInfo()


def classify_handshake_failure(
    reason: Failure,
    *,
    shutdown: bool,
    timed_out: bool,
    verify_error: tuple[str, PeerCertificate | None] | None,
) -> tuple[str, str, PeerCertificate | None]:
    """Why a TLS handshake ended before completing: (reason, detail, the refused cert)."""
    if shutdown:
        return "gateway_shutdown", "the gateway stopped during the handshake", None
    if timed_out:
        return "handshake_timeout", "TLS handshake not completed in time", None
    if verify_error is not None:
        return verify_error[0], reason.getErrorMessage(), verify_error[1]
    if reason.check(SSL.Error):
        return handshake_reason(reason.value or Exception()), reason.getErrorMessage(), None
    return "closed_before_handshake", reason.getErrorMessage(), None


def handshake_failure_event(
    listener: str, peer: str, reason: str, detail: str, cert: PeerCertificate | None
) -> AuditEvent:
    """The audit event of a refused or failed TLS handshake."""
    return AuditEvent(
        event="tls_handshake_failed",
        listener=listener,
        peer=peer,
        cert_sha256=cert.sha256 if cert is not None else None,
        cert_subject=cert.subject if cert is not None else None,
        decision="deny",
        reason=reason,
        detail=detail,
    )


def connection_event(
    event: str, listener: str, peer: str, tls: TLSInfo, identity: Identity | None, **fields: Any
) -> AuditEvent:
    """An audit event carrying what is known of a client connection: who and how."""
    cert = tls.peer
    return AuditEvent(
        event=event,
        listener=listener,
        peer=peer,
        tls_version=tls.version,
        tls_cipher=tls.cipher,
        cert_sha256=cert.sha256 if cert is not None else None,
        cert_subject=cert.subject if cert is not None else None,
        identity=identity.name if identity is not None else None,
        **fields,
    )


class ClientRelay(TypingProtocol):
    """What holds a downstream connection while it is busy: an ``Exchange``, or a forward
    listener's CONNECT tunnel (promgate.listeners.forward). No request is read meanwhile."""

    def client_lost(self, reason: str = "client_aborted") -> None: ...


#: The caller of a request abandoned before its credentials were checked.
_UNCHECKED = Recognition(None, "authn_pending")


class ReverseGateway:
    """Routing, authorisation, limits and audit for one ``http`` listener."""

    log = Logger()

    def __init__(
        self,
        listener: Listener,
        config: Config,
        *,
        clock: IReactorTime,
        limiter: RateLimiter,
        audit: IAuditSink,
        metrics: Metrics,
        pool: UpstreamPool,
        authenticator: Authenticator | None = None,
        membership: Membership | None = None,
    ) -> None:
        self.listener = listener
        self.name = listener.name
        self.tls = listener.tls is not None
        self.deadlines = listener.deadlines
        self.clock = clock
        self.limiter = limiter
        self.audit = audit
        self.deny_unaudited = config.audit.on_failure == "deny"
        self.metrics = metrics
        self.pool = pool
        #: ``membership`` is the routes' current (discovered) targets, shared by every
        #: listener; without it, the configuration's static targets.
        #: Only the routes this listener serves: to it, the others do not exist.
        self.policy = ScrapePolicy(config.routes_of(listener.name), membership=membership)
        self.sd_route_label = listener.sd_route_label
        self.authenticator = authenticator or Authenticator(config.identities)
        self.resolver = self.authenticator.resolver
        self.open_connections = metrics.open_connections.labels(listener.name)
        self.connections = metrics.connections.labels(listener.name)
        self.open: OpenSet[DownstreamProtocol] = OpenSet(clock)
        #: Scrapes relayed right now: what a shutdown drains (tunnels are cut instead).
        self.in_flight = InFlight(clock)
        self.phase = Phase.SERVING

    @property
    def exchanges(self) -> int:
        """How many scrapes are being relayed now."""
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

    # -- entry points from DownstreamProtocol -------------------------------------------

    def handle(self, conn: DownstreamProtocol, req: RequestHead) -> None:
        """Answer one complete request head."""
        start = self.clock.seconds()
        path, _, query = req.target.partition(b"?")
        method = req.method
        if method != b"GET" and method != b"HEAD":
            self.refuse(
                conn,
                req,
                start,
                405,
                "method_not_allowed",
                extra=((b"Allow", b"GET, HEAD"),),
            )
        elif path == b"/scrape" or path == b"/sd":
            header = req.headers.get(b"authorization")
            if header is None:
                # The usual case: the certificate, recognised once at the handshake.
                self.serve(conn, req, path, query, start, conn.recognition)
            else:
                self.authenticate(conn, req, path, query, start, header)
        else:
            self.refuse(conn, req, start, 404, "not_found")

    def authenticate(
        self,
        conn: DownstreamProtocol,
        req: RequestHead,
        path: bytes,
        query: bytes,
        start: float,
        header: bytes,
    ) -> None:
        """Check an ``Authorization`` header, then serve. A bcrypt check runs in a thread;
        meanwhile the connection reads no further request."""
        result = self.authenticator.authenticate(conn.recognition, header, conn.peer)
        if not isinstance(result, Deferred):
            self.serve(conn, req, path, query, start, result)
            return
        conn.begin_authentication(req, start, result)

        def authenticated(recognition: Recognition) -> None:
            if conn.end_authentication():
                self.serve(conn, req, path, query, start, recognition)

        result.addCallback(authenticated).addErrback(
            lambda f: self.log.failure("serving after authentication", f)
        )

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
        if recognition.identity is None and recognition.reason in REFUSED_AT_THE_DOOR:
            status = REFUSED_AT_THE_DOOR[recognition.reason]
            self.refuse(
                conn,
                req,
                start,
                status,
                recognition.reason,
                extra=door_headers(recognition, self.authenticator.challenges),
                rule=recognition.detail,
                recognition=recognition,
            )
        elif path == b"/scrape":
            self.scrape(conn, req, query, start, recognition)
        else:
            self.service_discovery(conn, req, start, recognition)

    def scrape(
        self,
        conn: DownstreamProtocol,
        req: RequestHead,
        query: bytes,
        start: float,
        recognition: Recognition,
    ) -> None:
        parsed = parse_scrape_query(query)
        if isinstance(parsed, Decision):
            self.refuse(
                conn,
                req,
                start,
                decision_status(parsed),
                parsed.reason,
                rule=parsed.rule,
                recognition=recognition,
            )
            return
        decision = self.policy.decide(recognition, parsed)
        route, target, identity = decision.route, decision.target, recognition.identity
        if not decision.allowed or route is None or target is None or identity is None:
            self.refuse(
                conn,
                req,
                start,
                decision_status(decision),
                decision.reason,
                route=route,
                target=parsed.target,
                rule=decision.rule,
                recognition=recognition,
            )
            return
        self.relay(conn, req, start, decision, route, target, identity, recognition)

    def relay(
        self,
        conn: DownstreamProtocol,
        req: RequestHead,
        start: float,
        decision: Decision,
        route: Route,
        target: Target,
        identity: Identity,
        recognition: Recognition,
    ) -> None:
        """An allowed request: admit it past the limits, then relay it upstream."""
        if self.admit(conn, req, start, route, target, identity, recognition):
            Exchange(
                self,
                conn,
                req,
                route,
                target,
                identity,
                decision.path or "",
                decision.params,
                start,
                recognition=recognition,
            ).start()

    def admit(
        self,
        conn: DownstreamProtocol,
        req: RequestHead,
        start: float,
        route: Route,
        target: Target,
        identity: Identity,
        recognition: Recognition,
    ) -> bool:
        """The route's limits, then the audit log's health, for every relayed request;
        refuses (429, 503) and returns False, or counts the request in flight."""
        admission = self.limiter.admit(route.name, route.limits, identity.name, target.address)
        if not admission.allowed:
            self.metrics.rate_limited.labels(route.name, admission.reason).inc()
            self.refuse(
                conn,
                req,
                start,
                429,
                admission.reason,
                route=route,
                target=target.address,
                extra=((b"Retry-After", RateLimiter.retry_after_header(admission).encode()),),
                recognition=recognition,
            )
            return False
        if self.deny_unaudited and not self.audit.healthy:
            self.limiter.release(route.name)
            self.refuse(
                conn,
                req,
                start,
                503,
                "audit_unavailable",
                route=route,
                target=target.address,
                recognition=recognition,
            )
            return False
        return True

    def service_discovery(
        self, conn: DownstreamProtocol, req: RequestHead, start: float, recognition: Recognition
    ) -> None:
        identity = recognition.identity
        if identity is None:
            self.refuse(conn, req, start, 403, recognition.reason, recognition=recognition)
            return
        if self.deny_unaudited and not self.audit.healthy:
            self.refuse(
                conn,
                req,
                start,
                503,
                "audit_unavailable",
                recognition=recognition,
            )
            return
        routes = self.policy.visible_routes(identity)
        body = render_http_sd(
            routes,
            self.advertise(conn, req),
            "https" if self.tls else "http",
            self.policy.targets,
            route_label=self.sd_route_label,
        )
        self.answer(
            conn,
            req,
            start,
            200,
            "ok",
            body,
            decision="allow",
            content_type=b"application/json",
            recognition=recognition,
        )

    def advertise(self, conn: DownstreamProtocol, req: RequestHead) -> str:
        """The address Prometheus should scrape this listener at."""
        if self.listener.advertise:
            return self.listener.advertise
        host = req.headers.get(b"host", b"").decode("ascii", "replace")
        if _HOST.match(host):
            return host
        return conn.local_address

    # -- answers made by the gateway itself ------------------------------------------------

    def refuse(
        self,
        conn: DownstreamProtocol,
        req: RequestHead | None,
        start: float,
        status: int,
        reason: str,
        *,
        route: Route | None = None,
        target: str | None = None,
        extra: tuple[tuple[bytes, bytes], ...] = (),
        rule: str | None = None,
        recognition: Recognition | None = None,
    ) -> None:
        """Answer with a refusal: the short constant body of its status and reason
        (promgate.http.refusals); ``rule`` (the policy rule that decided, or the precise
        problem) goes to the audit record's ``detail``, never to the caller."""
        route_label = route.name if route is not None else ""
        self.metrics.denied.labels(self.name, route_label, reason).inc()
        if reason in AUTHN_FAILURES:
            self.metrics.authn_failures.labels(self.name, reason).inc()
        self.answer(
            conn,
            req,
            start,
            status,
            reason,
            refusal_body(status, reason),
            decision="deny",
            route=route,
            target=target,
            extra=extra,
            detail=rule,
            recognition=recognition,
        )

    def answer(
        self,
        conn: DownstreamProtocol,
        req: RequestHead | None,
        start: float,
        status: int,
        reason: str,
        body: bytes,
        *,
        decision: str,
        route: Route | None = None,
        target: str | None = None,
        extra: tuple[tuple[bytes, bytes], ...] = (),
        content_type: bytes = b"text/plain; charset=utf-8",
        detail: str | None = None,
        recognition: Recognition | None = None,
    ) -> None:
        keep_alive = (
            req is not None and req.keep_alive and status < 500 and status not in (400, 408)
        )
        head_only = req is not None and req.method == b"HEAD"
        data = simple_response(
            status,
            body,
            keep_alive=keep_alive,
            head_only=head_only,
            extra=extra,
            content_type=content_type,
        )
        conn.send(data)
        self.record(
            conn,
            req,
            start,
            status,
            reason,
            decision,
            route=route,
            target=target,
            bytes_out=len(data),
            detail=detail,
            recognition=recognition,
        )
        conn.request_done(keep_alive)

    def record(
        self,
        conn: DownstreamProtocol,
        req: RequestHead | None,
        start: float,
        status: int | None,
        reason: str,
        decision: str,
        *,
        route: Route | None = None,
        target: str | None = None,
        path: str | None = None,
        bytes_out: int = 0,
        detail: str | None = None,
        recognition: Recognition | None = None,
    ) -> None:
        """Audit and count one answered (or abandoned) request. ``recognition`` is the
        request's caller (its connection's certificate unless said otherwise)."""
        now = self.clock.seconds()
        route_label = route.name if route is not None else ""
        counters = self.metrics.route(self.name, route_label)
        if status is not None:
            counters.answered(status)
        counters.duration.observe(now - start)
        bytes_in = req.size if req is not None else 0
        counters.bytes_in.inc(bytes_in)
        counters.bytes_out.inc(bytes_out)
        if path is None and req is not None:
            path = req.target.decode("latin-1")
        identity = (recognition or conn.recognition).identity
        self.audit.record(
            connection_event(
                "request",
                self.name,
                conn.peer,
                conn.tls_info,
                identity,
                route=route.name if route is not None else None,
                target=target,
                method=req.method.decode("latin-1") if req is not None else None,
                path=path,
                decision=decision,
                reason=reason,
                status=status,
                bytes_in=bytes_in,
                bytes_out=bytes_out,
                duration=now - start,
                detail=detail,
            )
        )

    def handshake_failed(
        self, conn: DownstreamProtocol, reason: str, detail: str, cert: PeerCertificate | None
    ) -> None:
        self.metrics.tls_handshake_failures.labels(self.name, reason).inc()
        self.audit.record(handshake_failure_event(self.name, conn.peer, reason, detail, cert))


class Exchange:
    """One scrape relayed from a pooled upstream connection to a downstream client."""

    log = Logger()

    def __init__(
        self,
        gw: ReverseGateway,
        conn: DownstreamProtocol,
        req: RequestHead,
        route: Route,
        target: Target,
        identity: Identity,
        upstream_path: str,
        params: tuple[tuple[str, str], ...],
        start: float,
        *,
        recognition: Recognition | None = None,
    ) -> None:
        self.gw = gw
        self.conn = conn
        self.req = req
        self.route = route
        self.target = target
        self.identity = identity
        self.recognition = recognition
        self.path = upstream_path
        self.params = params
        self.start_time = start
        self.upstream: UpstreamProtocol | None = None
        self.connecting: Deferred[UpstreamProtocol] | None = None
        self.deadline: IDelayedCall | None = None
        self.head_sent = False
        self.wrap_chunks = False
        self.close_delimited = False  # the client's body ends only when the connection does
        self.keep_alive = req.keep_alive
        self.bytes_out = 0
        self.status: int | None = None
        self.retried = False
        self.done = False
        self.upstream_start = 0.0
        self.client11 = req.version == b"HTTP/1.1"

    def start(self) -> None:
        self.gw.in_flight.begin()
        self.conn.begin_exchange(self)
        self.deadline = self.gw.clock.callLater(self._timeout_seconds(), self._timed_out)
        upstream = self.gw.pool.checkout(self.route, self.target)
        if upstream is not None:
            self._use(upstream)
        else:
            self._connect()

    def _timeout_seconds(self) -> float:
        header = self.req.headers.get(b"x-prometheus-scrape-timeout-seconds")
        if header is not None:
            try:
                value = float(header)
            except ValueError:
                value = 0.0
            if 0 < value < float("inf"):
                return min(max(value - _TIMEOUT_MARGIN, value / 2), _MAX_TIMEOUT)
        return self.route.timeout

    def _connect(self) -> None:
        d = self.gw.pool.connect(self.route, self.target)
        self.connecting = d
        d.addCallbacks(self._use, self._connect_failed)

    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        if self.done:
            return
        if failure.check(ConnectingCancelledError):
            return
        if failure.check(TimeoutError):
            self._fail(504, "upstream_timeout", "upstream connect timed out")
        elif failure.check(SSL.Error, VerificationError, UpstreamTLSError):
            self._fail(502, "upstream_tls_failed", f"upstream TLS: {failure.getErrorMessage()}")
        elif failure.check(ConnectError):
            self._fail(502, "upstream_refused", failure.getErrorMessage())
        else:
            self._fail(502, "upstream_refused", failure.getErrorMessage())

    def _use(self, upstream: UpstreamProtocol) -> None:
        self.connecting = None
        if self.done:
            upstream.release()
            return
        self.upstream = upstream
        self.conn.attach_upstream(upstream)
        req = self.req
        target = self.path
        if self.params:
            target = f"{target}?{urlencode(self.params)}"
        lines = [
            b"%s %s HTTP/1.1\r\nHost: %s\r\n"
            % (req.method, target.encode("ascii"), self.target.address.encode("ascii"))
        ]
        headers = req.headers
        for lname, name in _PASS_HEADERS:
            value = headers.get(lname)
            if value is not None:
                lines.append(name + b": " + value + b"\r\n")
        auth = self.route.upstream_auth
        if auth is not None:
            lines.append(auth.header)  # the route's own credentials, never the client's
        lines.append(b"\r\n")
        self.upstream_start = self.gw.clock.seconds()
        upstream.send(
            self,
            b"".join(lines),
            head_only=req.method == b"HEAD",
            max_body=self.route.max_response_size,
        )

    # -- UpstreamHandler -------------------------------------------------------------------

    def upstream_head(
        self, status: int, reason: bytes, headers: bytes, framing: int, length: int
    ) -> None:
        self.status = status
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason), headers]
        if framing == LENGTH:
            parts.append(b"Content-Length: %d\r\n" % length)
        elif framing in (CHUNKED, CLOSE):
            if self.client11:
                # Chunks of the gateway's own: one per upstream read.
                parts.append(b"Transfer-Encoding: chunked\r\n")
                self.wrap_chunks = True
            else:
                self.keep_alive = False
                self.close_delimited = True
        parts.append(
            b"Connection: keep-alive\r\n\r\n" if self.keep_alive else b"Connection: close\r\n\r\n"
        )
        data = b"".join(parts)
        self.head_sent = True
        self.bytes_out += len(data)
        self.conn.send(data)

    def upstream_data(self, data: bytes) -> None:
        if self.wrap_chunks:
            if data:
                size = b"%x\r\n" % len(data)
                self.bytes_out += len(size) + len(data) + 2
                self.conn.send_sequence((size, data, b"\r\n"))
        else:
            self.bytes_out += len(data)
            self.conn.send(data)

    def upstream_chunked(self, pieces: list[memoryview], size: int) -> None:
        """Decoded payload of a chunked upstream body: one chunk of our own for an
        HTTP/1.1 client (framing and payload copied once, into one write), the bare
        payload for an HTTP/1.0 client."""
        if self.wrap_chunks:
            data = b"".join((b"%x\r\n" % size, *pieces, b"\r\n"))
        else:
            data = b"".join(pieces)
        self.bytes_out += len(data)
        self.conn.send(data)

    def upstream_done(self) -> None:
        if self.wrap_chunks:
            self.conn.send(b"0\r\n\r\n")
            self.bytes_out += 5
        self._finish(self.status, "ok", "allow", upstream_ok=True)

    def upstream_failed(self, reason: str, detail: str, retryable: bool) -> None:
        if self.done:
            return
        if retryable and not self.retried and not self.head_sent:
            self.retried = True
            self.conn.detach_upstream()
            self.upstream = None
            self._connect()
            return
        self._fail(504 if reason == "upstream_timeout" else 502, reason, detail)

    # -- endings ---------------------------------------------------------------------------

    def _timed_out(self) -> None:
        self.deadline = None
        connecting = self.connecting
        # Answer first: whatever error cancelling a connect attempt raises, the client
        # gets its 504 and the cancellation finds the exchange already done.
        self._fail(504, "upstream_timeout", "no complete response within the scrape timeout")
        if connecting is not None:
            connecting.cancel()

    def _fail(self, status: int, reason: str, detail: str) -> None:
        if self.done:
            return
        self.gw.metrics.upstream_errors.labels(self.route.name, reason).inc()
        self.gw.log.info(
            "route {route} target {target}: {reason} ({detail})",
            route=self.route.name,
            target=self.target.address,
            reason=reason,
            detail=detail,
        )
        if self.head_sent:
            # The client already has a status line: it must see an incomplete response,
            # never a clean end.
            self.keep_alive = False
            self._finish(self.status, reason, "allow", abort_client=True, detail=detail)
        else:
            # The caller learns what happened; the audit record and the log say why.
            self.status = status
            data = simple_response(
                status,
                refusal_body(status, reason),
                keep_alive=self.keep_alive,
                head_only=self.req.method == b"HEAD",
            )
            self.bytes_out += len(data)
            self.conn.send(data)
            self._finish(status, reason, "allow", detail=detail)

    def client_lost(self, reason: str = "client_aborted") -> None:
        """The downstream connection went away mid-exchange."""
        if self.connecting is not None:
            self.connecting.cancel()
        self.keep_alive = False
        self._finish(self.status, reason, "allow", client_gone=True)

    def _finish(
        self,
        status: int | None,
        reason: str,
        decision: str,
        *,
        upstream_ok: bool = False,
        abort_client: bool = False,
        client_gone: bool = False,
        detail: str | None = None,
    ) -> None:
        if self.done:
            return
        self.done = True
        gw = self.gw
        gw.in_flight.end()
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None
        gw.limiter.release(self.route.name)
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            self.conn.detach_upstream()
            if upstream_ok:
                gw.metrics.route(gw.name, self.route.name).upstream_duration.observe(
                    gw.clock.seconds() - self.upstream_start
                )
                upstream.release()
            else:
                upstream.abort()
        gw.record(
            self.conn,
            self.req,
            self.start_time,
            status,
            reason,
            decision,
            route=self.route,
            target=self.target.address,
            path=self.path,
            bytes_out=self.bytes_out,
            detail=detail,
            recognition=self.recognition,
        )
        if client_gone:
            return
        if abort_client:
            if self.close_delimited or reason == "upstream_malformed":
                # Only a reset can tell this client that its body was cut short; and
                # after bytes the gateway could not parse, nothing more goes out at all.
                self.conn.abort()
            else:
                # The framing (a Content-Length not reached, no last chunk) shows the cut:
                # deliver the status line and the bytes already relayed, then close.
                self.conn.close_truncated()
            return
        self.conn.request_done(self.keep_alive)


@implementer(IHandshakeListener, IHalfCloseableProtocol, IPushProducer)
class DownstreamProtocol(Protocol):
    """One client connection to an ``http`` listener; a thin shell over ReverseGateway."""

    log = Logger()

    def __init__(self, gw: ReverseGateway) -> None:
        self.gw = gw
        self.peer = ""
        self.local_address = ""
        self.tls_info = NO_TLS
        self.recognition = Recognition(None, "no_credentials")
        self._buf = b""
        self._exchange: ClientRelay | None = None
        self._upstream: UpstreamProtocol | None = None
        self._timer: IDelayedCall | None = None
        self._timer_kind = ""
        self._ready = False
        self._closing = False
        self._lost = False
        self._output_paused = False
        self._verify_error: tuple[str, PeerCertificate | None] | None = None
        self._handshake_timed_out = False
        self._processing = False
        self._shutdown = False
        self._reading_paused = False
        #: The client half-closed (plain TCP only): answer what it sent, then close.
        self._read_closed = False
        #: The request whose credentials are being checked (bcrypt, in a thread), if any.
        self._authenticating: tuple[RequestHead, float] | None = None
        self._check: Deferred[Recognition] | None = None
        #: Answers written so far: a connection that has had one is closed, not cut, at
        #: shutdown, so that its last one is delivered.
        self._answers = 0

    # -- Twisted callbacks ---------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer = peer_address(self.transport.getPeer())
        self.local_address = peer_address(self.transport.getHost())
        self.gw.connections.inc()
        self.gw.open_connections.inc()
        self.gw.open.add(self)
        no_delay(self.transport)
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        if self.gw.tls:
            self._arm(self.gw.deadlines.tls_handshake, "handshake")
        else:
            self.recognition = self.gw.authenticator.for_connection(None)
            self._became_ready()

    def handshakeCompleted(self) -> None:
        assert self.transport is not None
        handle: SSL.Connection = self.transport.getHandle()  # type: ignore[attr-defined]
        cert = handle.get_peer_certificate(as_cryptography=True)
        peer = PeerCertificate.from_x509(cert) if cert is not None else None
        self.tls_info = TLSInfo(handle.get_protocol_version_name(), handle.get_cipher_name(), peer)
        self.recognition = self.gw.authenticator.for_connection(peer)
        self._became_ready()

    def tls_verify_error(self, errno: int, depth: int, cert: x509.Certificate) -> None:
        """Called by the TLS layer for each certificate that fails verification."""
        if self._verify_error is None:
            self._verify_error = (verify_reason(errno), PeerCertificate.from_x509(cert))

    def dataReceived(self, data: bytes) -> None:
        if self._exchange is not None or self._closing or self._authenticating is not None:
            # Pipelined (or post-close) bytes wait; stop reading only if they pile up, so
            # the usual one-request-at-a-time client costs no pause/resume syscalls.
            self._buf += data
            if len(self._buf) > MAX_HEAD and not self._reading_paused and not self._closing:
                self._reading_paused = True
                assert self.transport is not None
                self.transport.pauseProducing()  # type: ignore[attr-defined]
            if len(self._buf) > 4 * MAX_HEAD:
                self.abort()
            return
        if not self._buf and self._timer_kind == "idle":
            self._arm(self.gw.deadlines.request_head, "head")
        self._buf = self._buf + data if self._buf else data
        self._process()

    def readConnectionLost(self) -> None:
        """The client sent a FIN but still reads (``printf ... | nc -N``): the requests it
        already sent are answered, then the connection is closed. Over TLS the TLS layer
        ends the whole connection instead, and connectionLost follows."""
        if self._read_closed or self._lost:
            return
        self._read_closed = True
        if self._exchange is None and self._authenticating is None and not self._closing:
            self._process()  # nothing complete is left: ends with _end_half_closed

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._cancel_timer()
        self.gw.open_connections.dec()
        self.gw.open.discard(self)
        if not self._ready and self.gw.tls:
            self._report_handshake_failure(reason)
        elif self._exchange is not None:
            exchange, self._exchange = self._exchange, None
            exchange.client_lost("gateway_shutdown" if self._shutdown else "client_aborted")
        elif self._authenticating is not None:
            # Audited now, not when the check ends: the audit log may be closing.
            req, start = self._authenticating
            self._authenticating = None
            self.gw.record(
                self,
                req,
                start,
                None,
                "gateway_shutdown" if self._shutdown else "client_aborted",
                "deny",
                detail="connection lost while credentials were being checked",
                recognition=_UNCHECKED,
            )
            # A check that has not started yet is dropped: nobody waits for its answer.
            check, self._check = self._check, None
            if check is not None:
                check.cancel()
        elif self._buf.strip() and (not self._closing or self._shutdown):
            self.gw.record(
                self,
                None,
                self.gw.clock.seconds(),
                None,
                "gateway_shutdown" if self._shutdown else "client_closed_mid_request",
                "deny",
                path=None,
            )

    # -- IPushProducer: the client's socket tells us to slow down or go on ----------------

    def pauseProducing(self) -> None:
        self._output_paused = True
        if self._upstream is not None:
            self._upstream.pause()

    def resumeProducing(self) -> None:
        self._output_paused = False
        if self._upstream is not None:
            self._upstream.resume()

    def stopProducing(self) -> None:
        pass  # connectionLost follows and ends any exchange

    # -- used by the gateway and the exchange ---------------------------------------------

    def send(self, data: bytes) -> None:
        if not self._lost:
            assert self.transport is not None
            self.transport.write(data)

    def send_sequence(self, data: tuple[bytes, ...]) -> None:
        if not self._lost:
            assert self.transport is not None
            self.transport.writeSequence(data)

    def begin_exchange(self, exchange: ClientRelay) -> None:
        self._exchange = exchange

    def begin_authentication(
        self, req: RequestHead, start: float, check: Deferred[Recognition] | None = None
    ) -> None:
        """Credentials of ``req`` are being checked: read no further request meanwhile.
        ``check`` is cancelled if the connection is lost first."""
        self._authenticating = (req, start)
        self._check = check

    def end_authentication(self) -> bool:
        """The check is over; False if the connection was lost meanwhile (and audited)."""
        self._check = None
        if self._authenticating is None:
            return False
        self._authenticating = None
        return not self._lost

    def attach_upstream(self, upstream: UpstreamProtocol) -> None:
        self._upstream = upstream
        if self._output_paused:
            upstream.pause()

    def detach_upstream(self) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None and self._output_paused:
            upstream.resume()

    def request_done(self, keep_alive: bool) -> None:
        """The answer to the current request is written; read the next one or close."""
        if self._lost:
            return
        self._exchange = None
        self._answers += 1
        assert self.transport is not None
        if not keep_alive or self.gw.phase is Phase.DRAINING:
            self._close()
            return
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        if self._buf:
            self._arm(self.gw.deadlines.request_head, "head")
            # A pipelined request is already here: serve it now, unless _process (further
            # up the stack, answering synchronously) is about to.
            if not self._processing:
                self._process()
        elif self._read_closed:
            self._close()
        else:
            self._arm(self.gw.deadlines.keepalive_idle, "idle")

    def close_truncated(self) -> None:
        """End a response that was cut short, once what was written has been sent.

        An abort would throw away the status line and the bytes already relayed (which the
        audit record counts), leaving the client with no response at all.
        """
        if not self._lost and self.transport is not None:
            self._exchange = None
            self._close()

    def close_if_idle(self) -> None:
        """Close now (once what was written is sent) if waiting for a next request after
        an answer. One that has had none stays until the drain ends, then is cut."""
        if self._idle() and self._answers and not self._closing:
            self._close()

    def shut_down(self) -> None:
        """The gateway is stopping: close this connection once its answers are sent, or
        cut it, auditing what that interrupts (a request in flight or half-received, a
        handshake, a tunnel); one that never had an answer has nothing to deliver."""
        self._shutdown = True
        if self._closing:
            return  # closing already, once its last answer is sent
        if self._idle() and self._answers:
            self._close()
        else:
            self.abort()

    def _idle(self) -> bool:
        """Between requests: every answer written, nothing of a next request read."""
        return (
            self._ready
            and self._exchange is None
            and self._authenticating is None
            and not self._buf.strip()
            and not self._lost
        )

    def abort(self) -> None:
        if not self._lost and self.transport is not None:
            self._closing = True
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- internals -------------------------------------------------------------------------

    def _became_ready(self) -> None:
        self._ready = True
        self._arm(self.gw.deadlines.request_head, "head")
        if self._buf:
            self._process()

    def _process(self) -> None:
        self._processing = True
        try:
            self._process_buffer()
        finally:
            self._processing = False
        if (
            self._read_closed
            and self._exchange is None
            and self._authenticating is None
            and not self._closing
            and not self._lost
        ):
            self._end_half_closed()

    def _end_half_closed(self) -> None:
        """The client half-closed and every complete request is answered: close, auditing
        an unfinished request head (no more of it can come)."""
        if self._buf.strip():
            self.gw.record(
                self,
                None,
                self.gw.clock.seconds(),
                None,
                "client_closed_mid_request",
                "deny",
                path=None,
            )
        self._buf = b""
        self._close()

    def _process_buffer(self) -> None:
        while (
            self._exchange is None
            and self._authenticating is None
            and not self._closing
            and not self._lost
        ):
            buf = self._buf
            if buf[:2] == b"\r\n":
                buf = self._buf = buf.lstrip(b"\r\n")
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._reject(HTTPError(431, "bad_request", "request head too large"))
                elif len(buf) > MAX_REQUEST_LINE and buf.find(b"\r\n") < 0:
                    self._reject(HTTPError(414, "bad_request", "request line too long"))
                elif b"\n\n" in buf:
                    self._reject(HTTPError(400, "bad_request", "bare LF line endings"))
                return
            head = buf[:end]
            self._buf = buf[end + 4 :]
            try:
                req = parse_request_head(head)
            except HTTPError as e:
                self._reject(e)
                return
            self._cancel_timer()
            self.gw.handle(self, req)

    def _reject(self, error: HTTPError) -> None:
        self._buf = b""
        self.gw.metrics.denied.labels(self.gw.name, "", error.reason).inc()
        self.gw.answer(
            self,
            None,
            self.gw.clock.seconds(),
            error.status,
            error.reason,
            refusal_body(error.status, error.reason),
            decision="deny",
            detail=error.message,
        )

    def _close(self) -> None:
        """Close once what was written has been sent (over TLS, with a close_notify).

        The producer registration goes first: TLSMemoryBIOProtocol.loseConnection does
        not shut down while a producer is registered. Reading resumes (an exchange paused
        it), because over TLS the close completes only when the client's close_notify or
        FIN is read; anything else that arrives is dropped. A client that never finishes
        the close is cut off after the keep-alive idle deadline.
        """
        self._closing = True
        assert self.transport is not None
        self.transport.unregisterProducer()  # type: ignore[attr-defined]
        self._reading_paused = False
        self.transport.resumeProducing()  # type: ignore[attr-defined]
        self.transport.loseConnection()
        self._arm(self.gw.deadlines.keepalive_idle, "closing")

    def _arm(self, seconds: float, kind: str) -> None:
        self._timer_kind = kind
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(seconds)
        else:
            self._timer = self.gw.clock.callLater(seconds, self._expired)

    def _cancel_timer(self) -> None:
        timer = self._timer
        self._timer = None
        self._timer_kind = ""
        if timer is not None and timer.active():
            timer.cancel()

    def _expired(self) -> None:
        kind = self._timer_kind
        self._timer = None
        self._timer_kind = ""
        if kind == "handshake":
            self._handshake_timed_out = True
            self.abort()
        elif kind == "closing":
            self.abort()
        elif kind == "head" and self._buf.strip():
            self.gw.answer(
                self,
                None,
                self.gw.clock.seconds(),
                408,
                "request_timeout",
                refusal_body(408, "request_timeout"),
                decision="deny",
                detail="request head not received in time",
            )
        else:
            self._close()

    def _report_handshake_failure(self, reason: Failure) -> None:
        self.gw.handshake_failed(
            self,
            *classify_handshake_failure(
                reason,
                shutdown=self._shutdown,
                timed_out=self._handshake_timed_out,
                verify_error=self._verify_error,
            ),
        )


class ReverseGatewayFactory(Factory):
    """Builds a DownstreamProtocol per connection for one ``http`` listener."""

    noisy = False

    def __init__(self, gateway: ReverseGateway) -> None:
        self.gateway = gateway

    def buildProtocol(self, addr: Any) -> DownstreamProtocol:
        return DownstreamProtocol(self.gateway)


__all__ = ["Admission", "DownstreamProtocol", "Exchange", "ReverseGateway", "ReverseGatewayFactory"]
