"""Tests for admission control: exact token-bucket arithmetic and concurrency caps."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from promgate.config.model import Limits
from promgate.ratelimit import SWEEP_INTERVAL, Admission, IRateLimiter, RateLimiter

ROUTE = "node"


def _limiter() -> tuple[Clock, RateLimiter]:
    clock = Clock()
    return clock, RateLimiter(clock)


class TokenBucketTests(SynchronousTestCase):
    """A route with a rate admits a burst, then one request per 1/rate seconds."""

    def setUp(self) -> None:
        self.clock, self.limiter = _limiter()
        self.limits = Limits(rate=2.0, burst=3, per="identity")

    def admit(self, identity: str = "prometheus", target: str = "10.0.0.5:9100") -> Admission:
        return self.limiter.admit(ROUTE, self.limits, identity, target)

    def test_interface(self) -> None:
        """RateLimiter provides IRateLimiter, so a shared (Redis) limiter can stand in for it."""
        self.assertTrue(verifyObject(IRateLimiter, self.limiter))

    def test_burst_then_refused(self) -> None:
        """Exactly ``burst`` requests pass at once; the next must wait exactly 1/rate."""
        for _ in range(3):
            self.assertEqual(self.admit(), Admission(True, "ok", 0.0))
        self.assertEqual(self.admit(), Admission(False, "rate_limited", 0.5))

    def test_retry_after_is_honest(self) -> None:
        """Waiting exactly retry_after is enough, and waiting any less is not."""
        for _ in range(3):
            self.admit()
        refused = self.admit()
        self.clock.advance(refused.retry_after / 2)
        second = self.admit()
        self.assertEqual(second, Admission(False, "rate_limited", 0.25))
        self.clock.advance(second.retry_after)
        self.assertTrue(self.admit().allowed)
        self.assertFalse(self.admit().allowed)

    def test_refill_is_capped_at_burst(self) -> None:
        """However long a key is idle, it gets at most ``burst`` requests at once."""
        for _ in range(3):
            self.admit()
        self.clock.advance(3600)
        self.assertEqual([self.admit().allowed for _ in range(4)], [True, True, True, False])

    def test_steady_rate(self) -> None:
        """After the burst, exactly ``rate`` requests per second get through."""
        for _ in range(3):
            self.admit()
        admitted = 0
        for _ in range(100):
            self.clock.advance(0.125)  # exact in binary, so the count is exact too
            admitted += self.admit().allowed
        self.assertEqual(admitted, 25)

    def test_refusal_consumes_nothing(self) -> None:
        """Hammering while refused does not push the next admission further away."""
        for _ in range(3):
            self.admit()
        for _ in range(50):
            self.assertFalse(self.admit().allowed)
        self.clock.advance(0.5)
        self.assertTrue(self.admit().allowed)

    def test_no_rate_is_unlimited(self) -> None:
        """Without a rate, nothing is rate limited and no bucket is kept."""
        limits = Limits(rate=None, burst=1)
        for _ in range(100):
            self.assertTrue(self.limiter.admit(ROUTE, limits, "a", "t").allowed)
        self.assertEqual(self.limiter.bucket_count(), 0)

    def test_routes_are_separate(self) -> None:
        """The same key on another route has its own bucket."""
        for _ in range(3):
            self.admit()
        self.assertTrue(self.limiter.admit("other", self.limits, "prometheus", "t").allowed)

    def test_unknown_per(self) -> None:
        """A keying mode the limiter does not know is an error, not a silent shared bucket."""
        self.assertRaises(
            ValueError, self.limiter.admit, ROUTE, Limits(rate=1.0, per="peer"), "a", "t"
        )


class KeyingTests(SynchronousTestCase):
    """``per`` decides who shares a bucket."""

    def exhaust(self, limiter: RateLimiter, limits: Limits, identity: str, target: str) -> None:
        self.assertTrue(limiter.admit(ROUTE, limits, identity, target).allowed)
        self.assertFalse(limiter.admit(ROUTE, limits, identity, target).allowed)

    def test_per_identity(self) -> None:
        """One identity shares its bucket across targets; another identity has its own."""
        _, limiter = _limiter()
        limits = Limits(rate=1.0, burst=1, per="identity")
        self.exhaust(limiter, limits, "a", "t1")
        self.assertFalse(limiter.admit(ROUTE, limits, "a", "t2").allowed)
        self.assertTrue(limiter.admit(ROUTE, limits, "b", "t1").allowed)

    def test_per_target(self) -> None:
        """One target shares its bucket across identities; another target has its own."""
        _, limiter = _limiter()
        limits = Limits(rate=1.0, burst=1, per="target")
        self.exhaust(limiter, limits, "a", "t1")
        self.assertFalse(limiter.admit(ROUTE, limits, "b", "t1").allowed)
        self.assertTrue(limiter.admit(ROUTE, limits, "a", "t2").allowed)

    def test_per_identity_target(self) -> None:
        """Each (identity, target) pair has its own bucket."""
        _, limiter = _limiter()
        limits = Limits(rate=1.0, burst=1, per="identity_target")
        self.exhaust(limiter, limits, "a", "t1")
        self.assertTrue(limiter.admit(ROUTE, limits, "a", "t2").allowed)
        self.assertTrue(limiter.admit(ROUTE, limits, "b", "t1").allowed)
        self.assertFalse(limiter.admit(ROUTE, limits, "b", "t1").allowed)

    def test_identity_and_target_spelled_alike(self) -> None:
        """Switching ``per`` (a reload) does not mix up an identity with a same-named target."""
        _, limiter = _limiter()
        self.exhaust(limiter, Limits(rate=1.0, burst=1, per="identity"), "x", "y")
        self.assertTrue(limiter.admit(ROUTE, Limits(rate=1.0, per="target"), "y", "x").allowed)


class ConcurrencyTests(SynchronousTestCase):
    """``max_concurrent`` caps the number of requests in flight on a route."""

    def test_cap_and_release(self) -> None:
        """The cap refuses with retry_after 1.0; a release admits the next one."""
        _, limiter = _limiter()
        limits = Limits(max_concurrent=2)
        self.assertTrue(limiter.admit(ROUTE, limits, "a", "t").allowed)
        self.assertTrue(limiter.admit(ROUTE, limits, "b", "u").allowed)
        self.assertEqual(limiter.in_flight(ROUTE), 2)
        self.assertEqual(
            limiter.admit(ROUTE, limits, "c", "v"), Admission(False, "concurrency_limited", 1.0)
        )
        self.assertEqual(limiter.in_flight(ROUTE), 2)
        limiter.release(ROUTE)
        self.assertEqual(limiter.in_flight(ROUTE), 1)
        self.assertTrue(limiter.admit(ROUTE, limits, "c", "v").allowed)

    def test_counted_without_cap(self) -> None:
        """Requests are counted in flight even when the route has no cap."""
        _, limiter = _limiter()
        for _ in range(5):
            limiter.admit(ROUTE, Limits(), "a", "t")
        self.assertEqual(limiter.in_flight(ROUTE), 5)
        self.assertEqual(limiter.in_flight("elsewhere"), 0)

    def test_rate_refusal_takes_no_slot(self) -> None:
        """A request refused by the rate limit does not count as in flight."""
        _, limiter = _limiter()
        limits = Limits(rate=1.0, burst=1, max_concurrent=2)
        self.assertTrue(limiter.admit(ROUTE, limits, "a", "t").allowed)
        self.assertEqual(limiter.admit(ROUTE, limits, "a", "t").reason, "rate_limited")
        self.assertEqual(limiter.in_flight(ROUTE), 1)
        self.assertTrue(limiter.admit(ROUTE, limits, "b", "t").allowed)

    def test_concurrency_refusal_takes_no_token(self) -> None:
        """A request refused by the cap leaves its rate bucket untouched."""
        _, limiter = _limiter()
        limits = Limits(rate=1.0, burst=2, per="identity", max_concurrent=1)
        self.assertTrue(limiter.admit(ROUTE, limits, "a", "t").allowed)
        for _ in range(10):
            self.assertEqual(limiter.admit(ROUTE, limits, "a", "t").reason, "concurrency_limited")
        limiter.release(ROUTE)
        self.assertTrue(limiter.admit(ROUTE, limits, "a", "t").allowed)
        limiter.release(ROUTE)
        self.assertEqual(limiter.admit(ROUTE, limits, "a", "t").reason, "rate_limited")

    def test_release_without_admit(self) -> None:
        """Releasing more than was admitted is reported as the caller's bug."""
        _, limiter = _limiter()
        self.assertRaises(ValueError, limiter.release, ROUTE)
        limiter.admit(ROUTE, Limits(), "a", "t")
        limiter.release(ROUTE)
        self.assertRaises(ValueError, limiter.release, ROUTE)


class SweepTests(SynchronousTestCase):
    """Buckets that have refilled are dropped, so memory does not grow with every key seen."""

    def test_idle_buckets_dropped(self) -> None:
        """Once every bucket is full again, an automatic sweep leaves only fresh ones."""
        clock, limiter = _limiter()
        limits = Limits(rate=1.0, burst=2, per="identity_target")
        for i in range(SWEEP_INTERVAL - 1):
            limiter.admit(ROUTE, limits, f"id{i}", "t")
            limiter.release(ROUTE)
        self.assertEqual(limiter.bucket_count(), SWEEP_INTERVAL - 1)
        clock.advance(2.0)
        limiter.admit(ROUTE, limits, "fresh", "t")
        self.assertEqual(limiter.bucket_count(), 1)

    def test_busy_buckets_kept(self) -> None:
        """A bucket that has not refilled survives a sweep with its level intact."""
        clock, limiter = _limiter()
        limits = Limits(rate=1.0, burst=2, per="identity")
        limiter.admit(ROUTE, limits, "busy", "t")
        limiter.admit(ROUTE, limits, "idle", "t")
        clock.advance(0.5)
        limiter.admit(ROUTE, limits, "busy", "t")
        clock.advance(0.6)
        limiter.sweep()
        self.assertEqual(limiter.bucket_count(), 1)
        self.assertTrue(limiter.admit(ROUTE, limits, "busy", "t").allowed)
        self.assertFalse(limiter.admit(ROUTE, limits, "busy", "t").allowed)

    def test_idle_route_forgotten(self) -> None:
        """A route with nothing in flight and no buckets is dropped entirely."""
        clock, limiter = _limiter()
        limiter.admit(ROUTE, Limits(rate=1.0), "a", "t")
        limiter.release(ROUTE)
        clock.advance(1.0)
        limiter.sweep()
        self.assertEqual(limiter._routes, {})

    def test_in_flight_route_kept(self) -> None:
        """A sweep never forgets requests in flight."""
        clock, limiter = _limiter()
        limiter.admit(ROUTE, Limits(), "a", "t")
        clock.advance(100)
        limiter.sweep()
        self.assertEqual(limiter.in_flight(ROUTE), 1)

    def test_sweep_is_amortised(self) -> None:
        """With many live buckets, sweeps come no more often than once per live bucket."""
        _, limiter = _limiter()
        sweeps: list[int] = []
        real_sweep = limiter.sweep

        def counting_sweep() -> None:
            sweeps.append(limiter.bucket_count())
            real_sweep()

        self.patch(limiter, "sweep", counting_sweep)
        limits = Limits(rate=1.0, burst=1, per="target")
        for i in range(4 * SWEEP_INTERVAL):
            limiter.admit(ROUTE, limits, "a", f"t{i}")
        self.assertEqual(limiter.bucket_count(), 4 * SWEEP_INTERVAL)
        self.assertEqual(sweeps, [SWEEP_INTERVAL, 2 * SWEEP_INTERVAL, 4 * SWEEP_INTERVAL])


class RetryAfterHeaderTests(SynchronousTestCase):
    """Retry-After is whole seconds, rounded up, never zero."""

    def test_values(self) -> None:
        """Fractions round up; tiny and zero waits become 1."""
        header = RateLimiter.retry_after_header
        self.assertEqual(header(Admission(False, "rate_limited", 0.0001)), "1")
        self.assertEqual(header(Admission(False, "rate_limited", 1.0)), "1")
        self.assertEqual(header(Admission(False, "rate_limited", 1.2)), "2")
        self.assertEqual(header(Admission(False, "rate_limited", 59.0)), "59")
        self.assertEqual(header(Admission(True, "ok", 0.0)), "1")


_rates = st.floats(min_value=0.01, max_value=1000.0, allow_nan=False, allow_infinity=False)
_bursts = st.integers(min_value=1, max_value=50)
_advances = st.one_of(
    st.just(0.0),
    st.floats(min_value=0.0, max_value=10.0, allow_nan=False, allow_infinity=False),
)
_steps = st.lists(st.tuples(_advances, st.booleans()), max_size=200)


class PropertyTests(SynchronousTestCase):
    """Properties that must hold for any rate, burst and pattern of traffic."""

    @given(rate=_rates, burst=_bursts, steps=_steps)
    def test_never_exceeds_budget(
        self, rate: float, burst: int, steps: list[tuple[float, bool]]
    ) -> None:
        """Admissions up to any moment never exceed burst + rate * elapsed."""
        clock, limiter = _limiter()
        limits = Limits(rate=rate, burst=burst, per="identity")
        admitted = 0
        for advance, request in steps:
            clock.advance(advance)
            if request:
                admitted += limiter.admit(ROUTE, limits, "a", "t").allowed
            self.assertLessEqual(admitted, burst + rate * clock.seconds() + 1e-9)

    @given(rate=_rates, burst=_bursts, steps=_steps, start=st.floats(0.0, 2e9))
    def test_retry_after_is_enough(
        self, rate: float, burst: int, steps: list[tuple[float, bool]], start: float
    ) -> None:
        """After any history, a refusal's retry_after is exactly long enough to be admitted."""
        clock, limiter = _limiter()
        clock.advance(start)
        limits = Limits(rate=rate, burst=burst, per="identity")
        for advance, request in steps:
            clock.advance(advance)
            if request:
                limiter.admit(ROUTE, limits, "a", "t")
        while (answer := limiter.admit(ROUTE, limits, "a", "t")).allowed:
            pass
        self.assertEqual(answer.reason, "rate_limited")
        # At most 1/rate, give or take the clock's own resolution at this time.
        slack = 4 * math.ulp(clock.seconds())
        self.assertTrue(0.0 < answer.retry_after <= 1.0 / rate * (1 + 1e-9) + slack)
        clock.advance(answer.retry_after)
        self.assertTrue(limiter.admit(ROUTE, limits, "a", "t").allowed)

    @given(rate=_rates, burst=_bursts)
    def test_retry_after_exact_after_burst(self, rate: float, burst: int) -> None:
        """Right after a burst from time zero, retry_after is 1/rate up to rounding."""
        _, limiter = _limiter()
        limits = Limits(rate=rate, burst=burst, per="identity")
        for _ in range(burst):
            self.assertTrue(limiter.admit(ROUTE, limits, "a", "t").allowed)
        answer = limiter.admit(ROUTE, limits, "a", "t")
        self.assertFalse(answer.allowed)
        self.assertTrue(math.isclose(answer.retry_after, 1.0 / rate, rel_tol=1e-12))
