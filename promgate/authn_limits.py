"""Bounds on what wrong basic-auth passwords can cost: a bcrypt queue and failure backoff.

A bcrypt check is slow by design (tens of milliseconds of CPU), and an attacker's wrong
password costs it as much as a right one. Without bounds, 400 wrong passwords sent on
connections reset at once kept both cores busy for 45 seconds after the attacker left. So:

- :class:`BcryptQueue` runs at most ``concurrency`` checks at a time (the size of the bcrypt
  thread pool) and holds at most ``limit`` more waiting; a check beyond that is refused at
  once (``auth_overloaded``, 503). A waiting check whose Deferred is cancelled (its client
  has gone) is dropped and never runs.
- :class:`FailureBackoff` counts failed checks per key (peer address prefix, user name) on
  the injected clock; from ``threshold`` failures on, a key is refused without a check
  (``auth_throttled``, 429) for a backoff that doubles with each further failure up to
  ``cap``, and is forgotten ``forget`` seconds after its last failure. It also caps how many
  checks one key may have queued or running. At most ``max_keys`` keys are held (least
  recently failed first out), so a flood of names or addresses cannot grow memory; losing a
  key only ever makes the gateway more lenient, never locks anyone out.

The known-good cache of :class:`~promgate.authn.Authenticator` is consulted before either:
a password that already verified costs no bcrypt and is never throttled.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable
from enum import Enum
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

#: Checks held waiting for a bcrypt thread (beyond those running).
BCRYPT_QUEUE_LIMIT = 32
#: How long a refused caller is told to wait when the queue is full.
OVERLOADED_RETRY_AFTER = 1


class CheckState(Enum):
    """Where one bcrypt check is."""

    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


@attrs.define(eq=False)
class _Check:
    f: Callable[..., Any]
    args: tuple[Any, ...]
    deferred: Deferred[Any] | None = None
    state: CheckState = CheckState.WAITING
    #: Told how the check ended: its result (or Failure) if it ran, None if dropped.
    on_done: Callable[[Any], None] | None = None


class BcryptQueue:
    """Runs checks through ``runner`` (a thread pool), at most ``concurrency`` at a time
    and at most ``limit`` waiting. ``on_start()`` is called as each check starts and
    ``on_length(n)`` whenever the number waiting or running changes."""

    def __init__(
        self,
        runner: Callable[..., Deferred[Any]],
        *,
        concurrency: int = 2,
        limit: int = BCRYPT_QUEUE_LIMIT,
        on_start: Callable[[], None] | None = None,
        on_length: Callable[[int], None] | None = None,
    ) -> None:
        self._runner = runner
        self._concurrency = concurrency
        self._limit = limit
        self._on_start = on_start
        self._on_length = on_length
        self._waiting: deque[_Check] = deque()
        self._running = 0

    @property
    def length(self) -> int:
        """Checks waiting or running."""
        return len(self._waiting) + self._running

    def submit(
        self,
        f: Callable[..., Any],
        *args: Any,
        on_done: Callable[[Any], None] | None = None,
    ) -> Deferred[Any] | None:
        """Queue ``f(*args)``; None if the queue is full. Cancelling the Deferred drops a
        check that has not started (it fails with CancelledError); one already running goes
        on, and ``on_done`` still learns its result, so that a client cannot escape the
        failure count by leaving while its check runs."""
        if len(self._waiting) >= self._limit:
            return None
        check = _Check(f, args, on_done=on_done)
        check.deferred = Deferred(lambda _: self._cancel(check))
        self._waiting.append(check)
        self._changed()
        deferred = check.deferred
        self._pump()
        return deferred

    def _cancel(self, check: _Check) -> None:
        if check.state is CheckState.WAITING:
            self._waiting.remove(check)
            check.state = CheckState.DONE
            if check.on_done is not None:
                check.on_done(None)
            self._changed()
        # A running check goes on in its thread; its result is dropped (already fired).

    def _pump(self) -> None:
        while self._waiting and self._running < self._concurrency:
            check = self._waiting.popleft()
            check.state = CheckState.RUNNING
            self._running += 1
            if self._on_start is not None:
                self._on_start()
            try:
                d = self._runner(check.f, *check.args)
            except Exception:
                d = Deferred()
                d.errback(Failure())
            d.addBoth(self._finished, check)

    def _finished(self, result: Any, check: _Check) -> None:
        self._running -= 1
        check.state = CheckState.DONE
        if check.on_done is not None:
            check.on_done(result)
        deferred = check.deferred
        assert deferred is not None
        if deferred.called:
            pass  # cancelled while running: the client has gone
        elif isinstance(result, Failure):
            deferred.errback(result)
        else:
            deferred.callback(result)
        self._changed()
        self._pump()

    def _changed(self) -> None:
        if self._on_length is not None:
            self._on_length(self.length)


@attrs.define
class _Count:
    failures: int = 0
    last: float = 0.0
    blocked_until: float = 0.0
    pending: int = 0


class FailureBackoff:
    """Failure counters per key with an exponential backoff, on ``clock`` (see module)."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        threshold: int,
        base: float = 1.0,
        cap: float = 30.0,
        forget: float = 60.0,
        max_pending: int | None = None,
        max_keys: int = 4096,
    ) -> None:
        self._clock = clock
        self._threshold = threshold
        self._base = base
        self._cap = cap
        self._forget = forget
        self._max_pending = max_pending
        self._max_keys = max_keys
        self._counts: OrderedDict[str, _Count] = OrderedDict()

    def __len__(self) -> int:
        return len(self._counts)

    def retry_after(self, key: str) -> int:
        """Whole seconds ``key`` must wait before its next check; 0 if it may go now."""
        count = self._current(key)
        if count is None:
            return 0
        now = self._clock.seconds()
        if count.blocked_until > now:
            return max(1, math.ceil(count.blocked_until - now))
        if self._max_pending is not None and count.pending >= self._max_pending:
            return 1
        return 0

    def failures(self, key: str) -> int:
        """Failures of ``key`` not yet forgotten."""
        count = self._current(key)
        return 0 if count is None else count.failures

    def started(self, key: str) -> None:
        """A check for ``key`` was queued."""
        self._get(key).pending += 1

    def finished(self, key: str, *, failed: bool) -> None:
        """A check for ``key`` ended (or was dropped, ``failed=False``)."""
        count = self._get(key)
        count.pending = max(0, count.pending - 1)
        if not failed:
            self._trim(key, count)
            return
        now = self._clock.seconds()
        count.failures += 1
        count.last = now
        over = count.failures - self._threshold
        if over >= 0:
            delay = min(self._cap, self._base * 2 ** min(over, 32))
            count.blocked_until = max(count.blocked_until, now + delay)
        self._counts.move_to_end(key)

    def _current(self, key: str) -> _Count | None:
        count = self._counts.get(key)
        if count is None:
            return None
        now = self._clock.seconds()
        if count.failures and now - count.last > self._forget and now >= count.blocked_until:
            count.failures = 0
            count.blocked_until = 0.0
            self._trim(key, count)
            return self._counts.get(key)
        return count

    def _get(self, key: str) -> _Count:
        count = self._current(key)
        if count is None:
            count = self._counts[key] = _Count()
            while len(self._counts) > self._max_keys:
                self._counts.popitem(last=False)
        return count

    def _trim(self, key: str, count: _Count) -> None:
        if not count.failures and not count.pending:
            self._counts.pop(key, None)


__all__ = [
    "BCRYPT_QUEUE_LIMIT",
    "OVERLOADED_RETRY_AFTER",
    "BcryptQueue",
    "CheckState",
    "FailureBackoff",
]
