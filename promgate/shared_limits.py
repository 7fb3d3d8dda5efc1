"""Route limits held as one budget by every worker and gateway using the same Redis and
key prefix (``shared_limits``).

``SharedLimiter`` asks Redis, with one script per admission (promgate.redis_scripts),
and answers with a Deferred that always fires within the configured ``timeout``: a
refusal, or the holder of the admitted request's place. A call already sent is never
cancelled (its reply would be taken for the next call's); it is raced against a timer on
the injected clock, and a late reply is only tidied up after (a late lease is given
back). When Redis cannot answer in time (no connection, an error, the timeout), the
request is decided by ``on_unavailable``: ``local`` asks this process's own limiter,
``allow`` admits, ``deny`` refuses (``limits_unavailable``). Nothing else waits: once
the connection is back (txredisapi's ClientService reconnects), the next request is
shared again. The change between Redis answering and not is logged once each way.

Concurrency leases are renewed every third of ``lease_ttl``, all in one call; a lease
whose holder died (a worker, a host, the network to it) expires by itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from promgate.config.model import Limits, RedisLimits
from promgate.core.reasons import Reason
from promgate.metrics import SharedLimitsMetrics
from promgate.ratelimit import Admission, Holder, RateLimiter
from promgate.redis_link import RedisLink, TxRedisLink
from promgate.redis_scripts import ADMIT, RENEW, bucket_key, lease_key

__all__ = [
    "LIMITS_UNAVAILABLE",
    "SharedLimiter",
    "shared_limiter",
]

#: The refusal while Redis cannot answer and ``on_unavailable`` is ``deny``.
LIMITS_UNAVAILABLE = Admission(allowed=False, reason=Reason.LIMITS_UNAVAILABLE, retry_after=0.0)
#: How many calls may be overdue (timed out, no reply yet) before further requests stop
#: being sent to a Redis that does not answer, and are decided at once instead.
MAX_OVERDUE = 64
#: The start of Redis's error for a write sent to a replica.
_NOT_MASTER = "READONLY"


class _UnavailableError(Exception):
    """Redis did not answer in time: ``kind`` is an error-kind label."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class _Lease:
    """A place among a route's ``max_concurrent``, held in Redis; renewed while held."""

    __slots__ = ("key", "limiter", "member")

    def __init__(self, limiter: SharedLimiter, key: str, member: str) -> None:
        self.limiter = limiter
        self.key = key
        self.member = member

    def release(self, route: str) -> None:
        self.limiter.give_back(self.key, self.member)


class _Nothing:
    """What an admission holds when there is nothing to give back (``allow``, or a route
    with a rate but no cap)."""

    __slots__ = ()

    def release(self, route: str) -> None:
        pass


_NOTHING = _Nothing()


class _Call:
    """One call to Redis raced against the timeout: ``result`` fires with the reply, or
    fails with ``_UnavailableError``, whichever comes first; ``late`` gets a reply that came
    after the timeout."""

    __slots__ = ("late", "limiter", "result", "sent", "timer")

    def __init__(
        self, limiter: SharedLimiter, sent: Deferred[Any], late: Callable[[Any], None] | None
    ) -> None:
        self.limiter = limiter
        self.late = late
        self.result: Deferred[Any] = Deferred()
        self.sent = limiter.clock.seconds()
        self.timer: IDelayedCall | None = limiter.clock.callLater(
            limiter.settings.timeout, self._timed_out
        )
        sent.addCallbacks(self._replied, self._failed)

    def _timed_out(self) -> None:
        self.timer = None
        self.limiter.overdue(True)
        self.result.errback(_UnavailableError("timeout"))

    def _settle(self) -> bool:
        """The reply (or error) came: whether it came in time."""
        self.limiter.metrics.latency.observe(self.limiter.clock.seconds() - self.sent)
        timer, self.timer = self.timer, None
        if timer is None:
            self.limiter.overdue(False)
            return False
        timer.cancel()
        return True

    def _replied(self, reply: Any) -> None:
        if self._settle():
            self.result.callback(reply)
        elif self.late is not None:
            self.late(reply)

    def _failed(self, failure: Failure) -> None:
        import txredisapi  # type: ignore[import-untyped]

        kind = "script" if failure.check(txredisapi.ResponseError) else "connection"
        if kind == "script" and str(failure.value).startswith(_NOT_MASTER):
            # A master that became a replica (a failover) answers every write so: the
            # connection is made again, to whichever server is the master now.
            self.limiter.link.abort()
        if self._settle():
            self.result.errback(_UnavailableError(kind))
        else:
            self.limiter.metrics.errors.labels(kind).inc()


class SharedLimiter(Service):
    """The limits of every route, shared through Redis (see the module's docstring);
    ``local`` is this process's limiter, for ``on_unavailable: local``. A service: the
    connection is made when it starts and closed when it stops."""

    log = Logger()

    def __init__(
        self,
        settings: RedisLimits,
        clock: IReactorTime,
        local: RateLimiter,
        metrics: SharedLimitsMetrics,
        link: RedisLink,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.local = local
        self.metrics = metrics
        self.link = link
        self._ttl_ms = max(1, round(settings.lease_ttl * 1000))
        self._holder = os.urandom(8).hex()
        self._counter = 0
        #: Leases held now: lease set key -> holders.
        self._leases: dict[str, set[str]] = {}
        self._overdue = 0
        self._overdue_since = 0.0
        #: Whether Redis answered the last call in time (None: not asked yet).
        self._up: bool | None = None
        self._tick: IDelayedCall | None = None
        self.unavailable = metrics.unavailable.labels(settings.on_unavailable)

    # -- the service -------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.link.start()
        self._tick = self.clock.callLater(self._interval(), self._renew)

    def _interval(self) -> float:
        """Leases are renewed every third of their ttl; while Redis does not answer, it
        is asked again at least every second."""
        third = self.settings.lease_ttl / 3
        return third if self._up else min(third, 1.0)

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._tick is not None and self._tick.active():
            self._tick.cancel()
        self._tick = None
        return self.link.stop()

    # -- admission ---------------------------------------------------------------------------

    def admit(
        self, route: str, limits: Limits, identity: str, target: str
    ) -> Deferred[Admission | Holder]:
        """Ask Redis whether a request on ``route`` may go (see the module docstring)."""
        conn = self.link.connection()
        if conn is None:
            return succeed(self._without_redis("connection", route, limits, identity, target))
        if self._overdue >= MAX_OVERDUE:
            return succeed(self._without_redis(None, route, limits, identity, target))
        cap = limits.max_concurrent or 0
        leases = lease_key(self.settings.key_prefix, route)
        member = ""
        if cap:
            self._counter += 1
            member = f"{self._holder}:{self._counter}"
        rate = limits.rate or 0
        bucket = (
            bucket_key(self.settings.key_prefix, route, limits, identity, target)
            if rate
            else leases
        )
        args = [cap, repr(float(rate)), max(1, limits.burst), self._ttl_ms, member]
        try:
            sent = conn.eval(ADMIT, [leases, bucket], args)
        except Exception:
            return succeed(self._without_redis("connection", route, limits, identity, target))
        late = (lambda reply: self._late_admission(reply, leases, member)) if cap else None
        call = _Call(self, sent, late)
        answer: Deferred[Admission | Holder] = call.result.addCallback(
            self._answered, leases, member
        )
        return answer.addErrback(self._not_answered, route, limits, identity, target)

    def _answered(self, reply: Any, leases: str, member: str) -> Admission | Holder:
        if not isinstance(reply, list) or len(reply) != 2:
            raise _UnavailableError("script")
        code, wait = reply
        if code not in (0, 1, 2) or not isinstance(wait, int) or wait < 0:
            raise _UnavailableError("script")
        self._answering(True, None)
        if code == 0:
            if not member:
                return _NOTHING
            self._leases.setdefault(leases, set()).add(member)
            return _Lease(self, leases, member)
        reason = "rate_limited" if code == 1 else "concurrency_limited"
        return Admission(allowed=False, reason=reason, retry_after=wait / 1000.0)

    def _not_answered(
        self, failure: Failure, route: str, limits: Limits, identity: str, target: str
    ) -> Admission | Holder:
        failure.trap(_UnavailableError)
        kind = failure.value.kind  # type: ignore[union-attr]
        return self._without_redis(kind, route, limits, identity, target)

    def _without_redis(
        self, kind: str | None, route: str, limits: Limits, identity: str, target: str
    ) -> Admission | Holder:
        """Decide as ``on_unavailable`` says; ``kind`` is what went wrong (None: nothing
        was sent, too many calls are overdue already)."""
        if kind is not None:
            self.metrics.errors.labels(kind).inc()
        self._answering(False, kind or "timeout")
        self.unavailable.inc()
        mode = self.settings.on_unavailable
        if mode == "allow":
            return _NOTHING
        if mode == "deny":
            return LIMITS_UNAVAILABLE
        admission = self.local.admit(route, limits, identity, target)
        return self.local if admission.allowed else admission

    def _late_admission(self, reply: Any, leases: str, member: str) -> None:
        """An admission answered after its request was decided without it: the lease it
        took is given back (the token stays taken)."""
        if isinstance(reply, list) and reply and reply[0] == 0:
            self._send("ZREM", leases, member)

    # -- leases ------------------------------------------------------------------------------

    def give_back(self, key: str, member: str) -> None:
        """A lease's request is over: remove it (if Redis cannot be told, it expires)."""
        held = self._leases.get(key)
        if held is not None:
            held.discard(member)
            if not held:
                del self._leases[key]
        self._send("ZREM", key, member)

    def held(self) -> int:
        """How many leases this process holds now."""
        return sum(len(members) for members in self._leases.values())

    def _send(self, *command: Any) -> None:
        """A command nobody waits for, sent without asking for its reply (a release that
        does not reach Redis expires); a connection that is not there is counted."""
        conn = self.link.connection()
        if conn is None:
            return
        try:
            conn.forget(*command)
        except Exception:
            self.metrics.errors.labels("connection").inc()

    def _renew(self) -> None:
        """Every third of the lease ttl: renew the leases held, in one call (or, holding
        none while Redis is not answering, see whether it answers again); cut a
        connection whose replies are overdue for longer than a lease lives."""
        self._tick = self.clock.callLater(self._interval(), self._renew)
        if self._overdue and self.clock.seconds() - self._overdue_since > self.settings.lease_ttl:
            self.log.warn("shared limits: Redis replies overdue; reconnecting")
            self.link.abort()
        conn = self.link.connection()
        if conn is None:
            self._answering(False, "connection")
            return
        if self._leases:
            keys = list(self._leases)
            args: list[Any] = [self._ttl_ms]
            for key in keys:
                members = self._leases[key]
                args.append(len(members))
                args.extend(members)
            sent = conn.eval(RENEW, keys, args)
        elif self._up is not True:
            sent = conn.execute_command("PING")
        else:
            return
        _Call(self, sent, None).result.addCallbacks(
            lambda _: self._answering(True, None), self._renew_failed
        )

    def _renew_failed(self, failure: Failure) -> None:
        failure.trap(_UnavailableError)
        kind = failure.value.kind  # type: ignore[union-attr]
        self.metrics.errors.labels(kind).inc()
        self._answering(False, kind)

    # -- state -------------------------------------------------------------------------------

    def overdue(self, more: bool) -> None:
        """A call timed out (``more``), or the reply of one that did came at last."""
        if more:
            if not self._overdue:
                self._overdue_since = self.clock.seconds()
            self._overdue += 1
        elif self._overdue:
            self._overdue -= 1

    def _answering(self, up: bool, kind: str | None) -> None:
        """Log the change between Redis answering and not, once each way."""
        if up is self._up:
            return
        was, self._up = self._up, up
        self.metrics.up.set(1 if up else 0)
        endpoint = self.settings.where
        if up:
            self.log.info(
                "shared limits: Redis at {endpoint} answers; limits are shared", endpoint=endpoint
            )
        elif was is not None or kind is not None:
            self.log.warn(
                "shared limits: Redis at {endpoint} does not answer ({kind}); "
                "deciding {mode} until it does",
                endpoint=endpoint,
                kind=kind,
                mode=self.settings.on_unavailable,
            )


def shared_limiter(
    settings: RedisLimits, reactor: Any, local: RateLimiter, metrics: SharedLimitsMetrics
) -> SharedLimiter:
    """The shared limiter ``settings`` describe, connecting through txredisapi once
    started."""
    return SharedLimiter(settings, reactor, local, metrics, TxRedisLink(settings, reactor))
