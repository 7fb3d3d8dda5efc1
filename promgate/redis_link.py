"""The connection to the Redis that holds the shared limits (promgate.shared_limits).

txredisapi connects, authenticates, reconnects (its ClientService) and parses replies;
the few commands the limits need are encoded here, straight into Redis's wire format,
and the commands of one reactor turn are sent in one write. Redis is reached at a
Twisted client endpoint, or through Redis Sentinel (promgate.redis_sentinel), which is
asked for the current master before every connection.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from twisted.internet import tcp
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from promgate.config.model import RedisLimits
from promgate.redis_sentinel import SentinelMaster, Sentinels

__all__ = ["MASTER_CHECK_INTERVAL", "RedisCommands", "RedisLink", "TxRedisLink"]

#: How often, in seconds, the sentinels are asked whether the master is still the one
#: connected to.
MASTER_CHECK_INTERVAL = 1.0

_log = Logger()


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
        """Cut the connection (it is made again): its replies are overdue for too long,
        or it is to a server that is no longer the master."""


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
    """One txredisapi connection, authenticated with the password if one is given; its
    ClientService reconnects with backoff. Redis is the configured endpoint (any Twisted
    client endpoint string, ``tls:`` included), or the master the sentinels name."""

    def __init__(self, settings: RedisLimits, reactor: Any) -> None:
        self._settings = settings
        self._reactor = reactor
        self._factory: Any = None
        self._sentinels: Sentinels | None = None
        self._master: SentinelMaster | None = None
        self._watch: LoopingCall | None = None
        self._wire: _Wire | None = None

    def start(self) -> None:
        import txredisapi  # type: ignore[import-untyped]
        from twisted.internet.endpoints import clientFromString

        settings = self._settings
        endpoint: IStreamClientEndpoint
        if settings.sentinel is None:
            assert settings.endpoint is not None
            factory = txredisapi.RedisFactory(
                settings.endpoint, None, 1, isLazy=True, password=settings.password
            )
            endpoint = clientFromString(self._reactor, settings.endpoint)
        else:
            sentinel = settings.sentinel
            self._sentinels = Sentinels.connect(
                sentinel.endpoints, sentinel.password, self._reactor
            )
            # Its connections check that the server is a master (ROLE), and drop it if not.
            factory = txredisapi.SentinelConnectionFactory(
                self._sentinels,
                sentinel.master,
                True,
                None,
                None,
                1,
                isLazy=True,
                password=settings.password,
            )
            endpoint = self._master = SentinelMaster(
                self._reactor, self._sentinels, sentinel.master
            )
            self._watch = LoopingCall(self._check_master)
            self._watch.clock = self._reactor
            self._watch.start(MASTER_CHECK_INTERVAL, now=False)
        # Fires with the handler once connected, or fails if the password is refused
        # (logged by txredisapi): nobody waits for it here.
        factory.deferred.addErrback(lambda _: None)
        factory.startConnecting(endpoint)
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

    def _check_master(self) -> Deferred[None] | None:
        """Whether the sentinels still name the master connected to: a failover's new
        master is known to them at once, but the old one, if it still runs, is only
        turned into a replica (and its clients cut) when a sentinel next looks at it,
        up to 10 seconds later; meanwhile it would take what the new one is given."""
        master = self._master
        if master is None or self.connection() is None:
            return None

        def moved(address: tuple[str, int] | None) -> None:
            if address is not None and self.connection() is not None:
                _log.warn(
                    "shared limits: the sentinels now name {host}:{port} the master of "
                    "{name}; connecting to it",
                    host=address[0],
                    port=address[1],
                    name=master.name,
                )
                self.abort()

        return master.moved().addCallback(moved)

    def stop(self) -> Deferred[None]:
        watch, self._watch = self._watch, None
        if watch is not None and watch.running:
            watch.stop()
        factory, self._factory = self._factory, None
        sentinels, self._sentinels = self._sentinels, None
        if factory is None:
            return succeed(None)
        d: Deferred[Any] = factory.disconnect()
        if sentinels is not None:
            d = gatherResults([d, sentinels.disconnect()], consumeErrors=True)
        return d.addCallback(lambda _: None)

    def abort(self) -> None:
        wire = self.connection()
        transport = getattr(getattr(wire, "proto", None), "transport", None)
        if transport is not None:
            transport.abortConnection()
