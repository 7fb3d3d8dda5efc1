"""One request relayed from a pooled upstream connection to a downstream client, with
back-pressure both ways; the reverse gateway's scrapes and the forward proxy's
absolute-form requests alike."""

from __future__ import annotations

from urllib.parse import urlencode

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from promgate.config.model import Route, Target
from promgate.core.admission import Ticket
from promgate.core.context import Outcome, RequestContext, Verdict
from promgate.core.reasons import Reason
from promgate.http.listener import ClientConnection, HTTPListener
from promgate.http.refusals import refusal_body
from promgate.http.upstream import CHUNKED, CLOSE, LENGTH, UpstreamProtocol
from promgate.http.wire import RequestHead, simple_response
from promgate.net.connector import connect_failure

_PASS_HEADERS = (
    (b"accept", b"Accept"),
    (b"accept-encoding", b"Accept-Encoding"),
    (b"user-agent", b"User-Agent"),
    (b"x-prometheus-scrape-timeout-seconds", b"X-Prometheus-Scrape-Timeout-Seconds"),
)
_MAX_TIMEOUT = 600.0
#: The gateway answers a little before Prometheus gives up, so its 504 is what gets seen.
_TIMEOUT_MARGIN = 0.25


def admit_and_relay(
    listener: HTTPListener,
    conn: ClientConnection,
    req: RequestHead,
    ctx: RequestContext,
    route: Route,
    target: Target,
    upstream_path: str,
    params: tuple[tuple[str, str], ...],
) -> None:
    """Admit a request policy allowed, and relay it once admitted: at once, or when the
    shared limits answer. A refusal has been answered by ``listener.admit`` itself."""
    ticket = listener.admit(conn, req, ctx, route, target)

    def relay(admitted: Ticket | None) -> None:
        if admitted is not None:
            Exchange(
                listener, conn, req, ctx, route, target, upstream_path, params, admitted
            ).start()

    if isinstance(ticket, Ticket):
        relay(ticket)
    elif ticket is not None:
        ticket.addCallback(relay)


class Exchange:
    """One request relayed from a pooled upstream connection to a downstream client."""

    log = Logger()

    def __init__(
        self,
        listener: HTTPListener,
        conn: ClientConnection,
        req: RequestHead,
        ctx: RequestContext,
        route: Route,
        target: Target,
        upstream_path: str,
        params: tuple[tuple[str, str], ...],
        ticket: Ticket,
    ) -> None:
        self.listener = listener
        self.conn = conn
        self.req = req
        self.ctx = ctx
        self.route = route
        self.target = target
        self.path = upstream_path
        self.params = params
        self.ticket = ticket
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
        listener = self.listener
        listener.in_flight.begin()
        self.conn.begin_exchange(self)
        self.deadline = listener.clock.callLater(self._timeout_seconds(), self._timed_out)
        upstream = listener.pool.checkout(self.route, self.target)
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
        d = self.listener.pool.connect(self.route, self.target)
        self.connecting = d
        d.addCallbacks(self._use, self._connect_failed)

    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        if self.done or failure.check(ConnectingCancelledError):
            return
        reason, detail = connect_failure(failure)
        self._fail(504 if reason is Reason.UPSTREAM_TIMEOUT else 502, reason, detail)

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
        self.upstream_start = self.listener.clock.seconds()
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
        self._finish(self.status, Reason.OK, upstream_ok=True)

    def upstream_failed(self, reason: str, detail: str, retryable: bool) -> None:
        if self.done:
            return
        if retryable and not self.retried and not self.head_sent:
            self.retried = True
            self.conn.detach_upstream()
            self.upstream = None
            self._connect()
            return
        self._fail(504 if reason == Reason.UPSTREAM_TIMEOUT else 502, reason, detail)

    # -- endings ---------------------------------------------------------------------------

    def _timed_out(self) -> None:
        self.deadline = None
        connecting = self.connecting
        # Answer first: whatever error cancelling a connect attempt raises, the client
        # gets its 504 and the cancellation finds the exchange already done.
        self._fail(504, Reason.UPSTREAM_TIMEOUT, "no complete response within the scrape timeout")
        if connecting is not None:
            connecting.cancel()

    def _fail(self, status: int, reason: str, detail: str) -> None:
        if self.done:
            return
        listener = self.listener
        listener.metrics.upstream_errors.labels(self.route.name, reason).inc()
        listener.log.info(
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
            self._finish(self.status, reason, abort_client=True, detail=detail)
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
            self._finish(status, reason, detail=detail)

    def client_lost(self, reason: str = Reason.CLIENT_ABORTED) -> None:
        """The downstream connection went away mid-exchange."""
        if self.connecting is not None:
            self.connecting.cancel()
        self.keep_alive = False
        self._finish(self.status, reason, client_gone=True)

    def _finish(
        self,
        status: int | None,
        reason: str,
        *,
        upstream_ok: bool = False,
        abort_client: bool = False,
        client_gone: bool = False,
        detail: str | None = None,
    ) -> None:
        if self.done:
            return
        self.done = True
        listener = self.listener
        listener.in_flight.end()
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None
        self.ticket.release()
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            self.conn.detach_upstream()
            if upstream_ok:
                listener.metrics.route(listener.name, self.route.name).upstream_duration.observe(
                    listener.clock.seconds() - self.upstream_start
                )
                upstream.release()
            else:
                upstream.abort()
        decision: Verdict = "allow"
        listener.record(
            self.ctx,
            Outcome(
                decision,
                reason,
                status,
                self.route.name,
                self.target.address,
                self.path,
                bytes_out=self.bytes_out,
                detail=detail,
            ),
        )
        if client_gone:
            return
        if abort_client:
            if self.close_delimited or reason == Reason.UPSTREAM_MALFORMED:
                # Only a reset can tell this client that its body was cut short; and
                # after bytes the gateway could not parse, nothing more goes out at all.
                self.conn.abort()
            else:
                # The framing (a Content-Length not reached, no last chunk) shows the cut:
                # deliver the status line and the bytes already relayed, then close.
                self.conn.close_truncated()
            return
        self.conn.request_done(self.keep_alive)


__all__ = ["Exchange"]
