"""Redis Sentinel: which server is the master of a name, now (``shared_limits.redis.sentinel``).

``Sentinels`` asks every sentinel and believes the first that names a master neither
subjectively nor objectively down. A sentinel is asked one question at a time: while it
does not answer (down, unreachable), later questions wait for that one answer rather than
pile up behind it, and each question gives up after its timeout. ``SentinelMaster`` is
the client endpoint that connects to the master the sentinels name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from zope.interface import implementer

__all__ = ["MasterNotNamedError", "SentinelMaster", "Sentinels", "master_address"]

Address = tuple[str, int]


class MasterNotNamedError(Exception):
    """No sentinel named a master in a good state in time."""


def master_address(reply: Sequence[Any]) -> Address | None:
    """The address in a ``SENTINEL MASTER NAME`` reply (field, value, field, value...), if
    the sentinel takes the server for a master that is neither subjectively nor
    objectively down."""
    fields = {str(k): str(v) for k, v in zip(reply[::2], reply[1::2], strict=False)}
    flags = set(fields.get("flags", "").split(","))
    if "master" not in flags or flags & {"s_down", "o_down", "disconnected"}:
        return None
    try:
        return fields["ip"], int(fields["port"])
    except (KeyError, ValueError):
        return None


class _Sentinel:
    """One sentinel and the question it is being asked, if any."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.listeners: set[Callable[[Address | None], None]] = set()
        self.asking = False

    def ask(self, name: str, listener: Callable[[Address | None], None]) -> None:
        self.listeners.add(listener)
        if self.asking:
            return
        self.asking = True
        try:
            d: Deferred[Any] = self.connection.execute_command("SENTINEL", "MASTER", name)
        except Exception:  # a connection given up on says so at once
            self._answered(None)
            return
        # An error, or a reply of a shape not understood, is no answer.
        d.addCallback(master_address).addErrback(lambda _: None).addCallback(self._answered)

    def _answered(self, address: Address | None) -> None:
        self.asking = False
        listeners, self.listeners = self.listeners, set()
        for listener in listeners:
            listener(address)


class Sentinels:
    """The sentinels, each a connection to it that reconnects by itself (txredisapi's,
    made by ``connect``) and answers ``execute_command`` with a Deferred."""

    def __init__(
        self, connections: Sequence[Any], clock: IReactorTime, timeout: float = 2.0
    ) -> None:
        self._clock = clock
        self.timeout = timeout
        self._sentinels = [_Sentinel(c) for c in connections]
        #: The questions not answered yet, cancelled on disconnect.
        self._open: set[Deferred[Address]] = set()

    @classmethod
    def connect(
        cls, endpoints: Sequence[Address], password: str | None, clock: IReactorTime
    ) -> Sentinels:
        """The sentinels at ``endpoints``, authenticated with ``password`` if given."""
        import txredisapi  # type: ignore[import-untyped]

        return cls(
            [
                txredisapi.lazyConnection(host, port, password=password, connectTimeout=2)
                for host, port in endpoints
            ],
            clock,
        )

    def master(self, name: str) -> Deferred[Address]:
        """The master of ``name`` by the first sentinel to name one in a good state;
        fails with MasterNotNamedError if none does within the timeout."""
        asked = list(self._sentinels)
        answers = 0

        def settle() -> None:
            self._open.discard(result)
            if timer.active():
                timer.cancel()
            for sentinel in asked:
                sentinel.listeners.discard(heard)

        def heard(address: Address | None) -> None:
            nonlocal answers
            answers += 1
            if result.called:
                return
            if address is not None:
                settle()
                result.callback(address)
            elif answers == len(asked):
                settle()
                result.errback(MasterNotNamedError(f"no sentinel names a master of {name!r}"))

        def too_late() -> None:
            if not result.called:
                settle()
                result.errback(
                    MasterNotNamedError(f"no sentinel named a master of {name!r} in time")
                )

        # Cancelled (a connection attempt given up, the link stopped): nothing is left
        # waiting on the clock or on a sentinel.
        result: Deferred[Address] = Deferred(lambda _: settle())
        self._open.add(result)
        timer = self._clock.callLater(self.timeout, too_late)
        for sentinel in asked:
            if not result.called:
                sentinel.ask(name, heard)
        return result

    def disconnect(self) -> Deferred[None]:
        """Every question still open is cancelled, and every connection closed."""
        for question in list(self._open):
            question.cancel()
        d = gatherResults([s.connection.disconnect() for s in self._sentinels], consumeErrors=True)
        return d.addCallback(lambda _: None)


@implementer(IStreamClientEndpoint)
class SentinelMaster:
    """Connects to the current master of ``name``, asked of the sentinels before every
    connection (a failed question fails the attempt: the link tries again with backoff)."""

    def __init__(self, reactor: Any, sentinels: Sentinels, name: str) -> None:
        self._reactor = reactor
        self._sentinels = sentinels
        self.name = name
        #: The master last connected to.
        self.address: Address | None = None

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:  # noqa: N803
        def to(address: Address) -> Deferred[IProtocol]:
            self.address = address
            host, port = address
            endpoint = HostnameEndpoint(self._reactor, host, port, timeout=2)
            return endpoint.connect(protocolFactory)

        return self._sentinels.master(self.name).addCallback(to)

    def moved(self) -> Deferred[Address | None]:
        """The master the sentinels name now, if it is not the one last connected to;
        None if it is, or if none is named in time."""

        def compare(address: Address) -> Address | None:
            return None if address == self.address else address

        return self._sentinels.master(self.name).addCallbacks(compare, lambda _: None)
