"""What a shutdown waits for: work in flight and open connections, each with a Deferred
that fires when it reaches zero."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["InFlight", "OpenSet", "Phase"]

_T = TypeVar("_T")


class Phase(enum.Enum):
    """Where a listener's gateway is in its life."""

    SERVING = "serving"
    #: Stopping: answers in flight are finished, then each connection closes.
    DRAINING = "draining"


class _Waiters:
    """Deferreds waiting for a condition; a cancelled one is forgotten.

    They fire on a later turn of the reactor, once the condition still holds: whoever
    made it hold (a connection being lost, say) finishes what it was doing first, such
    as writing its audit record.
    """

    def __init__(self, clock: IReactorTime, holds: Callable[[], bool]) -> None:
        self._clock = clock
        self._holds = holds
        self._waiting: list[Deferred[None]] = []
        self._call: IDelayedCall | None = None

    def wait(self) -> Deferred[None]:
        if not self._waiting and self._holds():
            return succeed(None)
        d: Deferred[None] = Deferred(self._waiting.remove)
        self._waiting.append(d)
        return d

    def check(self) -> None:
        """The condition may hold now."""
        if self._waiting and self._call is None:
            self._call = self._clock.callLater(0, self._fire)

    def _fire(self) -> None:
        self._call = None
        if not self._holds():
            return
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


class InFlight:
    """A count of work in progress (relayed requests, say)."""

    def __init__(self, clock: IReactorTime) -> None:
        self.count = 0
        self._idle = _Waiters(clock, lambda: self.count == 0)

    def begin(self) -> None:
        self.count += 1

    def end(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.check()

    def when_idle(self) -> Deferred[None]:
        """Fires once nothing is in flight (at once if nothing is now)."""
        return self._idle.wait()


class OpenSet(set[_T]):
    """The open connections of a listener: a set that tells when it has emptied."""

    def __init__(self, clock: IReactorTime, items: Iterable[_T] = ()) -> None:
        super().__init__(items)
        self._empty = _Waiters(clock, lambda: not self)

    def discard(self, item: object) -> None:
        super().discard(item)
        if not self:
            self._empty.check()

    def remove(self, item: _T) -> None:
        super().remove(item)
        if not self:
            self._empty.check()

    def when_empty(self) -> Deferred[None]:
        """Fires once no connection is open (at once if none is now)."""
        return self._empty.wait()
