"""An audit file removed or replaced while the gateway runs is noticed, reopened, and chained."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from promgate.admin import Readiness
from promgate.audit import WATCH_INTERVAL, AuditEvent, AuditLog, verify_files
from promgate.metrics import Metrics

KEY = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"


def records(path: Path) -> list[dict[str, Any]]:
    """The records of an audit file, parsed."""
    return [json.loads(line) for line in path.read_bytes().splitlines()]


class ReopenTests(SynchronousTestCase):
    """The path is checked every second on the clock; a new file continues the chain."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.path = self.dir / "audit.jsonl"
        self.metrics = Metrics()
        self.results: list[bool] = []
        self.log = AuditLog(
            self.path,
            KEY,
            self.reactor,
            on_result=self.results.append,
            on_reopen=self.metrics.audit_reopens.inc,
        )
        self.log.startService()
        self.addCleanup(lambda: self.log.stopService() if self.log.running else None)
        self.assertTrue(self.log.record(AuditEvent("request", detail="one")))

    def reopens(self) -> float | None:
        """``promgate_audit_reopens_total``."""
        return self.metrics.registry.get_sample_value("promgate_audit_reopens_total")

    def test_removed(self) -> None:
        """A removed file is replaced within a second by one whose first record continues."""
        kept = Path(self.mktemp()).resolve()
        os.link(self.path, kept)  # what the test keeps of the removed file
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.path.unlink()
        self.reactor.advance(WATCH_INTERVAL - 0.01)
        self.assertFalse(self.path.exists())
        self.reactor.advance(0.01)
        (reopen,) = records(self.path)
        self.assertEqual((reopen["seq"], reopen["event"]), (3, "reopen"))
        self.assertEqual(
            reopen["detail"],
            f"audit log {self.path} was removed or replaced while open; "
            "reopened, continuing the chain at seq 3",
        )
        self.assertEqual(self.reopens(), 1.0)
        self.assertIn("reopened", " ".join(e["log_format"] for e in logged))
        self.assertTrue(self.log.healthy)
        self.assertTrue(self.log.record(AuditEvent("request", detail="two")))
        self.log.stopService()
        result = verify_files(KEY, [kept, self.path])
        self.assertTrue(result.ok, result.message)
        self.assertEqual((result.count, result.ended_cleanly), (5, True))
        self.assertIn("found seq 3: records missing", verify_files(KEY, [self.path]).message)

    def test_moved_away(self) -> None:
        """A file moved away keeps what was written before the check; the new one the rest."""
        moved = self.dir / "audit.jsonl.1"
        self.path.rename(moved)
        self.assertTrue(self.log.record(AuditEvent("request", detail="before the check")))
        self.reactor.advance(WATCH_INTERVAL)
        self.assertTrue(self.log.record(AuditEvent("request", detail="after")))
        self.log.stopService()
        self.assertEqual([r["seq"] for r in records(moved)], [1, 2, 3])
        self.assertEqual([r["event"] for r in records(self.path)], ["reopen", "request", "stop"])
        result = verify_files(KEY, [moved, self.path])
        self.assertTrue(result.ok, result.message)
        self.assertEqual(result.count, 6)

    def test_directory_removed(self) -> None:
        """While the path cannot be reopened the log is unhealthy (not ready) and retries."""
        kept = Path(self.mktemp()).resolve()
        os.link(self.path, kept)
        readiness = Readiness(lambda: self.log.healthy)
        readiness.ready = True
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        shutil.rmtree(self.dir)
        self.reactor.advance(WATCH_INTERVAL)
        self.assertFalse(self.log.healthy)
        self.assertFalse(readiness.is_ready())
        self.assertFalse(self.log.record(AuditEvent("request", detail="lost")))
        errors = [e for e in logged if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertIn("no such file or directory", errors[0]["error"])
        self.reactor.advance(WATCH_INTERVAL)  # retried, still failing: logged once
        self.assertEqual(len([e for e in logged if e["log_level"] == LogLevel.error]), 1)
        self.dir.mkdir()
        self.reactor.advance(WATCH_INTERVAL)
        self.assertTrue(self.log.healthy)
        self.assertTrue(readiness.is_ready())
        self.log.stopService()
        self.assertEqual(self.results, [True, True, False, True, True])
        self.assertEqual(self.reopens(), 1.0)
        result = verify_files(KEY, [kept, self.path])
        self.assertTrue(result.ok, result.message)
        self.assertEqual(result.count, 4)

    def test_replaced_by_other_file(self) -> None:
        """A file put in its place is appended to; an unfinished last line of it is closed."""
        other = self.dir / "other"
        other.write_bytes(b"someone else's line")
        other.replace(self.path)
        self.reactor.advance(WATCH_INTERVAL)
        self.log.stopService()
        lines = self.path.read_bytes().splitlines(keepends=True)
        self.assertEqual(lines[0], b"someone else's line\n")
        reopen = json.loads(lines[1])
        self.assertEqual(reopen["seq"], 3)
        self.assertTrue(reopen["detail"].endswith("; the file found there already held 19 bytes"))

    def test_stop_before_the_check(self) -> None:
        """Stopping checks the path first: the stop record goes to the new file."""
        kept = Path(self.mktemp()).resolve()
        os.link(self.path, kept)
        self.path.unlink()
        self.log.stopService()
        self.assertEqual([r["event"] for r in records(self.path)], ["reopen", "stop"])
        self.assertTrue(verify_files(KEY, [kept, self.path]).ok)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_unchanged(self) -> None:
        """An untouched path is left alone: no reopen, no record."""
        size = self.path.stat().st_size
        self.reactor.advance(WATCH_INTERVAL * 5)
        self.assertEqual(self.path.stat().st_size, size)
        self.assertEqual(self.reopens(), 0.0)
