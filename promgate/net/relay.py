"""One byte relay between a client connection and an upstream connection, for CONNECT
tunnels and ``tcp`` listeners alike.

A ``Relay`` connects upstream (through its owner), then moves bytes both ways untouched,
with back-pressure both ways (a side whose write buffer is full stops the other side's
reading), half-close (a plain TCP side's FIN is passed on as a FIN), an idle deadline,
a linger deadline once one side is gone, and a cap on what the client may send before the
upstream is there. Its owner (the listener) decides how to connect, what opening means
(a ``200`` for CONNECT) and what the end is recorded as.

Half-close: a TLS side closes its write direction with close_notify and keeps reading; but
Twisted's TLS layer ends the whole connection when it *receives* a close_notify (it
answers with its own and closes), so a TLS peer's close cannot be relayed as a half-close:
the other side is then closed once what was already written to it has been sent.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Protocol

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError, ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from promgate.core.reasons import Reason
from promgate.net.connector import connect_failure

#: Once one side of a relay is gone, how long the other may take to finish closing.
CLOSE_LINGER = 10.0
#: Client bytes held while the upstream connection is being made (reading is paused then,
#: so this is only ever reached by a transport that ignores the pause).
MAX_PENDING = 256 * 1024


class ReadGate:
    """Pauses reading from one transport while any reason to pause holds.

    Once the transport has read its end (``eof``), it is left alone: resuming a half-closed
    TCP transport would have it read the end, and report it, again.
    """

    __slots__ = ("_reasons", "_transport", "eof")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._reasons: set[str] = set()
        self.eof = False

    def pause(self, reason: str) -> None:
        if not self._reasons and not self.eof:
            self._transport.pauseProducing()
        self._reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._reasons:
            self._reasons.discard(reason)
            if not self._reasons and not self.eof:
                self._transport.resumeProducing()


@implementer(IPushProducer)
class _PeerProducer:
    """Registered with one side's transport: when its write buffer fills, stop reading the
    other side; when it drains, go on. Closing is the relay's business, not the producer's."""

    __slots__ = ("_gate",)

    def __init__(self, gate: ReadGate) -> None:
        self._gate = gate

    def pauseProducing(self) -> None:
        self._gate.pause("peer")

    def resumeProducing(self) -> None:
        self._gate.resume("peer")

    def stopProducing(self) -> None:
        pass


class Side:
    """What a relay does to one of its connections, through that connection's transport."""

    def __init__(self, transport: Any, *, secure: bool) -> None:
        self.transport = transport
        #: TLS on this connection: close_notify instead of a FIN.
        self.secure = secure
        self.gate = ReadGate(transport)
        self.lost = False
        self._producing = False

    def write(self, data: bytes) -> None:
        if not self.lost:
            self.transport.write(data)

    def feed_from(self, other: Side) -> None:
        """Back-pressure: this side's full write buffer pauses reading from ``other``."""
        self.transport.registerProducer(_PeerProducer(other.gate), True)
        self._producing = True

    def _unregister(self) -> None:
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()

    def shutdown_write(self) -> None:
        """No more data for this side: a FIN, or over TLS a close_notify; reading goes on.

        The producer goes first: neither TCP's half-close nor TLS's close happens while
        one is registered.
        """
        if self.lost:
            return
        self._unregister()
        if self.secure:
            self.transport.loseConnection()
        else:
            self.transport.loseWriteConnection()

    def close(self) -> None:
        """Close once what was written has been sent."""
        if self.lost:
            return
        self._unregister()
        self.gate.resume("peer")
        self.transport.loseConnection()

    def abort(self) -> None:
        if not self.lost:
            self.transport.abortConnection()


class Upstream(Protocol):
    """The upstream end of a relay, as the relay uses it."""

    side: Side

    def attach(self, relay: Relay) -> None:
        """From now on, report to ``relay``."""

    def deliver_early(self) -> None:
        """Hand the relay what arrived before it attached (a server that speaks first)."""

    def abort(self) -> None: ...


class RelayOwner(Protocol):
    """The listener a relay works for."""

    def connect(self, relay: Relay) -> Deferred[Any]:
        """Connect upstream; fire with an ``Upstream`` ready to carry data."""

    def opened(self, relay: Relay) -> None:
        """The upstream is there; bytes are about to flow (a CONNECT's ``200`` goes now)."""

    def connect_failed(self, relay: Relay, reason: str, detail: str) -> None:
        """Connecting failed (``relay.ended`` says why); tell the client, or close it."""

    def finished(self, relay: Relay) -> None:
        """Both sides are gone: record how the relay ended."""


class RelayState(Enum):
    """Where a relay is, and the deadline that applies there."""

    #: The upstream is being connected; the client's reading is paused. Deadline: the
    #: upstream connect timeout.
    CONNECTING = "connecting"
    #: Bytes flow both ways. Deadline: idle (nothing moved either way).
    OPEN = "open"
    #: A side is gone, or both have half-closed; the other finishes closing. Deadline:
    #: CLOSE_LINGER, then both are cut.
    LINGERING = "lingering"
    #: Connecting failed; the owner answered the client, whose end is awaited.
    FAILED = "failed"
    #: Both sides gone, recorded.
    DONE = "done"


class Relay:
    """One client connection relayed to its upstream, and how it ended."""

    log = Logger()

    def __init__(
        self,
        owner: RelayOwner,
        client: Side,
        *,
        clock: IReactorTime,
        connect_timeout: float,
        idle: float,
        counters: tuple[Any, Any] | None = None,
    ) -> None:
        self.owner = owner
        self.client = client
        self.clock = clock
        self.connect_timeout = connect_timeout
        self.idle = idle
        #: Counters of the bytes relayed in and out (``inc(n)``), if any.
        self._counters = counters
        self.state = RelayState.CONNECTING
        self.upstream: Upstream | None = None
        self.connecting: Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.client_eof = False
        self.upstream_eof = False
        self.client_gone = False
        self.upstream_gone = False
        #: The first cause of the end, and its detail; later ones are consequences.
        self.ended: str | None = None
        self.detail: str | None = None
        self.opened = False
        self._timed_out = False
        self._last = clock.seconds()

    def _end(self, reason: str, detail: str | None = None) -> None:
        if self.ended is None:
            self.ended = reason
            self.detail = detail

    # -- opening -------------------------------------------------------------------------

    def start(self, initial: bytes = b"") -> None:
        """Connect upstream, holding ``initial`` (and whatever else the client sends until
        the upstream is there) for it."""
        self.client.gate.pause("connect")
        if initial:
            self.client_data(initial)
        self._enter(RelayState.CONNECTING)
        d = self.owner.connect(self)
        self.connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, upstream: Upstream) -> None:
        self.connecting = None
        if self.client_gone or self.state is not RelayState.CONNECTING:
            # The relay is already ending (the client was cut, or is gone): the upstream
            # gets nothing the client sent.
            upstream.abort()
            return
        self.upstream = upstream
        self.opened = True
        self._enter(RelayState.OPEN)
        self.owner.opened(self)
        upstream.attach(self)
        if self._pending:
            pending, self._pending, self._pending_size = self._pending, [], 0
            upstream.side.write(b"".join(pending))
        upstream.side.feed_from(self.client)
        self.client.feed_from(upstream.side)
        if self.client_eof:
            upstream.side.shutdown_write()
        self.client.gate.resume("connect")
        upstream.deliver_early()

    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        self._cancel_timer()
        if self.client_gone:
            self._maybe_finish()
            return
        reason: str
        if self._timed_out:
            reason, detail = Reason.UPSTREAM_TIMEOUT, "upstream connect timed out"
        elif failure.check(CancelledError, ConnectingCancelledError):
            if self.ended is not None:
                # Cancelled by the relay's own end (shut down, revoked, cut): not a failure
                # of the upstream, and its first cause is already the relay's.
                self.state = RelayState.FAILED
                self.client.abort()
                return
            reason, detail = Reason.GATEWAY_SHUTDOWN, "connect cancelled"
        else:
            reason, detail = connect_failure(failure)
        self._end(reason, detail)
        self.state = RelayState.FAILED
        self.owner.connect_failed(self, reason, detail)

    # -- relaying ------------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        n = len(data)
        self.bytes_in += n
        if self._counters is not None:
            self._counters[0].inc(n)
        self._last = self.clock.seconds()
        upstream = self.upstream
        if upstream is not None:
            upstream.side.write(data)
            return
        if self.state is not RelayState.CONNECTING:
            return  # connecting failed: nothing more goes anywhere
        self._pending.append(data)
        self._pending_size += n
        if self._pending_size > MAX_PENDING:
            self._end(
                Reason.CLIENT_BUFFER_OVERFLOW,
                "client sent too much before the upstream connected",
            )
            self._pending, self._pending_size = [], 0
            # Lingering, not connecting: an upstream that connects before the client's loss
            # is seen is closed at once.
            self._enter(RelayState.LINGERING)
            self.client.abort()

    def upstream_data(self, data: bytes) -> None:
        n = len(data)
        self.bytes_out += n
        if self._counters is not None:
            self._counters[1].inc(n)
        self._last = self.clock.seconds()
        self.client.write(data)

    # -- closing -------------------------------------------------------------------------

    def client_closed_write(self) -> None:
        """The client half-closed (a FIN on a plain connection): pass it on."""
        self.client.gate.eof = True
        if self.client_eof:
            return
        self.client_eof = True
        self._end(Reason.CLIENT_CLOSED)
        if self.upstream is not None and not self.upstream_gone:
            self.upstream.side.shutdown_write()
        self._both_closed()

    def upstream_closed_write(self) -> None:
        """The upstream half-closed: pass it on (over TLS as a close_notify)."""
        if self.upstream_eof:
            return
        self.upstream_eof = True
        self._end(Reason.UPSTREAM_CLOSED)
        if not self.client_gone:
            self.client.shutdown_write()
        self._both_closed()

    def _both_closed(self) -> None:
        if self.client_eof and self.upstream_eof:
            self.client.close()
            if self.upstream is not None:
                self.upstream.side.close()
            self._enter(RelayState.LINGERING)

    def client_lost(self, reason: Failure) -> None:
        self.client_gone = True
        self.client.lost = True
        clean = reason.check(ConnectionDone) is not None
        self._end(Reason.CLIENT_CLOSED if clean else Reason.CLIENT_ABORTED)
        if self.connecting is not None:
            self.connecting.cancel()
        elif self.upstream is not None and not self.upstream_gone:
            # Over TLS an end without close_notify looks like a reset, and is common
            # (clients that just close the socket): what was relayed is still delivered.
            if clean or self.client_eof or self.client.secure:
                self.upstream.side.close()
            else:
                self.upstream.side.abort()
            self._enter(RelayState.LINGERING)
        self._maybe_finish()

    def upstream_lost(self, reason: Failure) -> None:
        self.upstream_gone = True
        if self.upstream is not None:
            self.upstream.side.lost = True
        if reason.check(ConnectionDone) is not None:
            self._end(Reason.UPSTREAM_CLOSED)
        elif reason.check(SSL.Error, VerificationError):
            self._end(Reason.UPSTREAM_TLS_FAILED, reason.getErrorMessage())
        else:
            self._end(Reason.UPSTREAM_RESET, reason.getErrorMessage())
        if not self.client_gone:
            self.client.close()
            self._enter(RelayState.LINGERING)
        self._maybe_finish()

    def shut_down(self) -> None:
        """The gateway is stopping: cut both sides now."""
        self._end(Reason.GATEWAY_SHUTDOWN)
        self._abort_both()

    def revoke(self, detail: str) -> None:
        """A reload no longer allows this relay: cut both sides now."""
        self._end(Reason.POLICY_REVOKED, detail)
        self._abort_both()

    def _abort_both(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
        if self.upstream is not None:
            self.upstream.side.abort()
        self.client.abort()

    def _maybe_finish(self) -> None:
        if self.state is RelayState.DONE or not self.client_gone or self.connecting is not None:
            return
        if self.upstream is not None and not self.upstream_gone:
            return
        self.state = RelayState.DONE
        self._cancel_timer()
        self.owner.finished(self)

    # -- deadlines -------------------------------------------------------------------------

    def _enter(self, state: RelayState) -> None:
        """Move to ``state`` and arm its deadline. Lingering is final: the idle deadline
        never replaces it."""
        if self.state is RelayState.DONE or (
            state is RelayState.OPEN and self.state is RelayState.LINGERING
        ):
            return
        self.state = state
        self._cancel_timer()
        if state is RelayState.CONNECTING:
            seconds = self.connect_timeout
        elif state is RelayState.OPEN:
            seconds = self.idle
        else:
            seconds = CLOSE_LINGER
        self._timer = self.clock.callLater(seconds, self._expired)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _expired(self) -> None:
        self._timer = None
        state = self.state
        if state is RelayState.CONNECTING:
            self._timed_out = True
            if self.connecting is not None:
                self.connecting.cancel()
            return
        if state is RelayState.OPEN:
            quiet = self.clock.seconds() - self._last
            if quiet < self.idle:
                self._timer = self.clock.callLater(self.idle - quiet, self._expired)
                return
            # Nothing is in flight either way: both sides are closed (over TLS with a
            # close_notify), and cut if they do not finish within the linger deadline.
            self._end(Reason.IDLE_TIMEOUT, f"nothing relayed for {self.idle:g}s")
            self.client.close()
            if self.upstream is not None:
                self.upstream.side.close()
            self._enter(RelayState.LINGERING)
            return
        self._abort_both()


__all__ = [
    "CLOSE_LINGER",
    "MAX_PENDING",
    "ReadGate",
    "Relay",
    "RelayOwner",
    "RelayState",
    "Side",
    "Upstream",
]
