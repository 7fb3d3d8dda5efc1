"""The states of a client connection to an ``http`` or ``forward`` listener, each with
the deadline that applies in it (``promgate.http.server.DownstreamProtocol``)."""

from __future__ import annotations

from enum import Enum

from promgate.config.model import Deadlines

__all__ = ["READING", "TICK", "State"]


#: The longest a connection's deadline timer waits before it looks at the deadline again
#: (see ``DownstreamProtocol._enter``): an idle connection wakes once per TICK.
TICK = 10.0


class State(Enum):
    """Where a client connection is in its life; each state names the deadline that
    applies in it (``State.deadline``)."""

    #: The TLS handshake is under way. Deadline: ``deadlines.tls_handshake``.
    HANDSHAKE = "handshake"
    #: Reading a request head, once a byte of it came (or right after the handshake).
    #: Deadline: ``deadlines.request_head``.
    HEAD = "head"
    #: Between requests on a keep-alive connection. Deadline: ``deadlines.keepalive_idle``.
    IDLE = "idle"
    #: A request's credentials are being checked (bcrypt, in a thread); no request is read.
    AUTHENTICATING = "authenticating"
    #: A request's admission is being decided by the shared limits (Redis); no request is
    #: read. Their ``timeout`` bounds it.
    ADMITTING = "admitting"
    #: A request is being relayed (an Exchange, which has its own deadline).
    RELAYING = "relaying"
    #: The byte stream belongs to a CONNECT tunnel (a relay, with its own deadlines).
    TUNNEL = "tunnel"
    #: Closing once what was written is sent, or cut. Deadline: ``deadlines.keepalive_idle``
    #: for the client's part of the close.
    CLOSING = "closing"
    #: Gone.
    LOST = "lost"

    def deadline(self, deadlines: Deadlines) -> float | None:
        if self is State.HANDSHAKE:
            return deadlines.tls_handshake
        if self is State.HEAD:
            return deadlines.request_head
        if self is State.IDLE or self is State.CLOSING:
            return deadlines.keepalive_idle
        return None


#: Between requests: a head may be read.
READING = (State.HEAD, State.IDLE)
