"""Upstream HTTP/1.1 connections: a lean relay that tracks response framing.

The gateway does not run a general-purpose HTTP client between Prometheus and the
exporter. It sends a request head it built itself, parses the response head strictly,
and then follows the body's framing: a Content-Length or close-delimited body passes
through untouched; a chunked body is decoded strictly (promgate.http.chunked) and only
its payload is handed on, for the relay to frame again. Nothing of the upstream's framing
that was not understood reaches the client. The size cap counts payload bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import Enum
from typing import Any
from typing import Protocol as TypingProtocol

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import (
    wrapClientTLS,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from promgate.config.model import Route, Target
from promgate.http.chunked import ChunkedDecoder, ChunkedError
from promgate.http.wire import connection_tokens
from promgate.net.connector import endpoint_for, no_delay
from promgate.reactors import IConnectReactor
from promgate.tls import UpstreamTLSError, client_options

MAX_RESPONSE_HEAD = 64 * 1024
MAX_RESPONSE_HEADERS = 100
#: A Content-Length of more digits than this is refused (the cap is far below it anyway).
MAX_LENGTH_DIGITS = 18

# Framing of a response body.
LENGTH = 0
CHUNKED = 1
CLOSE = 2
NONE = 3

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"set-cookie",
    }
)
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([^\r\n]*))?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class UpstreamState(Enum):
    """Where an upstream connection is in an exchange. No deadline of its own: the
    exchange's (the scrape timeout) covers the head and the body, and the pool's idle
    timeout covers a pooled connection."""

    #: No exchange, or the last one's response complete: pooled or closed.
    IDLE = "idle"
    #: A request sent; reading the response head.
    HEAD = "head"
    #: Reading the response body, by its framing.
    BODY = "body"


# Module names for the per-read checks of the hot path.
_IDLE = UpstreamState.IDLE
_HEAD = UpstreamState.HEAD
_BODY = UpstreamState.BODY


class UpstreamHandler(TypingProtocol):
    """What an upstream connection reports to the exchange using it."""

    def upstream_head(
        self, status: int, reason: bytes, headers: bytes, framing: int, length: int
    ) -> None: ...

    def upstream_data(self, data: bytes) -> None: ...

    def upstream_chunked(self, pieces: list[memoryview], size: int) -> None:
        """Payload of a chunked body, decoded: ``size`` bytes in ``pieces`` (slices of
        one read, valid only during the call)."""

    def upstream_done(self) -> None: ...

    def upstream_failed(self, reason: str, detail: str, retryable: bool) -> None: ...


class UpstreamProtocol(Protocol):
    """One connection to an upstream, used for one exchange at a time."""

    log = Logger()

    def __init__(self, pool: UpstreamPool, key: tuple[str, str]) -> None:
        self.pool = pool
        self.key = key
        self.reused = False
        self.idle_since = 0.0
        self.connected = False
        self._handler: UpstreamHandler | None = None
        self._state = _IDLE
        self._buf = b""
        self._framing = NONE
        self._remaining = 0
        self._payload = 0
        self._max = 0
        self._chunks = ChunkedDecoder()
        self._reusable = False
        self._head_only = False
        self._aborted = False

    # -- used by the exchange -------------------------------------------------------------

    def send(
        self,
        handler: UpstreamHandler,
        request: bytes,
        *,
        head_only: bool,
        max_body: int,
    ) -> None:
        """Send ``request`` and report the response to ``handler``."""
        self._handler = handler
        self._state = _HEAD
        self._buf = b""
        self._payload = 0
        self._max = max_body
        self._head_only = head_only
        self._reusable = False
        assert self.transport is not None
        self.transport.write(request)

    def release(self) -> None:
        """The exchange is over; pool the connection if it is clean, else close it."""
        self._handler = None
        if self._state is _IDLE and self._reusable and self.connected:
            self.pool.checkin(self)
        else:
            self._state = _IDLE
            self.abort()

    def abort(self) -> None:
        self._handler = None
        if self.transport is not None and self.connected and not self._aborted:
            self._aborted = True
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    # -- Twisted callbacks ------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state is _BODY:
            self._body(data)
        elif state is _HEAD:
            self._head(data)
        else:
            # Bytes nobody asked for: this connection can no longer be trusted.
            self._reusable = False
            self.pool.discard(self)
            self.abort()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.connected = False
        handler = self._handler
        self._handler = None
        self.pool.discard(self)
        if handler is None:
            return
        clean = reason.check(ConnectionDone) is not None
        if self._state is _BODY and self._framing == CLOSE and clean:
            self._state = _IDLE
            self._reusable = False
            handler.upstream_done()
            return
        if self._state is _HEAD and not self._buf and self.reused:
            handler.upstream_failed("upstream_reset", "pooled connection closed", True)
            return
        if reason.check(SSL.Error, VerificationError) is not None:
            handler.upstream_failed(
                "upstream_tls_failed", f"upstream TLS: {reason.getErrorMessage()}", False
            )
            return
        what = "closed" if clean else "reset"
        where = "before the response head" if self._state is _HEAD else "mid-body"
        handler.upstream_failed("upstream_reset", f"upstream {what} the connection {where}", False)

    # -- parsing ----------------------------------------------------------------------------

    def _fail(self, reason: str, detail: str) -> None:
        handler = self._handler
        self._handler = None
        self._state = _IDLE
        self._reusable = False
        self.abort()
        if handler is not None:
            handler.upstream_failed(reason, detail, False)

    def _head(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_RESPONSE_HEAD:
                    self._fail("upstream_malformed", "response head too large")
                else:
                    self._buf = buf
                return
            head, buf = buf[:end], buf[end + 4 :]
            if not self._parse_head(head, bool(buf)):
                return
            if self._state is not _HEAD:  # a final (non-1xx) response
                self._buf = b""
                if self._state is _BODY and buf:
                    self._body(buf)
                return

    def _parse_head(self, head: bytes, more: bool) -> bool:
        lines = head.split(b"\r\n")
        match = _STATUS_LINE.fullmatch(lines[0])
        if match is None:
            self._fail("upstream_malformed", f"malformed status line {_show(lines[0])}")
            return False
        minor, code, reason = match.group(1), int(match.group(2)), match.group(3) or b""
        if _BAD_VALUE.search(reason):
            self._fail("upstream_malformed", "control character in the status line")
            return False
        if len(lines) - 1 > MAX_RESPONSE_HEADERS:
            self._fail("upstream_malformed", "too many response header fields")
            return False
        if code == 101:
            self._fail("upstream_malformed", "upstream tried to switch protocols")
            return False
        keep: list[bytes] = []
        nominated: frozenset[bytes] = frozenset()  # names Connection makes hop-by-hop
        length: int | None = None
        chunked = False
        close = minor == b"0"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.fullmatch(name):
                self._fail("upstream_malformed", f"malformed response header field {_show(line)}")
                return False
            if _BAD_VALUE.search(value):
                self._fail(
                    "upstream_malformed", f"control character in response header {_show(name)}"
                )
                return False
            lname = name.lower()
            if lname in _HOP_BY_HOP:
                value = value.strip(b" \t")
                if lname == b"content-length":
                    if length is not None:
                        self._fail("upstream_malformed", "more than one Content-Length")
                        return False
                    if not value.isdigit() or len(value) > MAX_LENGTH_DIGITS:
                        self._fail("upstream_malformed", f"invalid Content-Length {_show(value)}")
                        return False
                    length = int(value)
                elif lname == b"transfer-encoding":
                    if chunked:
                        self._fail("upstream_malformed", "more than one Transfer-Encoding")
                        return False
                    if value.lower() != b"chunked":
                        self._fail(
                            "upstream_malformed",
                            f"unsupported Transfer-Encoding {_show(value)} (only chunked)",
                        )
                        return False
                    chunked = True
                elif lname == b"connection":
                    tokens = connection_tokens(value)
                    nominated |= tokens
                    if b"close" in tokens:
                        close = True
                    elif minor == b"0" and b"keep-alive" in tokens:
                        close = False
                continue
            keep.append(line)
        if code < 200:
            return True  # an interim response, checked and dropped: wait for the final one
        nominated -= {b"close", b"keep-alive"}
        if nominated:
            keep = [line for line in keep if line.partition(b":")[0].lower() not in nominated]
        if chunked and length is not None:
            self._fail("upstream_malformed", "both Content-Length and Transfer-Encoding")
            return False
        if self._head_only or code in (204, 304):
            framing, self._remaining = NONE, 0
            if self._head_only and length is not None:
                keep.append(b"Content-Length: %d" % length)
        elif chunked:
            framing = CHUNKED
            self._chunks = ChunkedDecoder()
        elif length is not None:
            if length > self._max:
                self._fail("response_too_large", f"Content-Length {length} over the route's cap")
                return False
            framing, self._remaining = LENGTH, length
        else:
            framing, close = CLOSE, True
        self._framing = framing
        headers = b"\r\n".join(keep) + b"\r\n" if keep else b""
        handler = self._handler
        if handler is None:
            return False
        if framing == NONE or (framing == LENGTH and length == 0):
            self._state = _IDLE
            self._reusable = not close and not more
            handler.upstream_head(code, reason, headers, framing, length or 0)
            if self._handler is handler:
                handler.upstream_done()
            return True
        self._state = _BODY
        self._reusable = not close
        handler.upstream_head(code, reason, headers, framing, length or 0)
        return True

    def _body(self, data: bytes) -> None:
        framing = self._framing
        handler = self._handler
        if handler is None:
            return
        if framing == LENGTH:
            remaining = self._remaining
            if len(data) >= remaining:
                if len(data) > remaining:
                    self._reusable = False
                    data = data[:remaining]
                self._remaining = 0
                self._state = _IDLE
                handler.upstream_data(data)
                if self._handler is handler:
                    handler.upstream_done()
            else:
                self._remaining = remaining - len(data)
                handler.upstream_data(data)
        elif framing == CHUNKED:
            self._chunked(data, handler)
        else:
            self._payload += len(data)
            if self._payload > self._max:
                self._fail("response_too_large", "body over the route's size cap")
                return
            handler.upstream_data(data)

    def _chunked(self, data: bytes, handler: UpstreamHandler) -> None:
        decoder = self._chunks
        try:
            pieces = decoder.feed(data)
        except ChunkedError as e:
            self._fail("upstream_malformed", f"chunked body: {e}")
            return
        if pieces:
            size = len(pieces[0]) if len(pieces) == 1 else sum(map(len, pieces))
            self._payload += size
            if self._payload > self._max:
                self._fail("response_too_large", "body over the route's size cap")
                return
            handler.upstream_chunked(pieces, size)
            if self._handler is not handler:
                return
        if decoder.done:
            if decoder.excess:
                self._reusable = False  # bytes nobody asked for
            self._state = _IDLE
            handler.upstream_done()


class UpstreamPool:
    """Keep-alive connections to upstreams, per route and target, reused most-recent first."""

    log = Logger()

    def __init__(
        self,
        reactor: IConnectReactor,
        *,
        connect_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        max_idle_per_key: int = 256,
        on_connect: Callable[[str], None] | None = None,
    ) -> None:
        self._reactor = reactor

        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle_per_key
        self._idle: dict[tuple[str, str], list[UpstreamProtocol]] = {}
        self._on_connect = on_connect
        self._sweeper: LoopingCall | None = None

    def start(self) -> None:
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = self._reactor
        self._sweeper.start(max(1.0, self._idle_timeout / 4), now=False)

    def stop(self) -> None:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        for conns in list(self._idle.values()):
            for conn in list(conns):
                conn.abort()
        self._idle.clear()

    def checkout(self, route: Route, target: Target) -> UpstreamProtocol | None:
        """An idle pooled connection for this route and target, if there is one."""
        conns = self._idle.get((route.name, target.address))
        while conns:
            conn = conns.pop()
            if conn.connected:
                conn.reused = True
                return conn
        return None

    def connect(self, route: Route, target: Target) -> Deferred[UpstreamProtocol]:
        """Open a new connection to ``target`` for ``route``."""
        key = (route.name, target.address)
        endpoint: Any = endpoint_for(self._reactor, target, self._connect_timeout)
        if route.scheme == "https":
            try:
                creator = client_options(target.host, route.upstream_tls)
            except UpstreamTLSError as e:
                return fail(e)
            endpoint = wrapClientTLS(creator, endpoint, clock=self._reactor)
        if self._on_connect is not None:
            self._on_connect(route.name)
        d: Deferred[UpstreamProtocol] = endpoint.connect(_UpstreamFactory(self, key))
        return d

    def checkin(self, conn: UpstreamProtocol) -> None:
        conns = self._idle.setdefault(conn.key, [])
        if len(conns) >= self._max_idle:
            conn.abort()
            return
        conn.idle_since = self._reactor.seconds()
        conns.append(conn)

    def discard(self, conn: UpstreamProtocol) -> None:
        conns = self._idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    def idle_count(self) -> int:
        return sum(len(c) for c in self._idle.values())

    def _sweep(self) -> None:
        cutoff = self._reactor.seconds() - self._idle_timeout
        for key, conns in list(self._idle.items()):
            for conn in [c for c in conns if c.idle_since < cutoff]:
                conns.remove(conn)
                conn.abort()
            if not conns:
                del self._idle[key]


def _show(data: bytes) -> str:
    """Upstream bytes for an audit record's detail: escaped, at most 64 bytes of them."""
    text = repr(data[:64])[1:]
    return text + "..." if len(data) > 64 else text


class _UpstreamFactory(Factory):
    noisy = False

    def __init__(self, pool: UpstreamPool, key: tuple[str, str]) -> None:
        self._pool = pool
        self._key = key

    def buildProtocol(self, addr: object) -> UpstreamProtocol:
        return UpstreamProtocol(self._pool, self._key)


__all__ = [
    "CHUNKED",
    "CLOSE",
    "LENGTH",
    "NONE",
    "ITransport",
    "UpstreamHandler",
    "UpstreamPool",
    "UpstreamProtocol",
]
