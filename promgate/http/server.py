"""A client connection to an HTTP listener (``http`` or ``forward``)."""

from __future__ import annotations

from typing import Any
from typing import Protocol as TypingProtocol

from cryptography import x509
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from promgate.addresses import peer_address
from promgate.core.context import NO_TLS, ConnectionInfo, Outcome
from promgate.core.reasons import Reason
from promgate.drain import Phase
from promgate.http.listener import HTTPListener
from promgate.http.refusals import refusal_body
from promgate.http.states import READING, TICK, State
from promgate.http.upstream import UpstreamProtocol
from promgate.http.wire import (
    MAX_HEAD,
    MAX_REQUEST_LINE,
    HTTPError,
    RequestHead,
    parse_request_head,
)
from promgate.identity import Recognition
from promgate.net.connector import no_delay
from promgate.net.handshake import classify_handshake_failure, tls_info
from promgate.net.tls_buffers import release_idle_buffers
from promgate.tls import PeerCertificate, verify_reason


class ClientRelay(TypingProtocol):
    """What holds a downstream connection while a request is relayed (an ``Exchange``).
    No request is read meanwhile."""

    def client_lost(self, reason: str = Reason.CLIENT_ABORTED) -> None: ...


class ClientTunnel(TypingProtocol):
    """What a connection's byte stream belongs to after an allowed CONNECT: a relay
    (promgate.net.relay.Relay). The connection is no longer read as HTTP."""

    def client_data(self, data: bytes) -> None: ...

    def client_closed_write(self) -> None: ...

    def client_lost(self, reason: Failure) -> None: ...

    def shut_down(self) -> None: ...


#: The caller of a request abandoned before its credentials were checked.
_UNCHECKED = Recognition(None, Reason.AUTHN_PENDING)


@implementer(IHandshakeListener, IHalfCloseableProtocol, IPushProducer)
class DownstreamProtocol(Protocol):
    """One client connection to an ``http`` or ``forward`` listener: a thin shell that turns
    Twisted's callbacks into calls on its HTTPListener, and, once a CONNECT is allowed, hands
    its byte stream to the tunnel (``take_over``)."""

    log = Logger()

    def __init__(self, listener: HTTPListener) -> None:
        self.listener = listener
        self.peer = ""
        self.local_address = ""
        #: Over TLS or not, as the listener was when this connection was accepted: a reload
        #: that switches the listener changes new connections only.
        self.secure = listener.tls
        self.tls_info = NO_TLS
        #: Who and how, for audit records: complete once the handshake is.
        self.info = ConnectionInfo(listener.name, "")
        #: The tunnel this connection's bytes belong to, after an allowed CONNECT.
        self.tunnel: ClientTunnel | None = None
        self.recognition = Recognition(None, "no_credentials")
        self._buf = b""
        self._exchange: ClientRelay | None = None
        self._upstream: UpstreamProtocol | None = None
        #: The deadline timer (see _enter), and when the current state's deadline falls.
        self._timer: IDelayedCall | None = None
        self._due: float | None = None
        self._state = State.HANDSHAKE
        self._output_paused = False
        self._verify_error: tuple[str, PeerCertificate | None] | None = None
        self._handshake_timed_out = False
        self._processing = False
        self._shutdown = False
        self._reading_paused = False
        #: Registered as its transport's producer (until closing, or a tunnel takes over).
        self._producing = False
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
        self.info = ConnectionInfo(self.listener.name, self.peer)
        self.listener.connections.inc()
        self.listener.open_connections.inc()
        self.listener.open.add(self)
        no_delay(self.transport)
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self._producing = True
        if self.secure:
            self._enter(State.HANDSHAKE)
        else:
            self.recognition = self.listener.authenticator.for_connection(None)
            self._became_ready()

    def handshakeCompleted(self) -> None:
        self.tls_info = tls_info(self.transport)
        self.info = ConnectionInfo(self.listener.name, self.peer, self.tls_info)
        self.recognition = self.listener.authenticator.for_connection(self.tls_info.peer)
        self._became_ready()

    def recognise(self) -> None:
        """Who this connection's certificate names, as the listener's current
        authenticator says (again, after a reload)."""
        if self._state is not State.HANDSHAKE or not self.secure:
            self.recognition = self.listener.authenticator.for_connection(self.tls_info.peer)

    def tls_verify_error(self, errno: int, depth: int, cert: x509.Certificate) -> None:
        """Called by the TLS layer for each certificate that fails verification."""
        if self._verify_error is None:
            self._verify_error = (verify_reason(errno), PeerCertificate.from_x509(cert))

    def dataReceived(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.client_data(data)  # dropped once the tunnel is over
            return
        state = self._state
        if state not in READING:
            # Pipelined (or post-close) bytes wait; stop reading only if they pile up, so
            # the usual one-request-at-a-time client costs no pause/resume syscalls.
            self._buf += data
            closing = state is State.CLOSING
            if len(self._buf) > MAX_HEAD and not self._reading_paused and not closing:
                self._reading_paused = True
                assert self.transport is not None
                self.transport.pauseProducing()  # type: ignore[attr-defined]
            if len(self._buf) > 4 * MAX_HEAD:
                self.abort()
            return
        if not self._buf and state is State.IDLE:
            self._enter(State.HEAD)
        self._buf = self._buf + data if self._buf else data
        self._process()

    def readConnectionLost(self) -> None:
        """The client sent a FIN but still reads (``printf ... | nc -N``): the requests it
        already sent are answered, then the connection is closed. Over TLS the TLS layer
        ends the whole connection instead, and connectionLost follows."""
        if self._read_closed or self._state is State.LOST:
            return
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.client_closed_write()  # passed on as a FIN
            return
        self._read_closed = True
        if self._state in READING:
            self._process()  # nothing complete is left: ends with _end_half_closed

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        was = self._state
        self._enter(State.LOST)
        self.listener.open_connections.dec()
        self.listener.open.discard(self)
        if self.tunnel is not None:
            self.tunnel.client_lost(reason)
        elif was is State.HANDSHAKE:
            self._report_handshake_failure(reason)
        elif self._exchange is not None:
            exchange, self._exchange = self._exchange, None
            exchange.client_lost(
                Reason.GATEWAY_SHUTDOWN if self._shutdown else Reason.CLIENT_ABORTED
            )
        elif self._authenticating is not None:
            # Audited now, not when the check ends: the audit log may be closing.
            req, start = self._authenticating
            self._authenticating = None
            why = Reason.GATEWAY_SHUTDOWN if self._shutdown else Reason.CLIENT_ABORTED
            self.listener.record(
                self.listener.context(self, req, start, _UNCHECKED),
                Outcome(
                    "deny",
                    why,
                    detail="connection lost while credentials were being checked",
                ),
            )
            # A check that has not started yet is dropped: nobody waits for its answer.
            check, self._check = self._check, None
            if check is not None:
                check.cancel()
        elif self._buf.strip() and (was is not State.CLOSING or self._shutdown):
            why = Reason.GATEWAY_SHUTDOWN if self._shutdown else Reason.CLIENT_CLOSED_MID_REQUEST
            self.listener.record(
                self.listener.context(self, None, self.listener.clock.seconds()),
                Outcome("deny", why),
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
        if self._state is not State.LOST:
            assert self.transport is not None
            self.transport.write(data)

    def send_sequence(self, data: tuple[bytes, ...]) -> None:
        if self._state is not State.LOST:
            assert self.transport is not None
            self.transport.writeSequence(data)

    def begin_exchange(self, exchange: ClientRelay) -> None:
        self._exchange = exchange
        self._enter(State.RELAYING)

    def begin_admission(self, pending: ClientRelay) -> None:
        """A request waits for its admission (``pending``, told if the connection is
        lost first): read no further request meanwhile."""
        self._exchange = pending
        self._enter(State.ADMITTING)

    def end_admission(self) -> bool:
        """The admission is decided; False if the connection was lost meanwhile."""
        self._exchange = None
        return self._state is not State.LOST

    def begin_authentication(
        self, req: RequestHead, start: float, check: Deferred[Recognition] | None = None
    ) -> None:
        """Credentials of ``req`` are being checked: read no further request meanwhile.
        ``check`` is cancelled if the connection is lost first."""
        self._authenticating = (req, start)
        self._check = check
        self._enter(State.AUTHENTICATING)

    def end_authentication(self) -> bool:
        """The check is over; False if the connection was lost meanwhile (and audited)."""
        self._check = None
        if self._authenticating is None:
            return False
        self._authenticating = None
        return self._state is not State.LOST

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
        if self._state is State.LOST:
            return
        self._exchange = None
        self._answers += 1
        assert self.transport is not None
        if not keep_alive or self.listener.phase is Phase.DRAINING:
            self._close()
            return
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        if self._buf:
            self._enter(State.HEAD)
            # A pipelined request is already here: serve it now, unless _process (further
            # up the stack, answering synchronously) is about to.
            if not self._processing:
                self._process()
        elif self._read_closed:
            self._close()
        else:
            self._enter(State.IDLE)
            if self.tls_info is not NO_TLS:
                # Once the answer's last bytes are flushed (Twisted writes small ones at the
                # end of this reactor turn), the TLS buffers it grew are given back.
                self.listener.clock.callLater(0, self._release_buffers)

    def _release_buffers(self) -> None:
        if self._state is State.IDLE and self.transport is not None:
            release_idle_buffers(self.transport)

    def close_truncated(self) -> None:
        """End a response that was cut short, once what was written has been sent.

        An abort would throw away the status line and the bytes already relayed (which the
        audit record counts), leaving the client with no response at all.
        """
        if self._state is not State.LOST and self.transport is not None:
            self._exchange = None
            self._close()

    def close_if_idle(self) -> None:
        """Close now (once what was written is sent) if waiting for a next request after
        an answer. One that has had none stays until the drain ends, then is cut."""
        if self._idle() and self._answers:
            self._close()

    def shut_down(self) -> None:
        """The gateway is stopping: close this connection once its answers are sent, or
        cut it, auditing what that interrupts (a request in flight or half-received, a
        handshake, a tunnel); one that never had an answer has nothing to deliver."""
        self._shutdown = True
        if self.tunnel is not None:
            self.tunnel.shut_down()
            return
        if self._state is State.CLOSING:
            return  # closing already, once its last answer is sent
        if self._idle() and self._answers:
            self._close()
        else:
            self.abort()

    def _idle(self) -> bool:
        """Between requests: every answer written, nothing of a next request read."""
        return self._state in READING and not self._buf.strip()

    def abort(self) -> None:
        """Cut the connection; connectionLost follows. A handshake stays one (its failure
        is audited as such)."""
        if self._state is not State.LOST and self.transport is not None:
            if self._state is not State.HANDSHAKE:
                self._enter(State.CLOSING)
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- internals -------------------------------------------------------------------------

    def _became_ready(self) -> None:
        self._enter(State.HEAD)
        if self._buf:
            self._process()

    def _process(self) -> None:
        self._processing = True
        try:
            self._process_buffer()
        finally:
            self._processing = False
        if self._read_closed and self._state in READING:
            self._end_half_closed()

    def _end_half_closed(self) -> None:
        """The client half-closed and every complete request is answered: close, auditing
        an unfinished request head (no more of it can come)."""
        if self._buf.strip():
            self.listener.record(
                self.listener.context(self, None, self.listener.clock.seconds()),
                Outcome("deny", Reason.CLIENT_CLOSED_MID_REQUEST),
            )
        self._buf = b""
        self._close()

    def _process_buffer(self) -> None:
        while self._state in READING:
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
            self._due = None  # the head is in: no deadline until the next state names one
            self.listener.handle(self, req)

    def _reject(self, error: HTTPError) -> None:
        self._buf = b""
        listener = self.listener
        listener.refuse(
            self,
            None,
            listener.context(self, None, listener.clock.seconds()),
            Outcome("deny", error.reason, error.status, detail=error.message),
        )

    def _close(self) -> None:
        """Close once what was written has been sent (over TLS, with a close_notify).

        The producer registration goes first: TLSMemoryBIOProtocol.loseConnection does
        not shut down while a producer is registered. Reading resumes (an exchange paused
        it), because over TLS the close completes only when the client's close_notify or
        FIN is read; anything else that arrives is dropped. A client that never finishes
        the close is cut off after the keep-alive idle deadline.
        """
        assert self.transport is not None
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
        self._reading_paused = False
        self.transport.resumeProducing()  # type: ignore[attr-defined]
        self.transport.loseConnection()
        self._enter(State.CLOSING)

    def _enter(self, state: State) -> None:
        """Move to ``state`` under its deadline, if it names one.

        The deadline is kept as a time (``_due``); one timer, armed at most ``TICK``
        ahead, looks at it when it fires and arms itself again for what is left. So the
        states a request goes through (head, relaying, idle) cost no timer operation
        each: only a timer that would fire after the new deadline is moved sooner.
        """
        self._state = state
        seconds = state.deadline(self.listener.deadlines)
        if seconds is None:
            self._due = None
            if state is State.LOST:
                self._cancel_timer()
            return
        clock = self.listener.clock
        due = self._due = clock.seconds() + seconds
        timer = self._timer
        if timer is None:
            self._timer = clock.callLater(min(seconds, TICK), self._expired)
        elif timer.getTime() > due:
            timer.reset(seconds)

    def _cancel_timer(self) -> None:
        self._due = None
        timer = self._timer
        self._timer = None
        if timer is not None and timer.active():
            timer.cancel()

    def _expired(self) -> None:
        self._timer = None
        due = self._due
        if due is None:
            return  # the state has none; the next one that does arms the timer again
        clock = self.listener.clock
        left = due - clock.seconds()
        if left > 0:
            self._timer = clock.callLater(min(left, TICK), self._expired)
            return
        self._due = None
        state = self._state
        if state is State.HANDSHAKE:
            self._handshake_timed_out = True
            self.abort()
        elif state is State.CLOSING:
            self.abort()
        elif state is State.HEAD and self._buf.strip():
            listener = self.listener
            listener.answer(
                self,
                None,
                listener.context(self, None, listener.clock.seconds()),
                Outcome(
                    "deny",
                    Reason.REQUEST_TIMEOUT,
                    408,
                    detail="request head not received in time",
                ),
                refusal_body(408, Reason.REQUEST_TIMEOUT),
            )
        else:
            self._close()

    def _report_handshake_failure(self, reason: Failure) -> None:
        self.listener.handshake_failed(
            self,
            *classify_handshake_failure(
                reason,
                shutdown=self._shutdown,
                timed_out=self._handshake_timed_out,
                verify_error=self._verify_error,
            ),
        )

    # -- tunnels ---------------------------------------------------------------------------

    def take_over(self, tunnel: ClientTunnel) -> bytes:
        """Hand this connection's byte stream to ``tunnel``: from now on it is relayed, not
        parsed. Returns the bytes the client sent after its CONNECT head (they belong to
        the tunnel)."""
        assert self.transport is not None
        self._enter(State.TUNNEL)
        self.tunnel = tunnel
        early, self._buf = self._buf, b""
        # The relay registers its own producer: back-pressure is its business now.
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
        if self._reading_paused:
            # Paused while the request's credentials were checked: the relay decides now.
            self._reading_paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        return early


class HTTPListenerFactory(Factory):
    """Builds a DownstreamProtocol per connection for one HTTP listener."""

    noisy = False

    def __init__(self, listener: HTTPListener) -> None:
        self.listener = listener

    def buildProtocol(self, addr: Any) -> DownstreamProtocol:
        return DownstreamProtocol(self.listener)


__all__ = ["ClientRelay", "ClientTunnel", "DownstreamProtocol", "HTTPListenerFactory", "State"]
