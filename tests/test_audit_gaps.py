"""The audit file never keeps part of a record; verify checks past gaps that a start explains."""

from __future__ import annotations

import contextlib
import errno
import hmac
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from promgate import cli
from promgate.audit import AuditEvent, AuditLog, VerifyGap, verify_files

KEY = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent
#: What earlier versions wrote in the start record after terminating a partial line.
OLD_NOTE = "previous run ended mid-record; the incomplete line was terminated"

#: Fills a real file size limit (RLIMIT_FSIZE) in the middle of a record, then lifts it.
FULL_DISK = """
import json, os, resource, signal, sys
from pathlib import Path
from twisted.internet.task import Clock
from promgate.audit import AuditEvent, AuditLog
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = Path(sys.argv[1])
log = AuditLog(path, sys.argv[2].encode(), Clock(), fsync="never")
log.startService()
log.record(AuditEvent("request", detail="r0"))
size = path.stat().st_size
length = size - len(path.read_bytes().splitlines(keepends=True)[0])
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
limit = size + 2 * length + length // 2
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
full = []
for n in range(1, 5):
    full.append(log.record(AuditEvent("request", detail=f"r{n}")))
    if not full[-1] and len(full) == 3:
        size_after_failure = path.stat().st_size
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
later = [log.record(AuditEvent("request", detail=f"r{n}")) for n in range(5, 7)]
log.stopService()
print(json.dumps({"limit": limit, "length": length, "full": full, "later": later,
                  "size_after_failure": size_after_failure}))
"""


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``promgate ARGV...`` in process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def chained(prev: dict[str, Any], **fields: Any) -> bytes:
    """The line the writer makes for a record after ``prev`` (the documented MAC scheme)."""
    record = {"seq": prev["seq"] + 1, "time": "2026-11-24T07:00:00.000000Z", **fields}
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"))
    message = prev["mac"].encode() + b"\n" + canonical.encode()
    record["mac"] = hmac.new(KEY, message, "sha256").hexdigest()
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


class GapsTestCase(SynchronousTestCase):
    """Logs on temporary files, with a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.path = Path(self.mktemp()).resolve()

    def open_log(self, **kwargs: Any) -> AuditLog:
        """Start an AuditLog on the test's path; stopped at cleanup if still running."""
        log = AuditLog(self.path, KEY, self.clock, **kwargs)
        log.startService()
        self.addCleanup(lambda: log.stopService() if log.running else None)
        return log

    def lines(self) -> list[bytes]:
        """The file's lines, newlines kept."""
        return self.path.read_bytes().splitlines(keepends=True)

    def records(self) -> list[dict[str, Any]]:
        """The file's records, parsed."""
        return [json.loads(line) for line in self.lines()]

    def write_run(self, requests: int = 3) -> list[bytes]:
        """A complete run, start to stop; its lines."""
        log = self.open_log()
        for n in range(requests):
            log.record(AuditEvent("request", detail=f"r{n}"))
        log.stopService()
        return self.lines()


class FullDiskTests(GapsTestCase):
    """A write cut short by a full disk leaves no fragment behind."""

    def test_prefix_then_enospc(self) -> None:
        """A write that gets part of a record out and then fails is cut back at once."""
        fail = [False]

        def write(fd: int, data: bytes) -> int:
            if fail[0]:
                os.write(fd, data[:20])
                raise OSError(errno.ENOSPC, "No space left on device")
            return os.write(fd, data)

        log = self.open_log(write=write)
        log.record(AuditEvent("request", detail="before"))
        good = self.path.read_bytes()
        fail[0] = True
        self.assertFalse(log.record(AuditEvent("request", detail="lost")))
        self.assertFalse(log.healthy)
        self.assertEqual(self.path.read_bytes(), good)
        fail[0] = False
        self.assertTrue(log.record(AuditEvent("request", detail="after")))
        self.assertTrue(log.healthy)
        log.stopService()
        self.assertEqual([r.get("detail") for r in self.records()], [None, "before", "after", None])
        result = verify_files(KEY, [self.path])
        self.assertTrue(result.ok, result.message)
        self.assertEqual((result.count, result.gaps), (4, ()))

    def test_cut_retried_before_next_record(self) -> None:
        """If cutting the fragment fails too, the next record cuts it before writing."""
        state = {"fail": False}

        def write(fd: int, data: bytes) -> int:
            if state["fail"]:
                state["fail"] = False
                os.write(fd, data[:33])
                raise OSError(errno.ENOSPC, "No space left on device")
            return os.write(fd, data)

        log = self.open_log(write=write)
        sizes = []
        real_ftruncate = os.ftruncate

        def broken_ftruncate(fd: int, length: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        state["fail"] = True
        before = self.path.stat().st_size
        self.patch(os, "ftruncate", broken_ftruncate)
        self.assertFalse(log.record(AuditEvent("request", detail="lost")))
        sizes.append(self.path.stat().st_size)
        self.assertFalse(log.record(AuditEvent("request", detail="lost too")))
        sizes.append(self.path.stat().st_size)
        self.patch(os, "ftruncate", real_ftruncate)
        self.assertTrue(log.record(AuditEvent("request", detail="kept")))
        log.stopService()
        self.assertEqual(sizes, [before + 33, before + 33])
        self.assertEqual([r.get("detail") for r in self.records()], [None, "kept", None])
        self.assertTrue(verify_files(KEY, [self.path]).ok)

    def test_real_file_size_limit(self) -> None:
        """With RLIMIT_FSIZE reached mid-record in a real process, the file keeps whole records.

        The kernel writes the record up to the limit (a short write), then refuses the rest
        (EFBIG); the log cuts the part back, and once the limit is lifted, goes on.
        """
        child = subprocess.run(
            [sys.executable, "-c", FULL_DISK, str(self.path), KEY.decode()],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            timeout=60,
            check=True,
        )
        out = json.loads(child.stdout)
        self.assertEqual(out["full"], [True, True, False, False])
        self.assertEqual(out["later"], [True, True])
        # The limit fell inside the third record: it was cut back to the second's end.
        self.assertLess(out["size_after_failure"], out["limit"])
        self.assertEqual(out["size_after_failure"], out["limit"] - out["length"] // 2)
        self.assertTrue(self.path.read_bytes().endswith(b"\n"))
        details = [r.get("detail") for r in self.records()]
        self.assertEqual(details, [None, "r0", "r1", "r2", "r5", "r6", None])
        result = verify_files(KEY, [self.path])
        self.assertTrue(result.ok, result.message)
        self.assertEqual((result.count, result.ended_cleanly, result.gaps), (7, True, ()))


class CrashTests(GapsTestCase):
    """What a restart finds at the end of the file."""

    def test_foreign_tail_is_kept_and_explained(self) -> None:
        """Lines that are not records (nor a record begun) are kept, counted, and explained."""
        lines = self.write_run()
        self.path.write_bytes(b"".join(lines) + b"junk\n\x00\x00\x00")
        self.open_log().stopService()
        after = self.lines()
        self.assertEqual(after[: len(lines)], lines)
        self.assertEqual(after[len(lines) : len(lines) + 2], [b"junk\n", b"\x00\x00\x00\n"])
        start = json.loads(after[len(lines) + 2])
        self.assertEqual(
            start["detail"], "lines after seq 5 that are not audit records: 2; left in place"
        )
        result = verify_files(KEY, [self.path])
        self.assertTrue(result.ok, result.message)
        self.assertEqual(
            result.gaps,
            (VerifyGap(self.path, 6, 2, self.path, 8, 6, start["detail"]),),
        )
        self.assertEqual(result.count, 7)

    def test_only_a_torn_first_record(self) -> None:
        """A file holding only the start of a first record is a new chain, not a restart."""
        self.path.write_bytes(b'{"seq":1,"time":"2026-')
        self.open_log().stopService()
        start = self.records()[0]
        self.assertEqual(start["seq"], 1)
        self.assertEqual(
            start["detail"],
            "previous run ended mid-record; dropped its incomplete last record (22 bytes)",
        )
        self.assertTrue(verify_files(KEY, [self.path]).ok)


class VerifyGapTests(GapsTestCase):
    """Files from earlier versions, which kept a partial line, verify past it when explained."""

    def old_crash(self, *, garbage: list[bytes], note: str | None = OLD_NOTE) -> list[bytes]:
        """A run, then ``garbage`` lines, then a start record with ``note``, then a request."""
        lines = self.write_run()
        last = json.loads(lines[-1])
        start_fields: dict[str, Any] = {"event": "start"}
        if note is not None:
            start_fields["detail"] = note
        start = chained(last, **start_fields)
        request = chained(json.loads(start), event="request", detail="after the gap")
        result = [*lines, *garbage, start, request]
        self.path.write_bytes(b"".join(result))
        return result

    def test_explained_gap(self) -> None:
        """The gap is named with what explains it, and every record after it is checked."""
        self.old_crash(garbage=[b'{"seq":6,"time":"2026-11\n'])
        result = verify_files(KEY, [self.path])
        self.assertTrue(result.ok, result.message)
        self.assertEqual((result.count, result.ended_cleanly), (7, False))
        self.assertEqual(result.gaps, (VerifyGap(self.path, 6, 1, self.path, 7, 6, OLD_NOTE),))
        self.assertIn("1 gap explained by a start record", result.message)
        self.assertEqual(
            result.gaps[0].describe(),
            f"{self.path}:6: 1 line that is not a record, explained by the start record at "
            f"{self.path}:7 (seq 6): {OLD_NOTE}",
        )

    def test_cli_names_the_gap(self) -> None:
        """``promgate audit verify`` prints the gap, then OK."""
        self.old_crash(garbage=[b'{"seq":6,"ti\n'])
        key_file = Path(self.mktemp())
        key_file.write_bytes(KEY)
        code, out, err = run_cli("audit", "verify", "--key-file", str(key_file), str(self.path))
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            out.splitlines(),
            [
                f"GAP: {self.path}:6: 1 line that is not a record, explained by the start "
                f"record at {self.path}:7 (seq 6): {OLD_NOTE}",
                "OK: 7 record(s) verified; no stop record yet (still running?); "
                "1 gap explained by a start record (above)",
            ],
        )

    def test_edit_after_gap_is_caught(self) -> None:
        """A record after an explained gap is checked like any other."""
        lines = self.old_crash(garbage=[b"partial\n"])
        lines[-1] = lines[-1].replace(b"after the gap", b"after the gaq")
        self.path.write_bytes(b"".join(lines))
        result = verify_files(KEY, [self.path])
        self.assertEqual((result.ok, result.first_bad_seq), (False, 7))
        self.assertIn(":8: MAC mismatch", result.message)

    def test_unexplained_gap_fails(self) -> None:
        """A line that is not a record, followed by a start that does not explain it, fails."""
        self.old_crash(garbage=[b"partial\n"], note=None)
        result = verify_files(KEY, [self.path])
        self.assertFalse(result.ok)
        self.assertIn(":6: not a well-formed audit record", result.message)

    def test_gap_before_other_record_fails(self) -> None:
        """Only a start record explains a gap, not any record that happens to follow."""
        lines = self.write_run()
        request = chained(json.loads(lines[-1]), event="request", detail=OLD_NOTE)
        self.path.write_bytes(b"".join([*lines, b"partial\n", request]))
        result = verify_files(KEY, [self.path])
        self.assertFalse(result.ok)
        self.assertIn(":6: not a well-formed audit record", result.message)

    def test_more_lines_than_explained_fail(self) -> None:
        """The note accounts for one line: two lines are not explained."""
        self.old_crash(garbage=[b"partial\n", b"more\n"])
        result = verify_files(KEY, [self.path])
        self.assertFalse(result.ok)
        self.assertIn(":6: not a well-formed", result.message)

    def test_deleted_record_behind_gap_is_caught(self) -> None:
        """Replacing a record with garbage does not hide it: the chain breaks at the start."""
        lines = self.old_crash(garbage=[b"partial\n"])
        del lines[4]  # the stop record, seq 5
        self.path.write_bytes(b"".join(lines))
        result = verify_files(KEY, [self.path])
        self.assertFalse(result.ok)
        self.assertIn(":6: found seq 6: records missing", result.message)

    def test_gap_at_end_fails(self) -> None:
        """Garbage at the end is explained by nothing."""
        lines = self.write_run()
        self.path.write_bytes(b"".join(lines) + b"partial\n")
        self.assertIn(":6: not a well-formed", verify_files(KEY, [self.path]).message)
        self.path.write_bytes(b"".join(lines) + b"partial")
        self.assertIn(":6: truncated", verify_files(KEY, [self.path]).message)

    def test_restart_after_old_gap(self) -> None:
        """A new start after an old file's explained gap continues and verifies."""
        self.old_crash(garbage=[b"partial\n"])
        self.open_log().stopService()
        result = verify_files(KEY, [self.path])
        self.assertTrue(result.ok, result.message)
        self.assertEqual((result.count, len(result.gaps)), (9, 1))
