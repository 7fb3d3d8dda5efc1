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

import hashlib
import os
from collections.abc import Callable
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from promgate.config.model import Limits, RedisLimits
from promgate.core.reasons import Reason
from promgate.metrics import SharedLimitsMetrics
from promgate.ratelimit import Admission, Holder, RateLimiter
from promgate.redis_scripts import ADMIT, RENEW, bucket_key, lease_key

__all__ = [
    "LIMITS_UNAVAILABLE",
    "RedisCommands",
    "RedisLink",
    "SharedLimiter",
    "TxRedisLink",
    "shared_limiter",
]

#: The refusal while Redis cannot answer and ``on_unavailable`` is ``deny``.
LIMITS_UNAVAILABLE = Admission(allowed=False, reason=Reason.LIMITS_UNAVAILABLE, retry_after=0.0)
#: How many calls may be overdue (timed out, no reply yet) before further requests stop
#: being sent to a Redis that does not answer, and are decided at once instead.
MAX_OVERDUE = 64


class RedisCommands(Protocol):
    """What is asked of one connection to Redis (a txredisapi ``RedisProtocol``)."""

    def eval(self, script: bytes, keys: list[str], args: list[Any]) -> Deferred[Any]: ...

    def execute_command(self, *args: Any) -> Deferred[Any]: ...

    def forget(self, *args: Any) -> None:
        """Send a command without waiting for (or getting) its reply."""


class RedisLink(Protocol):
    """A connection to Redis kept up by someone else (reconnecting as needed)."""

    def connection(self) -> RedisCommands | None:
        """The connection ready for commands now, if any."""

    def start(self) -> None: ...

    def stop(self) -> Deferred[None]: ...

    def abort(self) -> None:
        """Cut the connection (it is made again): its replies are overdue for too long."""


def _command(parts: tuple[Any, ...]) -> bytes:
    """``parts`` as one Redis command in RESP (bytes as they are, str as UTF-8, ints in
    decimal)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        if isinstance(part, str):
            part = part.encode()
        elif isinstance(part, int):
            part = b"%d" % part
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def _reply(reply: Any) -> Any:
    if isinstance(reply, Exception):
        raise reply
    return reply


def _nothing_pending(transport: tcp.Connection) -> bool:
    """Whether Twisted holds nothing yet to send on ``transport``, so that bytes sent
    straight to its socket keep their order. It looks at the transport's own buffers,
    which Twisted keeps private: a Twisted that keeps them otherwise is answered "no",
    and every write then goes through the transport."""
    try:
        return (
            not transport._tempDataBuffer
            and transport.offset == len(transport.dataBuffer)
            and not transport.disconnecting
        )
    except AttributeError:
        return False


class _Wire:
    """The commands of one connected txredisapi protocol, written straight to its
    transport: txredisapi still connects, authenticates, reconnects and parses the
    replies (its reply queue pairs them with the commands in order), but the few
    commands asked here skip its general encoding and Deferred chains. The commands of
    one reactor turn go out together at its end, in one ``send`` when the socket takes
    them all (else through the transport, in order). A script is sent whole (``EVAL``)
    until Redis has it, by its SHA-1 after (``EVALSHA``); a ``NOSCRIPT`` (the script
    cache was flushed) sends it whole again."""

    __slots__ = ("clock", "out", "proto")

    def __init__(self, proto: Any, clock: IReactorTime) -> None:
        self.proto = proto
        self.clock = clock
        self.out: list[bytes] = []
        # A release has no reply to carry Redis's ACK: without this, the next command
        # would wait for the delayed ACK (Nagle), some 40 ms.
        set_no_delay = getattr(proto.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

    def _queue(self, data: bytes) -> None:
        proto = self.proto
        if not proto.connected:
            raise ConnectionError("not connected")
        if not self.out:
            self.clock.callLater(0, self._flush)
        self.out.append(data)

    def _flush(self) -> None:
        data = b"".join(self.out)
        self.out.clear()
        proto = self.proto
        transport = proto.transport
        if not proto.connected or transport is None:
            return  # the replies awaited have failed with the connection
        if isinstance(transport, tcp.Connection) and _nothing_pending(transport):
            try:
                sent = transport.socket.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # the transport finds the failure itself
            data = data[sent:]
        if data:
            transport.write(data)

    def _write(self, parts: tuple[Any, ...]) -> Deferred[Any]:
        self._queue(_command(parts))
        d: Deferred[Any] = self.proto.replyQueue.get()
        return d.addCallback(_reply)

    def forget(self, *args: Any) -> None:
        """Send a command whose reply nobody needs: Redis is told not to send it
        (``CLIENT REPLY SKIP``), so no reply is read or parsed."""
        self._queue(_SKIP + _command(args))

    def eval(self, script: bytes, keys: list[str], args: list[Any]) -> Deferred[Any]:
        sha = _sha(script)
        known: set[str] = self.proto.script_hashes
        if sha in known:
            d = self._write(("EVALSHA", sha, len(keys), *keys, *args))
            return d.addErrback(self._noscript, script, keys, args)
        d = self._write(("EVAL", script, len(keys), *keys, *args))
        return d.addCallback(self._loaded, sha)

    def _loaded(self, reply: Any, sha: str) -> Any:
        self.proto.script_hashes.add(sha)
        return reply

    def _noscript(self, failure: Failure, script: bytes, keys: list[str], args: list[Any]) -> Any:
        if str(failure.value).startswith("NOSCRIPT"):
            self.proto.script_hashes.discard(_sha(script))
            return self.eval(script, keys, args)
        return failure

    def execute_command(self, *args: Any) -> Deferred[Any]:
        return self._write(args)


_SKIP = _command(("CLIENT", "REPLY", "SKIP"))
_SHAS: dict[bytes, str] = {}


def _sha(script: bytes) -> str:
    sha = _SHAS.get(script)
    if sha is None:
        sha = _SHAS[script] = hashlib.sha1(script).hexdigest()
    return sha


class TxRedisLink:
    """One txredisapi connection to the configured endpoint (any Twisted client endpoint
    string, ``tls:`` included), authenticated with the password if one is given; its
    ClientService reconnects with backoff."""

    def __init__(self, settings: RedisLimits, reactor: Any) -> None:
        self._settings = settings
        self._reactor = reactor
        self._factory: Any = None
        self._wire: _Wire | None = None

    def start(self) -> None:
        import txredisapi  # type: ignore[import-untyped]
        from twisted.internet.endpoints import clientFromString

        factory = txredisapi.RedisFactory(
            self._settings.endpoint, None, 1, isLazy=True, password=self._settings.password
        )
        # Fires with the handler once connected, or fails if the password is refused
        # (logged by txredisapi): nobody waits for it here.
        factory.deferred.addErrback(lambda _: None)
        factory.startConnecting(clientFromString(self._reactor, self._settings.endpoint))
        self._factory = factory

    def connection(self) -> RedisCommands | None:
        factory = self._factory
        if factory is None:
            return None
        wire = self._wire
        if wire is not None and wire.proto.connected:
            return wire
        for conn in factory.pool:
            if conn.connected:
                self._wire = _Wire(conn, self._reactor)
                return self._wire
        return None

    def stop(self) -> Deferred[None]:
        factory, self._factory = self._factory, None
        if factory is None:
            return succeed(None)
        d: Deferred[None] = factory.disconnect()
        return d

    def abort(self) -> None:
        wire = self.connection()
        transport = getattr(getattr(wire, "proto", None), "transport", None)
        if transport is not None:
            transport.abortConnection()


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
        import txredisapi

        kind = "script" if failure.check(txredisapi.ResponseError) else "connection"
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
        endpoint = self.settings.endpoint
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
