"""Refusals of unauthenticated peers are folded into counted audit records, in memory."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from promgate.addresses import peer_prefix
from promgate.audit import AuditEvent, AuditLog, MemoryAuditSink, verify_files
from promgate.audit_aggregate import AggregatingSink, aggregation_key
from promgate.core.recording import handshake_failure_event


def _failure(
    peer: str, reason: str = "no_client_certificate", listener: str = "scrape"
) -> AuditEvent:
    return handshake_failure_event(listener, peer, reason, "detail", None)


class PeerPrefixTests(SynchronousTestCase):
    """Which network a peer's failures are counted under."""

    def test_ipv4(self) -> None:
        """An IPv4 peer is counted under its /24."""
        self.assertEqual(peer_prefix("203.0.113.77:41000"), "203.0.113.0/24")

    def test_ipv6(self) -> None:
        """An IPv6 peer is counted under its /64."""
        self.assertEqual(peer_prefix("[2001:db8:1:2:3::4]:443"), "2001:db8:1:2::/64")

    def test_ipv4_mapped(self) -> None:
        """An IPv4-mapped IPv6 peer counts as the IPv4 address it is."""
        self.assertEqual(peer_prefix("[::ffff:192.0.2.9]:5"), "192.0.2.0/24")

    def test_not_ip(self) -> None:
        """Anything else is its own key."""
        self.assertEqual(peer_prefix("unix"), "unix")


class KeyTests(SynchronousTestCase):
    """Which records are aggregated at all."""

    def test_handshake_failures(self) -> None:
        """Every TLS handshake failure is, keyed by event, reason and prefix."""
        self.assertEqual(
            aggregation_key(_failure("198.51.100.1:1", "handshake_timeout")),
            ("tls_handshake_failed", "handshake_timeout", "198.51.100.0/24"),
        )

    def test_tcp_refusal_before_client_hello(self) -> None:
        """A tcp listener's refusal of bytes that are not TLS is."""
        event = AuditEvent("connection", peer="198.51.100.1:1", decision="deny", reason="not_tls")
        self.assertIsNotNone(aggregation_key(event))

    def test_requests_are_not(self) -> None:
        """Request records are written as they are, refused or not."""
        event = AuditEvent("request", peer="198.51.100.1:1", decision="deny", reason="authn_failed")
        self.assertIsNone(aggregation_key(event))

    def test_connection_with_route_is_not(self) -> None:
        """A tcp refusal after a route was chosen is written as it is."""
        event = AuditEvent(
            "connection", peer="198.51.100.1:1", route="node", decision="deny", reason="not_tls"
        )
        self.assertIsNone(aggregation_key(event))


class AggregatingSinkTests(SynchronousTestCase):
    """The first failure is written at once, the rest counted per interval."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.sink = MemoryAuditSink()
        self.folded = 0
        self.agg = AggregatingSink(
            self.sink, self.clock, 10.0, max_keys=3, on_aggregated=self.count_folded
        )

    def count_folded(self) -> None:
        self.folded += 1

    def test_other_records_pass_through(self) -> None:
        """A record that is not aggregated is written unchanged."""
        event = AuditEvent("request", peer="1.2.3.4:5", reason="ok")
        self.assertTrue(self.agg.record(event))
        self.assertEqual(self.sink.events, [event])

    def test_first_written_at_once(self) -> None:
        """The first failure of a key is written at once, exact peer, count 1."""
        self.agg.record(_failure("203.0.113.7:1000"))
        (event,) = self.sink.events
        self.assertEqual((event.peer, event.count), ("203.0.113.7:1000", 1))
        self.assertEqual(event.detail, "detail")

    def test_rest_counted_into_one_record(self) -> None:
        """299 more within the interval are one record, written when it ends, count 299."""
        for i in range(300):
            self.agg.record(_failure(f"203.0.113.{i % 250}:{1000 + i}"))
        self.assertEqual(len(self.sink.events), 1)
        self.clock.advance(10)
        first, summary = self.sink.events
        self.assertEqual(summary.event, "tls_handshake_failed")
        self.assertEqual(summary.peer, "203.0.113.0/24")
        self.assertEqual(summary.reason, "no_client_certificate")
        self.assertEqual(summary.listener, "scrape")
        self.assertEqual(summary.count, 299)
        self.assertEqual(summary.decision, "deny")
        self.assertEqual(first.count + summary.count, 300)
        self.assertEqual(self.folded, 299)

    def test_sustained_flood_one_record_per_interval(self) -> None:
        """A flood that goes on writes one record per interval, none at once."""
        self.agg.record(_failure("203.0.113.7:1"))
        for _ in range(5):
            for _ in range(50):
                self.agg.record(_failure("203.0.113.8:2"))
            self.clock.advance(10)
        counts = [e.count for e in self.sink.events]
        self.assertEqual(counts, [1, 50, 50, 50, 50, 50])

    def test_quiet_key_forgotten(self) -> None:
        """After an interval without failures, the next one is written at once again."""
        self.agg.record(_failure("203.0.113.7:1"))
        self.clock.advance(10)
        self.assertEqual(self.agg.held, 0)
        self.agg.record(_failure("203.0.113.9:2"))
        self.assertEqual(
            [(e.peer, e.count) for e in self.sink.events],
            [
                ("203.0.113.7:1", 1),
                ("203.0.113.9:2", 1),
            ],
        )

    def test_reasons_and_prefixes_apart(self) -> None:
        """Another reason or another prefix is another key, written at once."""
        self.agg.record(_failure("203.0.113.7:1"))
        self.agg.record(_failure("203.0.113.7:2", "handshake_timeout"))
        self.agg.record(_failure("198.51.100.7:3"))
        self.assertEqual(len(self.sink.events), 3)

    def test_overflow_bounded(self) -> None:
        """Beyond max_keys, failures fold into one overflow key, never written at once."""
        for i in range(100):
            self.agg.record(_failure(f"10.{i}.0.1:1"))
        self.assertEqual(len(self.sink.events), 3)
        self.assertEqual(self.agg.held, 4)
        self.clock.advance(10)
        overflow = self.sink.events[-1]
        self.assertIsNone(overflow.peer)
        self.assertEqual(overflow.count, 97)
        self.assertIn("beyond the 3 prefixes held", overflow.detail or "")
        self.assertEqual(sum(e.count or 0 for e in self.sink.events), 100)

    def test_several_listeners(self) -> None:
        """A summary over several listeners names none, and says so."""
        self.agg.record(_failure("203.0.113.7:1", listener="a"))
        self.agg.record(_failure("203.0.113.7:2", listener="a"))
        self.agg.record(_failure("203.0.113.7:3", listener="b"))
        self.clock.advance(10)
        summary = self.sink.events[-1]
        self.assertIsNone(summary.listener)
        self.assertIn("several listeners", summary.detail or "")

    def test_flush_at_stop(self) -> None:
        """Stopping writes pending counts and leaves no timer behind."""
        self.agg.startService()
        self.agg.record(_failure("203.0.113.7:1"))
        self.agg.record(_failure("203.0.113.7:2"))
        self.agg.stopService()
        self.assertEqual([e.count for e in self.sink.events], [1, 1])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_healthy_follows_sink(self) -> None:
        """A folded record reports the health of the log behind."""
        self.agg.record(_failure("203.0.113.7:1"))
        self.sink.healthy = False
        self.assertFalse(self.agg.record(_failure("203.0.113.7:2")))
        self.assertFalse(self.agg.healthy)

    def test_invalid_interval(self) -> None:
        """A zero interval is refused."""
        self.assertRaises(ValueError, AggregatingSink, self.sink, self.clock, 0)


class ChainTests(SynchronousTestCase):
    """Aggregated records are ordinary chained records."""

    def test_verify(self) -> None:
        """A log with counted records verifies, and the count is in the file."""
        clock = MemoryReactorClock()
        path = Path(self.mktemp())
        log = AuditLog(path, b"k" * 32, clock, fsync="never")
        agg = AggregatingSink(log, clock, 10.0)
        log.startService()
        agg.startService()
        for i in range(20):
            agg.record(_failure(f"203.0.113.7:{i}"))
        agg.stopService()
        log.stopService()
        text = path.read_text()
        self.assertIn('"count":19', text)
        self.assertEqual(len(text.splitlines()), 4)  # start, first, summary, stop
        result = verify_files(b"k" * 32, [path])
        self.assertTrue(result.ok, result)
