"""The shared limiter's own logic on a deterministic clock, with the connection to Redis
scripted: the timeout race, what it counts, the transitions it logs once each way,
leases renewed in one call, and a Redis that stops answering altogether."""

from __future__ import annotations

from typing import Any

import txredisapi  # type: ignore[import-untyped]
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from promgate.config.model import Limits, RedisLimits
from promgate.core.reasons import Reason
from promgate.metrics import Metrics, SharedLimitsMetrics
from promgate.ratelimit import Admission, RateLimiter
from promgate.redis_scripts import bucket_key
from promgate.shared_limits import MAX_OVERDUE, SharedLimiter
from promgate.testing.redis import ScriptedRedis

CAPPED = Limits(max_concurrent=3)


class LimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = ScriptedRedis()
        self.local = RateLimiter(self.clock)
        self.limiter = self.make()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def make(self, **settings: Any) -> SharedLimiter:
        self.metrics = Metrics()
        limiter = SharedLimiter(
            RedisLimits(endpoint="tcp:h:1", lease_ttl=3.0, **settings),
            self.clock,
            self.local,
            SharedLimitsMetrics(self.metrics.registry),
            self.redis,
        )
        limiter.startService()
        self.addCleanup(limiter.stopService)
        return limiter

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def logged(self) -> list[str]:
        return [e["log_format"] for e in self.events if "shared limits" in e["log_format"]]

    def test_answered_in_time(self) -> None:
        d = self.limiter.admit("node", CAPPED, "a", "t")
        self.assertNoResult(d)
        self.redis.answer([0, 0])
        holder = self.successResultOf(d)
        self.assertNotIsInstance(holder, Admission)
        self.assertEqual(self.limiter.held(), 1)
        self.assertEqual(self.sample("promgate_shared_limits_redis_up"), 1)
        holder.release("node")  # type: ignore[union-attr]
        self.assertEqual(self.limiter.held(), 0)
        (zrem,) = self.redis.commands
        self.assertEqual(zrem[:2], ("ZREM", "promgate:node:c"))

    def test_timeout_is_the_most_it_costs(self) -> None:
        """No answer within the timeout: decided by ``on_unavailable`` then, and the
        late answer is not used (its lease is given back)."""
        d = self.limiter.admit("node", CAPPED, "a", "t")
        self.clock.advance(0.049)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.assertIs(self.successResultOf(d), self.local)
        self.assertEqual(self.local.in_flight("node"), 1)
        self.assertEqual(
            self.sample("promgate_shared_limits_redis_errors_total", kind="timeout"), 1
        )
        self.redis.answer([0, 0])
        self.assertEqual(self.limiter.held(), 0)
        self.assertEqual([c[0] for c in self.redis.commands], ["ZREM"])

    def test_error_reply(self) -> None:
        """An error reply is a ``script`` error; so is a reply of the wrong shape."""
        limiter = self.make(on_unavailable="deny")
        d = limiter.admit("node", CAPPED, "a", "t")
        _, _, call = self.redis.calls.pop()
        call.errback(txredisapi.ResponseError("ERR something"))
        refused = self.successResultOf(d)
        assert isinstance(refused, Admission)
        self.assertEqual(refused.reason, Reason.LIMITS_UNAVAILABLE)
        d = limiter.admit("node", CAPPED, "a", "t")
        self.redis.answer(b"OK")
        self.assertIsInstance(self.successResultOf(d), Admission)
        self.assertEqual(self.sample("promgate_shared_limits_redis_errors_total", kind="script"), 2)
        self.assertEqual(
            self.sample("promgate_shared_limits_unavailable_total", on_unavailable="deny"), 2
        )

    def test_write_to_a_replica(self) -> None:
        """``READONLY``, a former master's answer after a failover: a ``script`` error,
        and the connection is cut so that it is made again, to the master; another
        error leaves the connection be."""
        limiter = self.make(on_unavailable="deny")
        d = limiter.admit("node", CAPPED, "a", "t")
        _, _, call = self.redis.calls.pop()
        call.errback(txredisapi.ResponseError("ERR something"))
        self.successResultOf(d)
        self.assertTrue(self.redis.connected)
        d = limiter.admit("node", CAPPED, "a", "t")
        _, _, call = self.redis.calls.pop()
        call.errback(
            txredisapi.ResponseError("READONLY You can't write against a read only replica.")
        )
        refused = self.successResultOf(d)
        assert isinstance(refused, Admission)
        self.assertEqual(refused.reason, Reason.LIMITS_UNAVAILABLE)
        self.assertFalse(self.redis.connected)
        self.assertEqual(self.sample("promgate_shared_limits_redis_errors_total", kind="script"), 2)

    def test_transitions_logged_once_each(self) -> None:
        for _ in range(3):
            d = self.limiter.admit("node", CAPPED, "a", "t")
            self.redis.answer([0, 0])
            self.successResultOf(d).release("node")  # type: ignore[union-attr]
        self.redis.connected = False
        for _ in range(3):
            self.successResultOf(self.limiter.admit("node", CAPPED, "a", "t"))
        self.assertEqual(self.sample("promgate_shared_limits_redis_up"), 0)
        self.redis.connected = True
        for _ in range(3):
            d = self.limiter.admit("node", CAPPED, "a", "t")
            self.redis.answer([0, 0])
            self.successResultOf(d)
        messages = self.logged()
        self.assertEqual(len(messages), 3, messages)
        self.assertIn("answers", messages[0])
        self.assertIn("does not answer", messages[1])
        self.assertIn("answers", messages[2])

    def test_leases_renewed_in_one_call(self) -> None:
        """Every third of the lease ttl, the leases held on every route, in one call."""
        for route in ("node", "node", "blackbox"):
            d = self.limiter.admit(route, CAPPED, "a", "t")
            self.redis.answer([0, 0])
            self.successResultOf(d)
        self.clock.advance(1.0)
        ((keys, args, _),) = self.redis.calls
        self.assertEqual(keys, ["promgate:node:c", "promgate:blackbox:c"])
        self.assertEqual(args[:2], [3000, 2])
        self.assertEqual(args[4], 1)
        self.assertEqual(len(args), 6)
        self.redis.answer(0)
        self.clock.advance(1.0)
        self.assertEqual(len(self.redis.calls), 1)

    def test_silent_redis(self) -> None:
        """After MAX_OVERDUE calls without replies, requests are decided at once and no
        longer sent; a connection overdue for longer than a lease lives is cut."""
        many = Limits(max_concurrent=1000)
        for _ in range(MAX_OVERDUE):
            d = self.limiter.admit("node", many, "a", "t")
            self.clock.advance(0.05)
            self.successResultOf(d)
        sent = len(self.redis.calls)
        self.assertEqual(sent, MAX_OVERDUE)
        self.assertIs(self.successResultOf(self.limiter.admit("node", many, "a", "t")), self.local)
        self.assertEqual(len(self.redis.calls), sent)
        self.assertTrue(self.redis.connected)
        self.clock.advance(3.5)
        self.assertFalse(self.redis.connected)

    def test_unlimited_routes_are_never_asked(self) -> None:
        """The Admitter asks only for routes with limits; a rate without a cap holds
        nothing to give back."""
        d = self.limiter.admit("node", Limits(rate=1.0, burst=2), "a", "t")
        ((keys, args, _),) = self.redis.calls
        self.assertEqual(keys, ["promgate:node:c", "promgate:node:b:p:a:t"])
        self.assertEqual(args[0], 0)
        self.assertEqual(args[4], "")
        self.redis.answer([0, 0])
        self.successResultOf(d).release("node")  # type: ignore[union-attr]
        self.assertEqual(self.redis.commands, [])


class KeyTests(SynchronousTestCase):
    """Bucket keys name their bucket unambiguously, whatever the names contain."""

    @given(
        st.tuples(st.text(), st.text()),
        st.tuples(st.text(), st.text()),
        st.sampled_from(["identity", "target", "identity_target"]),
    )
    def test_distinct_names_distinct_keys(
        self, one: tuple[str, str], other: tuple[str, str], per: str
    ) -> None:
        limits = Limits(rate=1.0, per=per)  # type: ignore[arg-type]
        a = bucket_key("p:", "node", limits, *one)
        b = bucket_key("p:", "node", limits, *other)
        same = {
            "identity": one[0] == other[0],
            "target": one[1] == other[1],
            "identity_target": one == other,
        }[per]
        self.assertEqual(a == b, same)
        self.assertEqual(a.count(":"), {"identity": 4, "target": 4, "identity_target": 5}[per])
