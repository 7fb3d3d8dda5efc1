"""What a flood of wrong basic-auth passwords may cost: bounded, in memory.

The bcrypt "thread" here is a runner whose checks finish only when the test says, so that
queueing, cancellation and backoff are exact on a MemoryReactorClock.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from promgate.audit import MemoryAuditSink
from promgate.authn import Authenticator
from promgate.authn_limits import BcryptQueue, FailureBackoff
from promgate.config.model import (
    Admin,
    Audit,
    BasicCredential,
    Config,
    Identity,
    Listener,
    Route,
    Target,
)
from promgate.http.refusals import BODIES
from promgate.http.server import HTTPListenerFactory
from promgate.http.upstream import UpstreamPool
from promgate.identity import Recognition
from promgate.listeners.scrape import ReverseGateway
from promgate.metrics import Metrics
from promgate.ratelimit import RateLimiter

PASSWORD = b"correct horse battery staple"
OPS = Identity(
    "ops",
    roles=frozenset({"scraper"}),
    basic=(BasicCredential("ops", bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=4))),),
)
NOBODY = Recognition(None, "authn_missing")


def basic(user: str, password: bytes) -> bytes:
    return b"Basic " + base64.b64encode(user.encode() + b":" + password)


class ManualRunner:
    """Runs each check only when ``finish`` is called, in order of submission."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []
        self.finished = 0

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    @property
    def started(self) -> int:
        return len(self.calls)

    def finish(self) -> None:
        """Run the oldest started check that has not finished."""
        f, args, d = self.calls[self.finished]
        self.finished += 1
        d.callback(f(*args))


class FloodTestCase(SynchronousTestCase):
    """An authenticator with a manual bcrypt runner, a clock and metrics."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.runner = ManualRunner()
        self.metrics = Metrics()
        self.authn = Authenticator(
            {"ops": OPS},
            run_in_thread=self.runner,
            clock=self.clock,
            metrics=self.metrics,
            concurrency=2,
            queue_limit=3,
        )

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.metrics.registry.get_sample_value(name, labels or {}) or 0.0

    def attempt(self, password: bytes, peer: str, user: str = "ops") -> Any:
        return self.authn.authenticate(NOBODY, basic(user, password), peer)


class QueueTests(FloodTestCase):
    """At most ``concurrency`` checks run and ``queue_limit`` wait; the rest are refused."""

    def test_full_queue_refused(self) -> None:
        """The sixth pending check is refused at once: auth_overloaded, Retry-After."""
        pending = [self.attempt(b"wrong", f"10.0.{i}.1:1") for i in range(5)]
        self.assertTrue(all(isinstance(d, Deferred) for d in pending))
        self.assertEqual(self.runner.started, 2)
        refused = self.attempt(b"wrong", "10.0.9.1:1")
        self.assertIsInstance(refused, Recognition)
        assert isinstance(refused, Recognition)
        self.assertIsNotNone(refused.retry_after)
        self.assertEqual((refused.reason, refused.retry_after), ("auth_overloaded", 1))
        self.assertEqual(self.runner.started, 2)
        self.assertEqual(self.sample("promgate_auth_bcrypt_queue_length"), 5)
        self.assertEqual(
            self.sample("promgate_auth_rejections_total", {"reason": "auth_overloaded"}), 1
        )
        for _ in range(5):
            self.runner.finish()
        self.assertEqual(self.sample("promgate_auth_bcrypt_checks_total"), 5)
        self.assertEqual(self.sample("promgate_auth_bcrypt_queue_length"), 0)
        self.assertEqual([self.successResultOf(d).reason for d in pending], ["authn_failed"] * 5)

    def test_cancelled_before_start_never_runs(self) -> None:
        """A check whose client went away before it started is dropped: no bcrypt."""
        first = self.attempt(b"wrong", "10.0.1.1:1")
        second = self.attempt(b"wrong", "10.0.2.1:1")
        gone = self.attempt(PASSWORD, "10.0.3.1:1")
        last = self.attempt(PASSWORD, "10.0.4.1:1")
        gone.cancel()
        result = self.successResultOf(gone)
        self.assertEqual(result.reason, "authn_failed")
        self.assertIn("client gone", result.detail)
        for _ in range(3):
            self.runner.finish()
        self.assertEqual(self.runner.started, 3)
        self.assertEqual(self.successResultOf(last).reason, "ok")
        self.successResultOf(first)
        self.successResultOf(second)

    def test_cancelled_while_running_frees_its_slot_when_done(self) -> None:
        """A running check cannot be stopped: its slot frees when bcrypt ends."""
        queue = BcryptQueue(self.runner, concurrency=1, limit=1)
        running = queue.submit(lambda: True)
        waiting = queue.submit(lambda: True)
        assert running is not None and waiting is not None
        running.cancel()
        self.failureResultOf(running)
        self.assertEqual(queue.length, 2)
        self.runner.finish()
        self.assertEqual(queue.length, 1)
        self.runner.finish()
        self.assertTrue(self.successResultOf(waiting))


class PeerBackoffTests(FloodTestCase):
    """Failures from one network hold its next checks back, without bcrypt."""

    def fail(self, peer: str, n: int) -> None:
        for _ in range(n):
            d = self.attempt(b"wrong", peer)
            self.runner.finish()
            self.assertEqual(self.successResultOf(d).reason, "authn_failed")

    def test_throttled_after_five(self) -> None:
        """After five failures the network waits 1s, then 2s; other networks do not."""
        self.fail("203.0.113.5:1", 5)
        refused = self.attempt(PASSWORD, "203.0.113.200:2")
        self.assertIsInstance(refused, Recognition)
        assert isinstance(refused, Recognition)
        self.assertIsNotNone(refused.retry_after)
        self.assertEqual((refused.reason, refused.retry_after), ("auth_throttled", 1))
        self.assertEqual(self.runner.started, 5)
        self.assertEqual(
            self.sample("promgate_auth_rejections_total", {"reason": "auth_throttled"}), 1
        )
        other = self.attempt(b"wrong", "198.51.100.1:1")
        self.assertIsInstance(other, Deferred)
        self.runner.finish()
        self.clock.advance(1)
        self.fail("203.0.113.5:1", 1)
        self.assertEqual(self.attempt(b"x", "203.0.113.5:1").retry_after, 2)

    def test_leaving_while_checked_still_counts(self) -> None:
        """A client that resets its connection while its check runs is still counted: the
        check ran, the password was wrong, and after five such the network is throttled."""
        for _ in range(5):
            d = self.attempt(b"wrong", "203.0.113.5:1")
            answers: list[object] = []
            d.addBoth(answers.append)
            d.cancel()  # the connection is lost while bcrypt runs in its thread
            self.assertEqual(len(answers), 1)
            self.runner.finish()
        refused = self.attempt(b"wrong", "203.0.113.5:1")
        self.assertIsInstance(refused, Recognition)
        assert isinstance(refused, Recognition)
        self.assertIsNotNone(refused.retry_after)
        self.assertEqual(refused.reason, "auth_throttled")
        self.assertEqual(self.runner.started, 5)

    def test_pending_capped_per_network(self) -> None:
        """One network may have four checks pending; the fifth waits."""
        authn = Authenticator(
            {"ops": OPS}, run_in_thread=self.runner, clock=self.clock, concurrency=2
        )
        for _ in range(4):
            self.assertIsInstance(
                authn.authenticate(NOBODY, basic("ops", b"w"), "10.1.1.1:1"), Deferred
            )
        refused = authn.authenticate(NOBODY, basic("ops", b"w"), "10.1.1.2:1")
        self.assertEqual(refused.reason, "auth_throttled")

    def test_known_good_password_passes(self) -> None:
        """A password already verified stays fast and accepted while its network and its
        user are held back: an attacker cannot lock a user out."""
        d = self.attempt(PASSWORD, "203.0.113.5:1")
        self.runner.finish()
        self.assertEqual(self.successResultOf(d).reason, "ok")
        self.fail("203.0.113.6:1", 5)
        for i in range(5):
            self.fail(f"10.{i}.0.1:1", 1)
        self.assertEqual(self.attempt(b"guess", "10.1.0.9:1").reason, "auth_throttled")
        started = self.runner.started
        ok = self.attempt(PASSWORD, "203.0.113.5:1")
        self.assertEqual(ok, Recognition(OPS, "ok"))
        self.assertEqual(self.runner.started, started)

    def test_user_backoff_is_short(self) -> None:
        """Ten failures for one user from many networks hold back that user's uncached
        checks from those networks, for at most five seconds."""
        for i in range(10):
            self.fail(f"10.{i}.0.1:1", 1)
        refused = self.attempt(PASSWORD, "10.3.0.9:1")
        self.assertEqual(refused.reason, "auth_throttled")
        self.assertLessEqual(refused.retry_after, 5)
        self.clock.advance(refused.retry_after)
        d = self.attempt(PASSWORD, "10.3.0.9:1")
        self.runner.finish()
        self.assertEqual(self.successResultOf(d).reason, "ok")

    def test_user_backoff_spares_clean_networks(self) -> None:
        """A network that has not failed is not held back by the user's backoff: a few
        wrong passwords spread over networks cannot keep a user whose password is not
        cached yet (after a restart, say) out."""
        for i in range(10):
            self.fail(f"10.{i}.0.1:1", 1)
        d = self.attempt(PASSWORD, "192.0.2.1:1")
        self.assertIsInstance(d, Deferred)
        self.runner.finish()
        self.assertEqual(self.successResultOf(d).reason, "ok")

    def test_forgotten(self) -> None:
        """A network's failures are forgotten a minute after its last one."""
        self.fail("203.0.113.5:1", 5)
        self.clock.advance(61)
        self.assertIsInstance(self.attempt(b"wrong", "203.0.113.5:1"), Deferred)


class BackoffMemoryTests(SynchronousTestCase):
    """However many names or networks fail, the counters held stay bounded."""

    def test_bounded(self) -> None:
        """10000 distinct keys keep at most max_keys counters."""
        backoff = FailureBackoff(MemoryReactorClock(), threshold=1, max_keys=100)
        for i in range(10000):
            backoff.started(f"user{i}")
            backoff.finished(f"user{i}", failed=True)
        self.assertEqual(len(backoff), 100)


class GatewayTests(SynchronousTestCase):
    """The reverse gateway answers throttled and overloaded checks, and drops the checks of
    clients that have gone."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.runner = ManualRunner()
        self.audit = MemoryAuditSink()
        self.metrics = Metrics()
        listener = Listener("scrape", "http", "tcp:9443", None)
        route = Route("node", (Target("10.0.0.5:9100"),), allow=("ops",))
        config = Config(
            source=Path("promgate.yaml"),
            listeners=(listener,),
            identities={"ops": OPS},
            routes={"node": route},
            admin=Admin(),
            audit=Audit(Path("audit.jsonl"), Path("audit.key")),
        )
        self.authn = Authenticator(
            {"ops": OPS},
            run_in_thread=self.runner,
            clock=self.clock,
            metrics=self.metrics,
            concurrency=1,
            queue_limit=1,
        )
        self.gateway = ReverseGateway(
            listener,
            config,
            clock=self.clock,
            limiter=RateLimiter(self.clock),
            audit=self.audit,
            metrics=self.metrics,
            pool=UpstreamPool(self.clock),
            authenticator=self.authn,
        )

    def client(self, password: bytes) -> tuple[Any, StringTransport]:
        proto = HTTPListenerFactory(self.gateway.http).buildProtocol(None)
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "192.0.2.1", 9443),
            peerAddress=IPv4Address("TCP", "198.51.100.7", 40000),
        )
        proto.makeConnection(transport)
        proto.dataReceived(
            b"GET /scrape?route=node&target=10.0.0.5%3A9100 HTTP/1.1\r\nHost: g\r\n"
            b"Authorization: " + basic("ops", password) + b"\r\n\r\n"
        )
        return proto, transport

    def test_overloaded_503(self) -> None:
        """A check beyond the queue: 503, Retry-After, a constant body, audited."""
        self.client(b"w1")
        self.client(b"w2")
        _, transport = self.client(b"w3")
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 503 "), head)
        self.assertIn(b"\r\nRetry-After: 1\r\n", head + b"\r\n")
        self.assertIn(body, BODIES)
        (event,) = [e for e in self.audit.events if e.event == "request"]
        self.assertEqual((event.status, event.reason), (503, "auth_overloaded"))

    def test_throttled_429(self) -> None:
        """After five failures from a network: 429, Retry-After, audited auth_throttled."""
        for _ in range(5):
            self.client(b"wrong")
            self.runner.finish()
        _, transport = self.client(PASSWORD)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 429 "), head)
        self.assertIn(b"\r\nRetry-After: 1\r\n", head + b"\r\n")
        self.assertIn(body, BODIES)
        self.assertEqual(self.audit.events[-1].reason, "auth_throttled")
        self.assertEqual(self.runner.started, 5)

    def test_client_gone_check_dropped(self) -> None:
        """A client that resets its connection before its check starts costs no bcrypt."""
        self.client(b"running")
        proto, _ = self.client(b"waiting")
        proto.connectionLost(Exception("reset"))
        self.assertEqual(
            self.metrics.registry.get_sample_value("promgate_auth_bcrypt_queue_length"), 1
        )
        self.runner.finish()
        self.assertEqual(self.runner.started, 1)
        aborted = [e for e in self.audit.events if e.reason == "client_aborted"]
        self.assertEqual(len(aborted), 1)
