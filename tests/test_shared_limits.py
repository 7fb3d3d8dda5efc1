"""Limits shared through a real Redis (``shared_limits``), on the real reactor: limiters
standing for two gateways hold one budget, retry delays are exact in Redis's time,
leases outlive no holder, and a Redis that is gone or silent costs at most the timeout
before ``on_unavailable`` decides; sharing resumes by itself."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from promgate.config.model import Limits, RedisLimits
from promgate.core.reasons import Reason
from promgate.metrics import Metrics, SharedLimitsMetrics
from promgate.ratelimit import Admission, RateLimiter
from promgate.redis_link import TxRedisLink
from promgate.redis_scripts import bucket_key, encode, lease_key
from promgate.shared_limits import SharedLimiter
from promgate.testing.integration import cleanups, closed_port, workdir
from promgate.testing.redis import RedisServer, require_redis_server, until

_server: RedisServer | None = None


def server() -> RedisServer:
    """One redis-server for the module's tests (each uses its own key prefix)."""
    global _server
    require_redis_server()
    if _server is None or _server.process is None:
        _server = RedisServer(workdir("redis")).start()
        cleanups.append(_server.stop)  # at exit: trial has no module-level fixtures
    return _server


class SharedLimiterTests(TestCase):
    """Two limiters on one Redis and one prefix: two gateways' view of one budget."""

    timeout = 60

    def setUp(self) -> None:
        self.redis = server()
        self.prefix = f"t{os.urandom(4).hex()}:"

    def limiter(self, **settings: Any) -> tuple[SharedLimiter, Metrics, RateLimiter]:
        endpoint = settings.pop("endpoint", self.redis.endpoint)
        redis = RedisLimits(endpoint=endpoint, key_prefix=self.prefix, **settings)
        metrics = Metrics()
        local = RateLimiter(reactor)  # type: ignore[arg-type]
        shared = SharedLimiter(
            redis,
            reactor,  # type: ignore[arg-type]
            local,
            SharedLimitsMetrics(metrics.registry),
            TxRedisLink(redis, reactor),
        )
        shared.startService()
        self.addCleanup(shared.stopService)
        return shared, metrics, local

    async def connected(self, *limiters: SharedLimiter) -> None:
        for limiter in limiters:

            async def ready(limiter: SharedLimiter = limiter) -> bool:
                return limiter.link.connection() is not None

            await until(ready, "the connection to Redis")

    def test_one_budget(self) -> Deferred[None]:
        """A burst of 3 is 3 across both limiters; the fourth is refused by either, with
        a retry delay in whole milliseconds of Redis's time."""

        async def run() -> None:
            a, metrics_a, local_a = self.limiter()
            b, _, _ = self.limiter()
            await self.connected(a, b)
            limits = Limits(rate=0.5, burst=3, per="identity")
            answers = []
            for limiter in (a, b, a, b):
                answers.append(await limiter.admit("node", limits, "prometheus", "t:1"))
            refused = answers[3]
            self.assertFalse(any(isinstance(x, Admission) for x in answers[:3]))
            assert isinstance(refused, Admission)
            self.assertEqual(refused.reason, "rate_limited")
            self.assertGreater(refused.retry_after, 0.0)
            self.assertLessEqual(refused.retry_after, 2.0)
            self.assertEqual(round(refused.retry_after * 1000), refused.retry_after * 1000)
            # Another identity has its own bucket; this process's limiter was not asked.
            other = await a.admit("node", limits, "ops", "t:1")
            self.assertNotIsInstance(other, Admission)
            self.assertEqual(local_a.bucket_count(), 0)
            self.assertEqual(
                metrics_a.registry.get_sample_value("promgate_shared_limits_redis_up"), 1
            )

        return Deferred.fromCoroutine(run())

    def test_retry_after_exact(self) -> Deferred[None]:
        """The delay is the fewest milliseconds after which the bucket holds a token:
        0.3 tokens/s from empty is 3334 ms (3333 would give 0.9999)."""

        async def run() -> None:
            a, _, _ = self.limiter()
            await self.connected(a)
            limits = Limits(rate=0.3, burst=2, per="identity_target")
            key = bucket_key(self.prefix, "node", limits, "pro:me", "[::1]:9100")
            self.assertEqual(key, f"{self.prefix}node:b:p:pro%3Ame:%5B%3A%3A1%5D%3A9100")
            # An empty bucket stamped in the future of Redis's clock: it refills nothing.
            self.redis.command("HSET", key, "t", "0", "s", "99999999999999")
            refused = await a.admit("node", limits, "pro:me", "[::1]:9100")
            assert isinstance(refused, Admission)
            self.assertEqual(refused.retry_after, 3.334)
            self.assertEqual(RateLimiter.retry_after_header(refused), "4")
            self.redis.command("HSET", key, "t", "0.5", "s", "99999999999999")
            refused = await a.admit("node", limits, "pro:me", "[::1]:9100")
            assert isinstance(refused, Admission)
            self.assertEqual(refused.retry_after, 1.667)
            # Stamped exactly that long ago by Redis's clock: admitted.
            seconds, micros = self.redis_time()
            stamp = seconds * 1000 + micros // 1000 - 3334
            self.redis.command("HSET", key, "t", "0", "s", str(stamp))
            admitted = await a.admit("node", limits, "pro:me", "[::1]:9100")
            self.assertNotIsInstance(admitted, Admission)
            # The bucket expires when it would be full again.
            ttl = self.redis.command("PTTL", key)
            assert ttl is not None
            self.assertGreater(int(ttl[1:]), 0)

        return Deferred.fromCoroutine(run())

    def redis_time(self) -> tuple[int, int]:
        import socket

        with socket.create_connection(("127.0.0.1", self.redis.port), timeout=2) as s:
            s.sendall(b"TIME\r\n")
            data = b""
            while data.count(b"\r\n") < 5:
                data += s.recv(100)
        lines = data.split(b"\r\n")
        return int(lines[2]), int(lines[4])

    def hget(self, key: str, field: str) -> bytes:
        import socket

        with socket.create_connection(("127.0.0.1", self.redis.port), timeout=2) as s:
            s.sendall(f"HGET {key} {field}\r\n".encode())
            data = b""
            while data.count(b"\r\n") < 2:
                data += s.recv(100)
        return data.split(b"\r\n")[1]

    def test_shared_concurrency_cap(self) -> Deferred[None]:
        """A cap of 2 is 2 across both; released places are free for either."""

        async def run() -> None:
            a, _, _ = self.limiter()
            b, _, _ = self.limiter()
            await self.connected(a, b)
            limits = Limits(max_concurrent=2)
            first = await a.admit("node", limits, "x", "t:1")
            second = await b.admit("node", limits, "y", "t:2")
            third = await a.admit("node", limits, "z", "t:3")
            assert isinstance(third, Admission)
            self.assertEqual(third.reason, "concurrency_limited")
            self.assertNotIsInstance(first, Admission)
            assert not isinstance(second, Admission)
            self.assertEqual((a.held(), b.held()), (1, 1))
            second.release("node")
            self.assertEqual(b.held(), 0)

            async def admitted() -> Any:
                answer = await a.admit("node", limits, "z", "t:3")
                return answer if not isinstance(answer, Admission) else None

            await until(admitted, "the released place")

        return Deferred.fromCoroutine(run())

    def test_one_turn_several_admissions(self) -> Deferred[None]:
        """Admissions asked in one reactor turn go out together, and each is decided on
        its own, in order: a burst of 3 admits three of five, the two refused take
        nothing from the bucket and get the exact delay in Redis's milliseconds."""

        async def run() -> None:
            a, _, _ = self.limiter()
            await self.connected(a)
            limits = Limits(rate=0.3, burst=3, per="identity")
            asked = [a.admit("node", limits, "prometheus", "t:1") for _ in range(5)]
            answers = await gatherResults(asked)
            self.assertFalse(any(isinstance(x, Admission) for x in answers[:3]))
            for refused in answers[3:]:
                assert isinstance(refused, Admission)
                self.assertEqual(refused.reason, "rate_limited")
                millis = refused.retry_after * 1000
                self.assertEqual(round(millis), millis)
                self.assertTrue(3330 <= millis <= 3334, millis)
            key = bucket_key(self.prefix, "node", limits, "prometheus", "t:1")
            # Three taken from three (plus what refilled meanwhile): nothing below zero.
            level = float(self.hget(key, "t"))
            self.assertTrue(0.0 <= level < 0.1, level)

        return Deferred.fromCoroutine(run())

    def test_one_turn_several_releases(self) -> Deferred[None]:
        """Releases of one turn go out together, without replies; the commands after
        them still get their own replies, and the places are free again."""

        async def run() -> None:
            a, metrics, _ = self.limiter()
            await self.connected(a)
            limits = Limits(max_concurrent=3)
            held = await gatherResults([a.admit("node", limits, "x", "t:1") for _ in range(3)])
            refused = await a.admit("node", limits, "x", "t:1")
            assert isinstance(refused, Admission)
            self.assertEqual(refused.reason, "concurrency_limited")
            for lease in held:
                assert not isinstance(lease, Admission)
                lease.release("node")
            self.assertEqual(a.held(), 0)
            again = await gatherResults([a.admit("node", limits, "x", "t:1") for _ in range(3)])
            self.assertFalse(any(isinstance(x, Admission) for x in again))
            self.assertEqual(self.redis.command("ZCARD", lease_key(self.prefix, "node")), b":3")
            errors = metrics.registry.get_sample_value(
                "promgate_shared_limits_redis_errors_total", {"kind": "connection"}
            )
            self.assertIn(errors, (None, 0.0))

        return Deferred.fromCoroutine(run())

    def test_script_cache_flushed(self) -> Deferred[None]:
        """After ``SCRIPT FLUSH`` the admission script is sent whole again."""

        async def run() -> None:
            a, metrics, _ = self.limiter()
            await self.connected(a)
            # Slow enough that the bucket, which expires once it would be full again,
            # is still there when it is looked at.
            limits = Limits(rate=0.001, burst=10, per="identity")
            for _ in range(2):
                self.assertNotIsInstance(await a.admit("node", limits, "x", "t:1"), Admission)
            self.assertEqual(self.redis.command("SCRIPT", "FLUSH"), b"+OK")
            self.assertNotIsInstance(await a.admit("node", limits, "x", "t:1"), Admission)
            self.assertNotIsInstance(await a.admit("node", limits, "x", "t:1"), Admission)
            # Redis decided each (this process's limiter was not asked).
            unavailable = metrics.registry.get_sample_value(
                "promgate_shared_limits_unavailable_total", {"on_unavailable": "local"}
            )
            self.assertIn(unavailable, (None, 0.0))
            self.assertEqual(
                self.redis.command(
                    "HEXISTS", bucket_key(self.prefix, "node", limits, "x", "t:1"), "t"
                ),
                b":1",
            )

        return Deferred.fromCoroutine(run())

    def test_lease_of_a_dead_holder_expires(self) -> Deferred[None]:
        """A holder that renews keeps its lease past its ttl; one that is gone (stopped,
        not released) loses it after the ttl, and its place is free again."""

        async def run() -> None:
            a, _, _ = self.limiter(lease_ttl=1.0)
            b, _, _ = self.limiter(lease_ttl=1.0)
            await self.connected(a, b)
            limits = Limits(max_concurrent=1)
            held = await a.admit("node", limits, "x", "t:1")
            self.assertNotIsInstance(held, Admission)
            key = lease_key(self.prefix, "node")
            first = self.redis.command("ZRANGE", key, "0", "-1", "WITHSCORES")
            self.assertIsNotNone(first)

            async def renewed() -> bool:
                members = self.redis.keys(key)
                score = self.redis.command("ZCARD", key)
                return bool(members) and score == b":1" and self.scores(key) != self.first_score

            self.first_score = self.scores(key)
            await until(renewed, "a renewal of the lease")
            refused = await b.admit("node", limits, "y", "t:1")
            assert isinstance(refused, Admission)
            self.assertEqual(refused.reason, "concurrency_limited")
            await a.stopService()  # dies holding the lease

            async def free() -> bool:
                return not isinstance(await b.admit("node", limits, "y", "t:1"), Admission)

            await until(free, "the dead holder's lease to expire")

        return Deferred.fromCoroutine(run())

    def scores(self, key: str) -> list[str]:
        import socket

        with socket.create_connection(("127.0.0.1", self.redis.port), timeout=2) as s:
            s.sendall(f"ZRANGE {key} 0 -1 WITHSCORES\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(4096)
                data += chunk
                lines = data.split(b"\r\n")
                if lines and lines[0].startswith(b"*"):
                    count = int(lines[0][1:])
                    if len(lines) >= 1 + 2 * count + 1:
                        return [line.decode() for line in lines[1 : 1 + 2 * count]]
                if not chunk:
                    return []

    def test_unreachable(self) -> Deferred[None]:
        """No Redis at all: each mode decides at once, and says so in its metrics."""

        async def run() -> None:
            endpoint = f"tcp:127.0.0.1:{closed_port()}"
            limits = Limits(rate=0.001, burst=1, per="identity", max_concurrent=5)
            local, metrics, own = self.limiter(endpoint=endpoint, on_unavailable="local")
            first = await local.admit("node", limits, "x", "t")
            self.assertIs(first, own)
            second = await local.admit("node", limits, "x", "t")
            assert isinstance(second, Admission)
            self.assertEqual(second.reason, "rate_limited")
            self.assertEqual(
                metrics.registry.get_sample_value(
                    "promgate_shared_limits_unavailable_total", {"on_unavailable": "local"}
                ),
                2,
            )
            deny, _, _ = self.limiter(endpoint=endpoint, on_unavailable="deny")
            refused = await deny.admit("node", limits, "x", "t")
            assert isinstance(refused, Admission)
            self.assertEqual(refused.reason, Reason.LIMITS_UNAVAILABLE)
            allow, _, _ = self.limiter(endpoint=endpoint, on_unavailable="allow")
            for _ in range(3):
                self.assertNotIsInstance(await allow.admit("node", limits, "x", "t"), Admission)

        return Deferred.fromCoroutine(run())


class ConnectionTests(TestCase):
    """A password, and TLS: the endpoint string and ``password_file`` as configured."""

    timeout = 60

    def setUp(self) -> None:
        require_redis_server()

    def shared(self, redis: RedisServer, **settings: Any) -> tuple[SharedLimiter, Metrics]:
        config = RedisLimits(endpoint=redis.endpoint, **settings)
        metrics = Metrics()
        local = RateLimiter(reactor)  # type: ignore[arg-type]
        shared = SharedLimiter(
            config,
            reactor,  # type: ignore[arg-type]
            local,
            SharedLimitsMetrics(metrics.registry),
            TxRedisLink(config, reactor),
        )
        shared.startService()
        self.addCleanup(shared.stopService)
        return shared, metrics

    async def admitted_by_redis(self, shared: SharedLimiter) -> None:
        async def asked() -> bool:
            answer = await shared.admit("node", Limits(max_concurrent=5), "x", "t")
            if isinstance(answer, Admission) or answer is shared.local:
                if answer is shared.local:
                    shared.local.release("node")
                return False
            answer.release("node")
            return True

        await until(asked, "an admission by Redis")

    def test_password(self) -> Deferred[None]:
        """The password is sent (AUTH); a wrong one leaves the limits to
        ``on_unavailable``."""

        async def run() -> None:
            redis = RedisServer(workdir("redis-auth"), password="s3cret").start()
            self.addCleanup(redis.stop)
            good, _ = self.shared(redis, password="s3cret")
            await self.admitted_by_redis(good)
            bad, _ = self.shared(redis, password="wrong", on_unavailable="deny")
            link = bad.link
            assert isinstance(link, TxRedisLink)

            async def refused() -> bool:
                return bool(link._factory.stopped)  # txredisapi gave up: AUTH refused

            await until(refused, "the password to be refused")
            answer = await bad.admit("node", Limits(max_concurrent=5), "x", "t")
            assert isinstance(answer, Admission)
            self.assertEqual(answer.reason, Reason.LIMITS_UNAVAILABLE)

        return Deferred.fromCoroutine(run())

    def test_tls(self) -> Deferred[None]:
        """A ``tls:`` endpoint: Redis's certificate verified against ``trustRoots``."""

        async def run() -> None:
            from promgate.testing import TestPKI

            directory = workdir("redis-tls")
            pki = TestPKI(directory / "pki")
            tls = (pki.gate_cert, pki.gate_key, pki.ca_cert)
            redis = RedisServer(directory / "redis", tls=tls).start()
            self.addCleanup(redis.stop)
            self.assertTrue(redis.endpoint.startswith("tls:localhost:"))
            shared, _ = self.shared(redis)
            await self.admitted_by_redis(shared)

        return Deferred.fromCoroutine(run())


class RedisFailureTests(TestCase):
    """A Redis of its own, stopped and restarted, or paused, while a limiter uses it."""

    timeout = 90

    def setUp(self) -> None:
        require_redis_server()
        self.redis = RedisServer(workdir("redis-failure")).start()
        self.addCleanup(self.redis.stop)

    def limiter(self, **settings: Any) -> tuple[SharedLimiter, Metrics, RateLimiter]:
        redis = RedisLimits(endpoint=self.redis.endpoint, **settings)
        metrics = Metrics()
        local = RateLimiter(reactor)  # type: ignore[arg-type]
        shared = SharedLimiter(
            redis,
            reactor,  # type: ignore[arg-type]
            local,
            SharedLimitsMetrics(metrics.registry),
            TxRedisLink(redis, reactor),
        )
        shared.startService()
        self.addCleanup(shared.stopService)
        return shared, metrics, local

    def test_stopped_and_restarted(self) -> Deferred[None]:
        """Shared; Redis stops: this process's limits decide (``local``); Redis is back
        on the same port: shared again, without anything done."""

        async def run() -> None:
            shared, metrics, local = self.limiter(on_unavailable="local")
            limits = Limits(max_concurrent=10)

            async def is_shared() -> bool:
                answer = await shared.admit("node", limits, "x", "t")
                if answer is local:
                    local.release("node")
                    return False
                if not isinstance(answer, Admission):
                    answer.release("node")
                    return True
                return False

            await until(is_shared, "sharing to begin")
            self.redis.stop()

            async def is_local() -> bool:
                answer = await shared.admit("node", limits, "x", "t")
                if answer is local:
                    local.release("node")
                    return True
                if not isinstance(answer, Admission):
                    answer.release("node")
                return False

            await until(is_local, "the fallback to local limits")
            self.assertEqual(
                metrics.registry.get_sample_value("promgate_shared_limits_redis_up"), 0
            )
            self.assertGreater(
                metrics.registry.get_sample_value(
                    "promgate_shared_limits_redis_errors_total", {"kind": "connection"}
                )
                or 0,
                0,
            )
            self.redis.start()
            await until(is_shared, "sharing to resume", limit=600)
            self.assertEqual(
                metrics.registry.get_sample_value("promgate_shared_limits_redis_up"), 1
            )

        return Deferred.fromCoroutine(run())

    def test_paused(self) -> Deferred[None]:
        """A Redis that stops answering (SIGSTOP) costs the timeout, then
        ``on_unavailable: deny`` refuses; continued, it answers again, and the lease
        its late reply took is given back."""

        async def run() -> None:
            shared, metrics, _ = self.limiter(on_unavailable="deny", timeout=0.05)
            limits = Limits(max_concurrent=10)

            async def connected() -> bool:
                return shared.link.connection() is not None

            await until(connected, "the connection")
            self.redis.pause()
            try:
                refused = await shared.admit("node", limits, "x", "t")
            finally:
                self.redis.resume()
            assert isinstance(refused, Admission)
            self.assertEqual(refused.reason, Reason.LIMITS_UNAVAILABLE)
            self.assertEqual(
                metrics.registry.get_sample_value(
                    "promgate_shared_limits_redis_errors_total", {"kind": "timeout"}
                ),
                1,
            )
            self.assertEqual(
                metrics.registry.get_sample_value(
                    "promgate_shared_limits_unavailable_total", {"on_unavailable": "deny"}
                ),
                1,
            )

            async def answers() -> bool:
                answer = await shared.admit("node", limits, "x", "t")
                if isinstance(answer, Admission):
                    return False
                answer.release("node")
                return True

            await until(answers, "Redis to answer again")

            async def no_leases() -> bool:
                return self.redis.command("EXISTS", f"promgate:{encode('node')}:c") == b":0"

            await until(no_leases, "the late lease to be given back")

        return Deferred.fromCoroutine(run())
