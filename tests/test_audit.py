"""The audit trail writes one verifiable record per decision and catches any tampering."""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from promgate.audit import (
    TRUNCATION_MARK,
    AuditEvent,
    AuditLog,
    IAuditSink,
    MemoryAuditSink,
    VerifyResult,
    load_key,
    verify_files,
)

KEY = b"8b0e3c1f4a7d9e2b6c5f8a1d3e7b9c0f2a4d6e8b1c3f5a7d9e0b2c4f6a8d1e3b"
#: 2026-11-24T06:11:15.123456Z, the example time in the record schema.
NOW = datetime(2026, 11, 24, 6, 11, 15, 123456, tzinfo=timezone.utc).timestamp()


def request(n: int = 0, **overrides: Any) -> AuditEvent:
    """A typical allowed scrape through the reverse gateway."""
    fields: dict[str, Any] = {
        "listener": "scrape",
        "peer": f"10.0.0.{n}:4{n:04d}",
        "tls_version": "TLSv1.3",
        "tls_cipher": "TLS_AES_256_GCM_SHA384",
        "cert_sha256": "ab" * 32,
        "cert_subject": "CN=prometheus-0",
        "identity": "prometheus",
        "route": "node",
        "target": "10.0.0.5:9100",
        "method": "GET",
        "path": "/metrics",
        "decision": "allow",
        "reason": "ok",
        "status": 200,
        "bytes_in": 0,
        "bytes_out": 1234 + n,
        "duration": 0.0123456789,
    }
    fields.update(overrides)
    return AuditEvent("request", **fields)


class AuditTestCase(SynchronousTestCase):
    """Shared helpers: logs on temporary files, driven by a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)

    def open_log(self, path: Path, **kwargs: Any) -> AuditLog:
        """Start an AuditLog on ``path``; stopped at cleanup if the test leaves it running."""
        log = AuditLog(path, KEY, self.clock, **kwargs)
        log.startService()
        self.addCleanup(lambda: log.stopService() if log.running else None)
        return log

    def write_log(self, requests: int = 5, **kwargs: Any) -> Path:
        """A complete run: start, ``requests`` requests, stop (seq 1 to requests + 2)."""
        path = Path(self.mktemp())
        log = self.open_log(path, **kwargs)
        for n in range(requests):
            self.clock.advance(0.25)
            self.assertTrue(log.record(request(n)))
        log.stopService()
        return path

    def lines(self, path: Path) -> list[bytes]:
        """The file's lines, newlines kept."""
        return path.read_bytes().splitlines(keepends=True)

    def records(self, path: Path) -> list[dict[str, Any]]:
        """The file's records, parsed."""
        return [json.loads(line) for line in self.lines(path)]

    def assertBad(self, result: VerifyResult, first_bad_seq: int, *words: str) -> None:
        """Verification failed at ``first_bad_seq`` and the message says ``words``."""
        self.assertFalse(result.ok, result.message)
        self.assertEqual(result.first_bad_seq, first_bad_seq, result.message)
        self.assertEqual(result.count, first_bad_seq - 1)
        self.assertFalse(result.ended_cleanly)
        for word in words:
            self.assertIn(word, result.message)


class RecordTests(AuditTestCase):
    """What AuditLog writes."""

    def test_round_trip(self) -> None:
        """A run written by AuditLog verifies, ends cleanly, and counts every record."""
        path = self.write_log(requests=5)
        result = verify_files(KEY, [path])
        self.assertEqual(result, VerifyResult(True, 7, None, result.message, True))
        self.assertEqual([r["seq"] for r in self.records(path)], list(range(1, 8)))
        self.assertEqual(
            [r["event"] for r in self.records(path)], ["start", *["request"] * 5, "stop"]
        )

    def test_schema(self) -> None:
        """Records hold seq, time, event, the set fields in schema order, then the MAC."""
        path = self.write_log(requests=1)
        start, req, stop = self.records(path)
        self.assertEqual(list(start), ["seq", "time", "event", "mac"])
        self.assertEqual(start["time"], "2026-11-24T06:11:15.123456Z")
        self.assertEqual(req["time"], "2026-11-24T06:11:15.373456Z")
        self.assertEqual(
            list(req),
            [
                "seq",
                "time",
                "event",
                "listener",
                "peer",
                "tls_version",
                "tls_cipher",
                "cert_sha256",
                "cert_subject",
                "identity",
                "route",
                "target",
                "method",
                "path",
                "decision",
                "reason",
                "status",
                "bytes_in",
                "bytes_out",
                "duration",
                "mac",
            ],
        )
        self.assertEqual(req["duration"], 0.012346)
        self.assertEqual((req["status"], req["bytes_in"], req["peer"]), (200, 0, "10.0.0.0:40000"))
        self.assertEqual(stop["event"], "stop")

    def test_line_format(self) -> None:
        """Each line is the compact, ASCII-only JSON the record schema documents."""
        path = self.write_log(requests=2)
        for line in self.lines(path):
            record = json.loads(line)
            expected = json.dumps(record, separators=(",", ":"), ensure_ascii=True) + "\n"
            self.assertEqual(line, expected.encode("ascii"))

    def test_mac_chain(self) -> None:
        """Each MAC is HMAC-SHA256 over the previous MAC and the canonical record, as documented."""
        path = self.write_log(requests=2)
        prev = "0" * 64
        for record in self.records(path):
            mac = record.pop("mac")
            canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
            message = prev.encode() + b"\n" + canonical.encode()
            self.assertEqual(mac, hmac.new(KEY, message, hashlib.sha256).hexdigest())
            prev = mac

    def test_file_mode(self) -> None:
        """A new audit file is readable by its owner only."""
        path = self.write_log(requests=0)
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)

    def test_escaping(self) -> None:
        """Newlines, quotes, NUL, non-ASCII and lone surrogates stay on one line and verify."""
        nasty = 'a\nb\r"c"\\d\x00e\u2028f\u00e9g\U0001f600h\udc80i</script>'
        path = Path(self.mktemp())
        log = self.open_log(path)
        self.assertTrue(log.record(request(path=nasty, detail=nasty, cert_subject=nasty)))
        log.stopService()
        self.assertEqual(len(self.lines(path)), 3)
        self.assertTrue(path.read_bytes().isascii())
        record = self.records(path)[1]
        self.assertEqual((record["path"], record["detail"], record["cert_subject"]), (nasty,) * 3)
        self.assertTrue(verify_files(KEY, [path]).ok)

    def test_field_capping(self) -> None:
        """Long values (the event name too) are cut to max_field_length and marked."""
        path = Path(self.mktemp())
        log = self.open_log(path, max_field_length=16)
        log.record(AuditEvent("x" * 17, path="/" + "p" * 99, identity="i" * 16, status=200))
        log.stopService()
        record = self.records(path)[1]
        self.assertEqual(record["event"], "x" * 16 + TRUNCATION_MARK)
        self.assertEqual(record["path"], "/" + "p" * 15 + TRUNCATION_MARK)
        self.assertEqual(record["identity"], "i" * 16)
        self.assertEqual(record["status"], 200)
        self.assertTrue(verify_files(KEY, [path]).ok)

    def test_invalid_settings(self) -> None:
        """Nonsense settings are refused when the log is built, not on the first write."""
        path = Path(self.mktemp())
        for kwargs in (
            {"fsync": "sometimes"},
            {"fsync_interval": 0},
            {"max_field_length": 0},
        ):
            self.assertRaises(ValueError, AuditLog, path, KEY, self.clock, **kwargs)
        self.assertRaises(ValueError, AuditLog, path, b"", self.clock)

    def test_provides_interface(self) -> None:
        """AuditLog is an IAuditSink."""
        self.assertTrue(verifyObject(IAuditSink, AuditLog(Path(self.mktemp()), KEY, self.clock)))

    def test_record_while_stopped(self) -> None:
        """A record before start or after stop is refused and reported, not silently lost."""
        results: list[bool] = []
        log = AuditLog(Path(self.mktemp()), KEY, self.clock, on_result=results.append)
        self.assertFalse(log.record(request()))
        log.startService()
        log.stopService()
        self.assertFalse(log.record(request()))
        self.assertEqual(results, [False, True, True, False])


class RestartTests(AuditTestCase):
    """The chain survives restarts, clean or not."""

    def test_restart_continues_chain(self) -> None:
        """A new AuditLog on the same file continues the sequence and the MAC chain."""
        path = self.write_log(requests=2)
        log = self.open_log(path)
        log.record(request(9))
        log.stopService()
        records = self.records(path)
        self.assertEqual([r["seq"] for r in records], list(range(1, 8)))
        self.assertEqual(records[4], {**records[4], "event": "start", "seq": 5})
        self.assertNotIn("detail", records[4])
        result = verify_files(KEY, [path])
        self.assertTrue(result.ok, result.message)
        self.assertEqual((result.count, result.ended_cleanly), (7, True))

    def test_restart_after_crash(self) -> None:
        """After a run without a stop record, the start record says so and the chain holds."""
        path = self.write_log(requests=2)
        path.write_bytes(b"".join(self.lines(path)[:-1]))
        self.assertFalse(verify_files(KEY, [path]).ended_cleanly)
        self.open_log(path).stopService()
        start = self.records(path)[3]
        self.assertEqual((start["seq"], start["event"]), (4, "start"))
        self.assertIn("without a stop record", start["detail"])
        self.assertTrue(verify_files(KEY, [path]).ok)

    def test_restart_after_torn_write(self) -> None:
        """A half-written last record is cut off at start, the start record says how much."""
        path = self.write_log(requests=2)
        original = self.lines(path)
        torn = original[-1][: len(original[-1]) // 2]
        path.write_bytes(b"".join(original[:-1]) + torn)
        self.open_log(path).stopService()
        lines = self.lines(path)
        self.assertEqual(lines[:3], original[:3])
        self.assertEqual(len(lines), 5)
        start = json.loads(lines[3])
        self.assertEqual((start["seq"], start["event"]), (4, "start"))
        self.assertEqual(
            start["detail"],
            f"previous run ended mid-record; dropped its incomplete last record "
            f"({len(torn)} bytes); previous run ended without a stop record (last seq 3)",
        )
        result = verify_files(KEY, [path])
        self.assertTrue(result.ok, result.message)
        self.assertEqual((result.count, result.gaps), (5, ()))

    def test_restart_with_records_larger_than_a_read(self) -> None:
        """Recovery reads back past a torn tail and a last record both longer than one read."""
        path = Path(self.mktemp())
        log = self.open_log(path, max_field_length=300_000)
        log.record(request(detail="d" * 200_000))
        log.stopService()
        start, big, _ = self.lines(path)
        path.write_bytes(start + big + big[:140_000])  # crashed while writing seq 3
        self.open_log(path, max_field_length=300_000).stopService()
        restart = json.loads(self.lines(path)[2])
        self.assertEqual((restart["seq"], restart["event"]), (3, "start"))
        self.assertIn("dropped its incomplete last record (140000 bytes)", restart["detail"])
        self.assertIn("without a stop record (last seq 2)", restart["detail"])
        self.assertEqual(self.lines(path)[:2], [start, big])
        self.assertTrue(verify_files(KEY, [path]).ok)

    def test_restart_on_unrecognisable_file(self) -> None:
        """A file with no intact record starts a new chain, and the start record says so."""
        path = Path(self.mktemp())
        path.write_bytes(b"not an audit log\n")
        self.open_log(path).stopService()
        start = json.loads(self.lines(path)[1])
        self.assertEqual(start["seq"], 1)
        self.assertIn("chain restarted", start["detail"])
        self.assertBad(verify_files(KEY, [path]), 1, ":1:")


class TamperingTests(AuditTestCase):
    """verify_files finds each kind of tampering and names the first bad record."""

    def tampered(self, change: Callable[[list[bytes]], list[bytes]]) -> VerifyResult:
        """Verify a seven-record log after ``change`` rewrote its lines."""
        path = self.write_log(requests=5)
        path.write_bytes(b"".join(change(self.lines(path))))
        return verify_files(KEY, [path])

    def test_untouched(self) -> None:
        """The unmodified log verifies (the baseline for the tests below)."""
        self.assertTrue(self.tampered(lambda lines: lines).ok)

    def test_edited_byte(self) -> None:
        """Changing one character of a value breaks that record's MAC."""
        result = self.tampered(
            lambda lines: [*lines[:2], lines[2].replace(b"/metrics", b"/metricz"), *lines[3:]]
        )
        self.assertBad(result, 3, ":3:", "MAC mismatch")

    def test_edited_sequence_number(self) -> None:
        """Renumbering a record is caught."""
        result = self.tampered(
            lambda lines: [*lines[:2], lines[2].replace(b'"seq":3', b'"seq":4'), *lines[3:]]
        )
        self.assertBad(result, 3, ":3:", "found seq 4")

    def test_equivalent_json(self) -> None:
        """Re-spelling a value with another escape is caught, though it parses the same."""
        result = self.tampered(
            lambda lines: [*lines[:3], lines[3].replace(b"GET", b"\\u0047ET"), *lines[4:]]
        )
        self.assertBad(result, 4, ":4:", "not a well-formed")

    def test_duplicate_key(self) -> None:
        """Smuggling a shadowed duplicate key into a record is caught."""
        result = self.tampered(
            lambda lines: [*lines[:3], lines[3].replace(b'{"seq"', b'{"x":1,"seq"'), *lines[4:]]
        )
        self.assertBad(result, 4, ":4:")

    def test_deleted_middle_line(self) -> None:
        """Removing a record leaves a gap at its sequence number."""
        result = self.tampered(lambda lines: lines[:3] + lines[4:])
        self.assertBad(result, 4, ":4:", "found seq 5", "missing")

    def test_swapped_lines(self) -> None:
        """Reordering two records is caught at the first of them."""
        result = self.tampered(lambda lines: [*lines[:2], lines[3], lines[2], *lines[4:]])
        self.assertBad(result, 3, ":3:", "found seq 4")

    def test_repeated_line(self) -> None:
        """Replaying a record is caught."""
        result = self.tampered(lambda lines: [*lines[:4], lines[3], *lines[4:]])
        self.assertBad(result, 5, ":5:", "found seq 4", "out of order or repeated")

    def test_truncated_mid_line(self) -> None:
        """Cutting the file inside its last record is reported as a truncated tail."""
        result = self.tampered(lambda lines: [*lines[:-1], lines[-1][:20]])
        self.assertBad(result, 7, ":7:", "truncated")

    def test_truncated_newline(self) -> None:
        """Even a missing final newline counts as truncation."""
        result = self.tampered(lambda lines: [*lines[:-1], lines[-1][:-1]])
        self.assertBad(result, 7, ":7:", "truncated")

    def test_deleted_first_line(self) -> None:
        """A log that does not start at seq 1 is incomplete."""
        result = self.tampered(lambda lines: lines[1:])
        self.assertBad(result, 1, ":1:", "found seq 2")

    def test_blank_line(self) -> None:
        """An inserted empty line is not a record."""
        result = self.tampered(lambda lines: [*lines[:2], b"\n", *lines[2:]])
        self.assertBad(result, 3, ":3:", "not a well-formed")

    def test_deleted_last_line(self) -> None:
        """Losing the stop record verifies, but the log no longer ends cleanly."""
        result = self.tampered(lambda lines: lines[:-1])
        self.assertTrue(result.ok)
        self.assertEqual((result.count, result.ended_cleanly), (6, False))
        self.assertIn("no stop record", result.message)

    def test_every_byte_matters(self) -> None:
        """Changing any single byte of a log, newlines included, fails verification."""
        path = self.write_log(requests=1)
        original = path.read_bytes()
        for index in range(len(original)):
            tampered = bytearray(original)
            tampered[index] ^= 0x01
            path.write_bytes(bytes(tampered))
            self.assertFalse(verify_files(KEY, [path]).ok, f"byte {index} changed unnoticed")

    def test_wrong_key(self) -> None:
        """A log checked with another key fails on its first record."""
        path = self.write_log(requests=1)
        self.assertBad(verify_files(b"another key", [path]), 1, ":1:", "wrong key")

    def test_rotated_files(self) -> None:
        """A chain split over several files verifies only complete and in order."""
        path = self.write_log(requests=5)
        lines = self.lines(path)
        older, newer = Path(self.mktemp()), Path(self.mktemp())
        older.write_bytes(b"".join(lines[:4]))
        newer.write_bytes(b"".join(lines[4:]))
        result = verify_files(KEY, [older, newer])
        self.assertTrue(result.ok, result.message)
        self.assertEqual((result.count, result.ended_cleanly), (7, True))
        self.assertBad(verify_files(KEY, [newer, older]), 1, f"{newer}:1:")
        self.assertBad(verify_files(KEY, [newer]), 1)
        older.write_bytes(b"".join(lines[:3]))
        self.assertBad(verify_files(KEY, [older, newer]), 4, f"{newer}:1:")

    def test_missing_file(self) -> None:
        """A file that cannot be read fails verification instead of raising."""
        self.assertBad(verify_files(KEY, [Path(self.mktemp())]), 1, "cannot read")

    def test_empty(self) -> None:
        """No records at all is consistent (nothing to contradict), and not a clean end."""
        path = Path(self.mktemp())
        path.write_bytes(b"")
        result = verify_files(KEY, [path])
        self.assertEqual((result.ok, result.count, result.ended_cleanly), (True, 0, False))


class DurabilityTests(AuditTestCase):
    """fsync policies and write failures."""

    def setUp(self) -> None:
        super().setUp()
        self.synced: list[int] = []
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            self.synced.append(fd)
            real_fsync(fd)

        self.patch(os, "fsync", fsync)

    def test_fsync_interval(self) -> None:
        """With "interval", fsync happens on the clock, and only when something was written."""
        log = self.open_log(Path(self.mktemp()), fsync="interval", fsync_interval=2.0)
        log.record(request())
        self.assertEqual(self.synced, [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)  # fsync, and the path watch
        self.clock.advance(1.9)
        self.assertEqual(len(self.synced), 0)
        self.clock.advance(0.1)
        self.assertEqual(len(self.synced), 1)
        self.clock.advance(2.0)
        self.assertEqual(len(self.synced), 1)
        log.record(request())
        self.clock.advance(2.0)
        self.assertEqual(len(self.synced), 2)
        log.stopService()
        self.assertEqual(len(self.synced), 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fsync_always(self) -> None:
        """With "always", every record is on disk before record() returns."""
        log = self.open_log(Path(self.mktemp()), fsync="always")
        self.assertEqual(len(self.synced), 1)
        log.record(request())
        self.assertEqual(len(self.synced), 2)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # only the path watch
        self.clock.advance(60)
        self.assertEqual(len(self.synced), 2)

    def test_fsync_never(self) -> None:
        """With "never", only stopping the service syncs."""
        log = self.open_log(Path(self.mktemp()), fsync="never")
        log.record(request())
        self.clock.advance(60)
        self.assertEqual(self.synced, [])
        log.stopService()
        self.assertEqual(len(self.synced), 1)

    def test_disk_full(self) -> None:
        """On /dev/full every write fails: False, unhealthy, reported, and logged once."""
        if not os.path.exists("/dev/full"):
            self.skipTest("no /dev/full")
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        results: list[bool] = []
        log = self.open_log(Path("/dev/full"), on_result=results.append)
        self.assertFalse(log.healthy)
        self.assertFalse(log.record(request()))
        self.assertFalse(log.healthy)
        self.assertEqual(results, [False, False])
        errors = [e for e in logged if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["operation"], "write")
        self.assertEqual(errors[0]["error"].errno, errno.ENOSPC)
        log.stopService()
        self.assertEqual(results, [False, False, False])

    def test_recovers_after_failure(self) -> None:
        """A later successful write makes the log healthy again, and the chain stays intact."""
        path = Path(self.mktemp())
        results: list[bool] = []
        log = self.open_log(path, on_result=results.append)
        real_write = os.write

        def enospc(fd: int, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "write", enospc)
        self.assertFalse(log.record(request(1)))
        self.assertFalse(log.healthy)
        self.patch(os, "write", real_write)
        self.assertTrue(log.record(request(2)))
        self.assertTrue(log.healthy)
        log.stopService()
        self.assertEqual(results, [True, False, True, True])
        self.assertEqual([r["peer"] for r in self.records(path)[1:-1]], ["10.0.0.2:40002"])
        self.assertTrue(verify_files(KEY, [path]).ok)

    def test_partial_write(self) -> None:
        """A write that fails halfway is cut off; the file holds only whole records."""
        path = Path(self.mktemp())
        log = self.open_log(path)
        real_write = os.write

        def half(fd: int, data: bytes) -> int:
            self.patch(os, "write", enospc)
            return real_write(fd, data[: len(data) // 2])

        def enospc(fd: int, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "write", half)
        self.assertFalse(log.record(request(1)))
        self.patch(os, "write", real_write)
        self.assertTrue(log.record(request(2)))
        log.stopService()
        records = self.records(path)
        self.assertEqual([r["seq"] for r in records], [1, 2, 3])
        self.assertEqual(records[1]["peer"], "10.0.0.2:40002")
        self.assertTrue(verify_files(KEY, [path]).ok)

    def test_partial_writes_are_completed(self) -> None:
        """Short writes without an error are continued until the whole line is out."""
        path = Path(self.mktemp())
        log = self.open_log(path)
        real_write = os.write
        self.patch(os, "write", lambda fd, data: real_write(fd, data[:7]))
        self.assertTrue(log.record(request()))
        self.patch(os, "write", real_write)
        log.stopService()
        self.assertTrue(verify_files(KEY, [path]).ok)


class MemoryAuditSinkTests(SynchronousTestCase):
    """The in-memory sink integrators use in their own tests."""

    def test_keeps_events(self) -> None:
        """Recorded events are kept in order."""
        sink = MemoryAuditSink()
        self.assertTrue(verifyObject(IAuditSink, sink))
        self.assertTrue(sink.record(request(1)))
        self.assertTrue(sink.record(request(2)))
        self.assertEqual(sink.events, [request(1), request(2)])

    def test_unhealthy(self) -> None:
        """An unhealthy sink refuses and drops events until it is healthy again."""
        sink = MemoryAuditSink()
        sink.healthy = False
        self.assertFalse(sink.record(request(1)))
        self.assertEqual(sink.events, [])
        sink.healthy = True
        self.assertTrue(sink.record(request(2)))
        self.assertEqual(sink.events, [request(2)])


class LoadKeyTests(SynchronousTestCase):
    """Reading the key file."""

    def test_strips_whitespace(self) -> None:
        """The key is the file's text without surrounding whitespace."""
        path = Path(self.mktemp())
        path.write_text("  \n" + KEY.decode() + "\n\n")
        self.assertEqual(load_key(path), KEY)

    def test_empty(self) -> None:
        """An empty or blank key file is an error, never an empty key."""
        path = Path(self.mktemp())
        for text in ("", " \n\t\n"):
            path.write_text(text)
            self.assertRaises(ValueError, load_key, path)


field_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)


class PropertyTests(AuditTestCase):
    """Whatever values come from the wire, logs verify, and no byte can change unnoticed."""

    @given(values=st.lists(field_text, max_size=6), data=st.data())
    def test_any_values_verify_and_any_flip_is_caught(
        self, values: list[str], data: st.DataObject
    ) -> None:
        """Logs of arbitrary field values verify; flipping any one byte makes them fail."""
        path = Path(self.mktemp())
        log = AuditLog(path, KEY, self.clock, fsync="never", max_field_length=24)
        log.startService()
        for value in values:
            log.record(request(path=value, identity=value, detail=value))
        log.stopService()
        result = verify_files(KEY, [path])
        self.assertTrue(result.ok, result.message)
        self.assertEqual(result.count, len(values) + 2)

        original = path.read_bytes()
        index = data.draw(st.integers(0, len(original) - 1), label="index")
        mask = data.draw(st.integers(1, 255), label="mask")
        tampered = bytearray(original)
        tampered[index] ^= mask
        path.write_bytes(bytes(tampered))
        self.assertFalse(verify_files(KEY, [path]).ok)
