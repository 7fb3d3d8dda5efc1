"""Rotation while running: the file renamed away, then ``rotate()`` (SIGUSR1) reopens the path,
and the rotated series verifies as one chain."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from promgate.audit import WATCH_INTERVAL, AuditEvent, AuditLog, verify_files
from promgate.audit_rotate import Rotation, parse_rotation, rotate_detail

KEY = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"


def records(path: Path) -> list[dict[str, Any]]:
    """The records of an audit file, parsed."""
    return [json.loads(line) for line in path.read_bytes().splitlines()]


class RotateDetailTests(SynchronousTestCase):
    """The rotate record's detail says what it follows, and reads back the same."""

    def test_round_trip(self) -> None:
        """Name, seq and MAC come back from the detail, a name with quotes included."""
        mac = "ab" * 32
        for name in ('/var/log/a "b".jsonl.1', "/x/audit.jsonl-20261124", None):
            detail = rotate_detail(name, 41, mac, found=12)
            self.assertEqual(
                parse_rotation({"event": "rotate", "detail": detail}), Rotation(41, mac, name)
            )

    def test_other_records(self) -> None:
        """Only a rotate record with a well-formed detail is read as one."""
        detail = rotate_detail("/x", 1, "00" * 32)
        self.assertIsNone(parse_rotation({"event": "reopen", "detail": detail}))
        self.assertIsNone(parse_rotation({"event": "rotate", "detail": "rotated"}))
        self.assertIsNone(parse_rotation({"event": "rotate"}))


class RotateTests(SynchronousTestCase):
    """logrotate's way: rename the file, then signal; the new file names the old one."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.path = self.dir / "audit.jsonl"
        self.heads: list[tuple[int, str]] = []
        self.reopens: list[None] = []
        self.log = AuditLog(
            self.path,
            KEY,
            self.reactor,
            on_reopen=lambda: self.reopens.append(None),
            on_head=lambda seq, mac: self.heads.append((seq, mac)),
        )
        self.log.startService()
        self.addCleanup(lambda: self.log.stopService() if self.log.running else None)
        self.assertTrue(self.log.record(AuditEvent("request", detail="one")))

    def rotate(self, suffix: str) -> Path:
        """Rename the file away as logrotate does, then ask the log to rotate."""
        rotated = self.dir / f"audit.jsonl{suffix}"
        self.path.rename(rotated)
        self.log.rotate()
        return rotated

    def test_rename_then_rotate(self) -> None:
        """The new file starts with a rotate record naming the renamed file, its last seq and
        MAC; the two verify together, in that order only."""
        last = records(self.path)[-1]
        rotated = self.rotate(".1")
        (first,) = records(self.path)
        self.assertEqual((first["seq"], first["event"]), (3, "rotate"))
        self.assertEqual(
            first["detail"],
            f'rotated; previous file ends at seq 2 with mac {last["mac"]}; now named "{rotated}"',
        )
        self.assertEqual(self.reopens, [None])
        self.assertTrue(self.log.record(AuditEvent("request", detail="two")))
        self.log.stopService()
        result = verify_files(KEY, [rotated, self.path])
        self.assertTrue(result.ok, result.message)
        self.assertEqual((result.count, result.ended_cleanly), (5, True))
        alone = verify_files(KEY, [self.path])
        self.assertFalse(alone.ok)
        self.assertIn(
            "found seq 3: records missing; this file begins with a rotate record: "
            f"the previous file (now named {rotated}) ends at seq 2; give it first, "
            "or use --rotated-start if it was removed",
            alone.message,
        )

    def test_series_missing_or_reordered(self) -> None:
        """Three files: a missing middle file and a reordered pair both fail, naming the file
        the rotate record expects."""
        first = self.rotate(".2")
        self.log.record(AuditEvent("request", detail="two"))
        middle = self.rotate(".1")
        self.log.record(AuditEvent("request", detail="three"))
        self.log.stopService()
        self.assertTrue(verify_files(KEY, [first, middle, self.path]).ok)
        missing = verify_files(KEY, [first, self.path])
        self.assertFalse(missing.ok)
        self.assertTrue(missing.message.startswith(f"{self.path}:1: found seq 5: records missing"))
        self.assertIn(f"(now named {middle}) ends at seq 4; give it first", missing.message)
        reordered = verify_files(KEY, [first, self.path, middle])
        self.assertFalse(reordered.ok)
        self.assertIn("records missing", reordered.message)
        swapped = verify_files(KEY, [middle, first, self.path])
        self.assertFalse(swapped.ok)
        self.assertIn(f"{middle}:1: found seq 3: records missing", swapped.message)

    def test_rotated_start(self) -> None:
        """With the oldest files removed, the series verifies from its first rotate record,
        and says so; an edit after it still fails."""
        first = self.rotate(".2")
        self.log.record(AuditEvent("request", detail="two"))
        middle = self.rotate(".1")
        self.log.stopService()
        result = verify_files(KEY, [middle, self.path], rotated_start=True)
        self.assertTrue(result.ok, result.message)
        self.assertEqual((result.first_seq, result.last_seq, result.count), (3, 6, 4))
        self.assertEqual(result.begins_after, str(first))
        self.assertIn(f"begins at seq 3, after a rotation from {first} (not given)", result.message)
        # A series that starts at genesis is unaffected by the option.
        self.assertTrue(verify_files(KEY, [first, middle, self.path], rotated_start=True).ok)
        text = middle.read_text().replace('"two"', '"owt"')
        middle.write_text(text)
        edited = verify_files(KEY, [middle, self.path], rotated_start=True)
        self.assertFalse(edited.ok)
        self.assertIn(f"{middle}:2: MAC mismatch: edited", edited.message)

    def test_rotate_record_cannot_be_forged_without_key(self) -> None:
        """A rotated start needs the rotate record's own MAC to verify under the key."""
        self.rotate(".1")
        self.log.stopService()
        self.assertFalse(verify_files(b"another key", [self.path], rotated_start=True).ok)

    def test_path_unchanged(self) -> None:
        """Asked to rotate while the path still names the open file: nothing happens."""
        before = self.path.read_bytes()
        self.log.rotate()
        self.assertEqual(self.path.read_bytes(), before)
        self.assertEqual(self.reopens, [])

    def test_removed_then_rotate(self) -> None:
        """A file deleted rather than renamed: the rotate record says its name is unknown."""
        self.path.unlink()
        self.log.rotate()
        (first,) = records(self.path)
        self.assertEqual(first["event"], "rotate")
        self.assertIn("; its name is unknown", first["detail"])

    def test_watch_first(self) -> None:
        """If the once-a-second check sees the rename before the signal comes, the new file
        starts with a reopen record, the signal then finds nothing to do, and the series
        still verifies."""
        rotated = self.dir / "audit.jsonl.1"
        self.path.rename(rotated)
        self.reactor.advance(WATCH_INTERVAL)
        self.log.rotate()
        self.assertEqual([r["event"] for r in records(self.path)], ["reopen"])
        self.log.stopService()
        self.assertTrue(verify_files(KEY, [rotated, self.path]).ok)

    def test_reopen_fails_then_succeeds(self) -> None:
        """When the path cannot be reopened at the signal, the rotate record is written by the
        check that later reopens it."""
        self.path.rename(self.dir / "audit.jsonl.1")
        blocked = self.dir.parent / "blocked"
        self.dir.rename(blocked)
        self.addCleanup(lambda: blocked.exists() and shutil.rmtree(blocked))
        self.log.rotate()
        self.assertFalse(self.log.healthy)
        blocked.rename(self.dir)
        self.reactor.advance(WATCH_INTERVAL)
        self.assertTrue(self.log.healthy)
        (first,) = records(self.path)
        self.assertEqual(first["event"], "rotate")
        self.assertIn(f'now named "{blocked / "audit.jsonl.1"}"', first["detail"])

    def test_heads(self) -> None:
        """``on_head`` sees every record written, with its seq and MAC, in the new file too."""
        self.rotate(".1")
        written = records(self.dir / "audit.jsonl.1") + records(self.path)
        self.assertEqual(self.heads, [(r["seq"], r["mac"]) for r in written])

    def test_stopped(self) -> None:
        """A stopped log ignores the request."""
        self.log.stopService()
        os.rename(self.path, self.dir / "audit.jsonl.1")
        self.log.rotate()
        self.assertFalse(self.path.exists())
