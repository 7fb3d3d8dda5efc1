"""Per-route admission control: token buckets and concurrency caps on an injected clock.

Every request (or TCP connection) asks :meth:`RateLimiter.admit` before any upstream work is
done. The route's concurrency cap is checked first, then, if the route has a rate, a token
bucket keyed by identity, target, or both. A refusal consumes nothing, so a client that backs
off for ``retry_after`` seconds is admitted, whatever it was refused for before.

Time comes only from the clock given to the limiter (``IReactorTime.seconds``), so tests drive
it exactly with :class:`twisted.internet.task.Clock`.
"""

from __future__ import annotations

import math
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from promgate.config.model import Limits

__all__ = ["Admission", "Holder", "IRateLimiter", "RateLimiter", "SharedAdmission"]

#: Minimum number of admits between two sweeps for idle buckets.
SWEEP_INTERVAL = 1024


@attrs.frozen
class Admission:
    """The limiter's answer to one request."""

    allowed: bool
    #: ``"ok"``, ``"rate_limited"`` or ``"concurrency_limited"``; a bounded metrics label.
    reason: str
    #: Seconds until a retry could succeed; 0.0 when allowed.
    retry_after: float


#: The answers that carry no per-request data are shared, so the common path allocates nothing.
ADMITTED = Admission(allowed=True, reason="ok", retry_after=0.0)
CONCURRENCY_LIMITED = Admission(allowed=False, reason="concurrency_limited", retry_after=1.0)


class IRateLimiter(Interface):
    """Admission control for requests and connections on a route."""

    def admit(route: str, limits: Limits, identity: str, target: str) -> Admission:  # noqa: N805
        """Decide on one request; an allowed one is in flight until ``release(route)``."""

    def release(route: str) -> None:  # noqa: N805
        """Mark one allowed request on ``route`` as finished."""

    def in_flight(route: str) -> int:  # noqa: N805
        """Return the number of allowed, unreleased requests on ``route``."""


class Holder(Protocol):
    """What holds an admitted request's place among its route's ``max_concurrent``: this
    process's limiter, or a lease of the limits shared through Redis."""

    def release(self, route: str) -> None:
        """The request on ``route`` is over: give its place back."""


class SharedAdmission(Protocol):
    """Limits held as one budget across processes and hosts (promgate.shared_limits).

    Its answer comes later (it asks Redis): a refusal, or the holder of the admitted
    request's place. The Deferred always fires, within the configured timeout, and never
    fails: when Redis cannot answer in time, its ``on_unavailable`` decides.
    """

    def admit(
        self, route: str, limits: Limits, identity: str, target: str
    ) -> Deferred[Admission | Holder]: ...


class _Bucket:
    """One token bucket: the level at ``stamp``, and when it will be full again."""

    __slots__ = ("full_at", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float, full_at: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.full_at = full_at


class _RouteState:
    """Everything the limiter tracks for one route.

    Buckets live in one table per keying mode, so that a reload which changes ``per`` cannot
    confuse an identity with a target of the same spelling. Pairs are nested (identity, then
    target) so that looking one up allocates no tuple.
    """

    __slots__ = ("by_identity", "by_pair", "by_target", "in_flight")

    def __init__(self) -> None:
        self.in_flight = 0
        self.by_identity: dict[str, _Bucket] = {}
        self.by_target: dict[str, _Bucket] = {}
        self.by_pair: dict[str, dict[str, _Bucket]] = {}

    def bucket_count(self) -> int:
        return (
            len(self.by_identity)
            + len(self.by_target)
            + sum(len(inner) for inner in self.by_pair.values())
        )

    def sweep(self, now: float) -> None:
        """Drop buckets that have refilled: a missing bucket behaves exactly like a full one."""
        for table in (self.by_identity, self.by_target):
            for key in [k for k, b in table.items() if b.full_at <= now]:
                del table[key]
        for identity in list(self.by_pair):
            inner = self.by_pair[identity]
            for key in [k for k, b in inner.items() if b.full_at <= now]:
                del inner[key]
            if not inner:
                del self.by_pair[identity]

    def is_idle(self) -> bool:
        return not (self.in_flight or self.by_identity or self.by_target or self.by_pair)


def _level(tokens: float, stamp: float, now: float, rate: float, capacity: float) -> float:
    """The bucket's level at ``now``: refilled since ``stamp``, never above ``capacity``.

    Time that runs backwards (a wall clock stepped back) refills nothing.
    """
    if now > stamp:
        tokens += (now - stamp) * rate
        if tokens > capacity:
            return capacity
    return tokens


@implementer(IRateLimiter)
class RateLimiter:
    """Token buckets and concurrency caps for every route, in one process.

    ``limits`` is passed on every call (it comes from the configuration the request started
    under), so a reload takes effect on the next request without rebuilding the limiter. The
    limits are expected to be validated (``rate > 0``, ``burst >= 1``) as the configuration
    loader does; a ``burst`` below 1 is treated as 1 so that a bucket can always admit.

    Memory stays bounded: every so often (at least every :data:`SWEEP_INTERVAL` admits, and
    never more often than the number of buckets, so sweeping is O(1) amortised) buckets that
    have refilled are dropped, along with routes that have nothing left to track.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._routes: dict[str, _RouteState] = {}
        self._until_sweep = SWEEP_INTERVAL

    def admit(self, route: str, limits: Limits, identity: str, target: str) -> Admission:
        """Decide on one request, and count it as in flight on ``route`` if it is allowed."""
        state = self._routes.get(route)
        if state is None:
            state = self._routes[route] = _RouteState()
        cap = limits.max_concurrent
        if cap is not None and state.in_flight >= cap:
            return CONCURRENCY_LIMITED

        rate = limits.rate
        if rate is not None:
            now = self._clock.seconds()
            capacity = float(limits.burst) if limits.burst >= 1 else 1.0
            per = limits.per
            if per == "identity_target":
                table = state.by_pair.get(identity)
                if table is None:
                    table = state.by_pair[identity] = {}
                key = target
            elif per == "identity":
                table, key = state.by_identity, identity
            elif per == "target":
                table, key = state.by_target, target
            else:
                raise ValueError(f"unknown rate limit key {per!r}")
            bucket = table.get(key)
            if bucket is None:
                tokens = capacity - 1.0
                table[key] = _Bucket(tokens, now, now + 1.0 / rate)
            else:
                tokens = _level(bucket.tokens, bucket.stamp, now, rate, capacity)
                if tokens < 1.0:
                    return self._refused(bucket, now, rate, capacity, tokens)
                tokens -= 1.0
                bucket.tokens = tokens
                bucket.stamp = now
                bucket.full_at = now + (capacity - tokens) / rate

        state.in_flight += 1
        self._until_sweep -= 1
        if self._until_sweep <= 0:
            self.sweep()
        return ADMITTED

    @staticmethod
    def _refused(
        bucket: _Bucket, now: float, rate: float, capacity: float, tokens: float
    ) -> Admission:
        """Refuse, with the earliest ``retry_after`` at which :meth:`admit` will say yes.

        ``(1 - tokens) / rate`` is right in exact arithmetic, but ``now + retry_after`` is
        rounded by whoever adds it to the clock. So the answer is checked with the very
        computation ``admit`` will make, and nudged up until it passes.
        """
        retry_after = (1.0 - tokens) / rate
        for _ in range(64):
            at = now + retry_after
            if _level(bucket.tokens, bucket.stamp, at, rate, capacity) >= 1.0:
                break
            retry_after = max(
                math.nextafter(retry_after, math.inf),
                math.nextafter(at, math.inf) - now,
            )
        return Admission(allowed=False, reason="rate_limited", retry_after=retry_after)

    def release(self, route: str) -> None:
        """Mark one allowed request on ``route`` as finished.

        Releasing more than was admitted is a bug in the caller and raises ``ValueError``.
        """
        state = self._routes.get(route)
        if state is None or state.in_flight <= 0:
            raise ValueError(f"release({route!r}) without a matching admitted request")
        state.in_flight -= 1

    def in_flight(self, route: str) -> int:
        """Return the number of allowed, unreleased requests on ``route``."""
        state = self._routes.get(route)
        return 0 if state is None else state.in_flight

    def bucket_count(self) -> int:
        """Return how many token buckets are held (for tests and a memory gauge)."""
        return sum(state.bucket_count() for state in self._routes.values())

    def sweep(self) -> None:
        """Drop refilled buckets and idle routes now; :meth:`admit` also calls this itself."""
        now = self._clock.seconds()
        for route in list(self._routes):
            state = self._routes[route]
            state.sweep(now)
            if state.is_idle():
                del self._routes[route]
        self._until_sweep = max(SWEEP_INTERVAL, self.bucket_count())

    @staticmethod
    def retry_after_header(admission: Admission) -> str:
        """Return the ``Retry-After`` value for a refusal: whole seconds, rounded up, at least 1."""
        return str(max(1, math.ceil(admission.retry_after)))
