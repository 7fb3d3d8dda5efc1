"""Shared limits through Redis Sentinel, on the real reactor with real servers: a master,
its replica and one sentinel. The limiter asks the sentinel where the master is, shares
its budget there, and after a failover finds the new master by itself."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from promgate.config.model import Limits, RedisLimits, RedisSentinel
from promgate.core.reasons import Reason
from promgate.metrics import Metrics, SharedLimitsMetrics
from promgate.ratelimit import Admission, RateLimiter
from promgate.redis_link import TxRedisLink
from promgate.redis_scripts import bucket_key
from promgate.shared_limits import SharedLimiter
from promgate.testing.integration import closed_port, workdir
from promgate.testing.redis import RedisServer, require_redis_server, until

#: The name the sentinel watches the master under.
NAME = "promgate"


class SentinelTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        require_redis_server()
        directory = workdir("redis-sentinel")
        self.master = self.started(RedisServer(directory / "master"))
        self.replica = self.started(RedisServer(directory / "replica", replica_of=self.master))
        self.sentinel = self.started(
            RedisServer(directory / "sentinel", sentinel=(NAME, self.master))
        )
        self.prefix = f"t{os.urandom(4).hex()}:"

    def started(self, server: RedisServer) -> RedisServer:
        self.addCleanup(server.stop)
        return server.start()

    def limiter(self, **settings: Any) -> tuple[SharedLimiter, Metrics]:
        sentinel = RedisSentinel(endpoints=(("127.0.0.1", self.sentinel.port),), master=NAME)
        redis = RedisLimits(endpoint=None, sentinel=sentinel, key_prefix=self.prefix, **settings)
        metrics = Metrics()
        shared = SharedLimiter(
            redis,
            reactor,  # type: ignore[arg-type]
            RateLimiter(reactor),  # type: ignore[arg-type]
            SharedLimitsMetrics(metrics.registry),
            TxRedisLink(redis, reactor),
        )
        shared.startService()
        self.addCleanup(shared.stopService)
        return shared, metrics

    def connected_to(self, shared: SharedLimiter) -> int | None:
        """The port of the Redis the limiter is connected to now, if any."""
        conn: Any = shared.link.connection()
        return None if conn is None else int(conn.proto.transport.getPeer().port)

    def test_budget_held_by_the_master(self) -> Deferred[None]:
        """The sentinel names the master; the limiter's buckets are kept there."""

        async def run() -> None:
            shared, _ = self.limiter()

            async def connected() -> int | None:
                return self.connected_to(shared)

            self.assertEqual(await until(connected, "a connection"), self.master.port)
            limits = Limits(rate=0.001, burst=2, per="identity")
            answers = [await shared.admit("node", limits, "x", "t:1") for _ in range(3)]
            self.assertFalse(any(isinstance(a, Admission) for a in answers[:2]))
            refused = answers[2]
            assert isinstance(refused, Admission)
            self.assertEqual(refused.reason, Reason.RATE_LIMITED)
            key = bucket_key(self.prefix, "node", limits, "x", "t:1")
            self.assertEqual(self.master.command("EXISTS", key), b":1")

        return Deferred.fromCoroutine(run())

    def test_master_with_a_password(self) -> Deferred[None]:
        """``password_file`` beside ``sentinel`` is the master's: the connection the
        sentinel leads to is authenticated with it."""

        async def run() -> None:
            master = self.started(RedisServer(workdir("redis-sentinel-auth"), password="pw"))
            sentinel = self.started(
                RedisServer(workdir("redis-sentinel-auth-s"), sentinel=("locked", master))
            )
            redis = RedisLimits(
                endpoint=None,
                sentinel=RedisSentinel(endpoints=(("127.0.0.1", sentinel.port),), master="locked"),
                password="pw",
                key_prefix=self.prefix,
                on_unavailable="deny",
            )
            shared = SharedLimiter(
                redis,
                reactor,  # type: ignore[arg-type]
                RateLimiter(reactor),  # type: ignore[arg-type]
                SharedLimitsMetrics(Metrics().registry),
                TxRedisLink(redis, reactor),
            )
            shared.startService()
            self.addCleanup(shared.stopService)
            limits = Limits(rate=0.001, burst=1, per="identity")

            async def admitted() -> bool:
                answer = await shared.admit("node", limits, "x", "t:1")
                return not isinstance(answer, Admission)

            await until(admitted, "an admission at the master")
            key = bucket_key(self.prefix, "node", limits, "x", "t:1")
            self.assertEqual(master.command("EXISTS", key), b":1")

        return Deferred.fromCoroutine(run())

    def test_stopped_while_asking(self) -> Deferred[None]:
        """Stopped while no sentinel answers (the only one is not listening): the
        question in flight is given up, and nothing is left on the reactor."""

        async def run() -> None:
            sentinel = RedisSentinel(endpoints=(("127.0.0.1", closed_port()),), master=NAME)
            redis = RedisLimits(endpoint=None, sentinel=sentinel)
            link = TxRedisLink(redis, reactor)
            link.start()
            await deferLater(reactor, 0.3, lambda: None)  # type: ignore[arg-type]
            self.assertIsNone(link.connection())
            await link.stop()

        return Deferred.fromCoroutine(run())

    def test_failover(self) -> Deferred[None]:
        """The sentinel promotes the replica while the old master, still up, stops
        answering (as across a network partition: its connection stays open). The
        limiter hears from the sentinel that the master moved, leaves the old one and
        shares at the new one, with nothing done; meanwhile ``deny`` refused what could
        not be decided."""

        async def run() -> None:
            shared, metrics = self.limiter(on_unavailable="deny")
            events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            limits = Limits(max_concurrent=100)

            async def shared_at(port: int) -> bool:
                answer = await shared.admit("node", limits, "x", "t:1")
                if isinstance(answer, Admission):
                    return False
                answer.release("node")
                return self.connected_to(shared) == port

            await until(lambda: shared_at(self.master.port), "sharing at the master")

            async def failed_over() -> bool:
                # The sentinel takes the replica once it has seen it (NOGOODSLAVE before).
                return self.sentinel.command("SENTINEL", "FAILOVER", NAME) == b"+OK"

            await until(failed_over, "the failover to start", limit=200, every=0.1)

            async def promoted() -> bool:
                return self.replica.command("ROLE") == b"*3"  # a master's answer

            await until(promoted, "the replica to be promoted")
            self.master.pause()
            await until(
                lambda: shared_at(self.replica.port), "sharing at the new master", limit=400
            )
            self.assertEqual(
                metrics.registry.get_sample_value("promgate_shared_limits_redis_up"), 1
            )
            moved = [e for e in events if "now name" in e.get("log_format", "")]
            self.assertEqual(len(moved), 1, moved)
            self.assertEqual((moved[0]["port"], moved[0]["name"]), (self.replica.port, NAME))

        return Deferred.fromCoroutine(run())
