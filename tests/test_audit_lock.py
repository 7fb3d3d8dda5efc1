"""One writer per audit file: a second gateway is refused with the holder's pid, readers are not."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import IO

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from promgate import cli
from promgate.audit import AuditEvent, AuditLog, lock_audit_file, verify_files
from promgate.errors import StartupError

KEY = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent

#: Holds an audit log open (as a running gateway does) until its stdin closes.
HOLDER = """
import sys
from pathlib import Path
from twisted.internet.task import Clock
from promgate.audit import AuditEvent, AuditLog
log = AuditLog(Path(sys.argv[1]), sys.argv[2].encode(), Clock(), fsync="always")
log.startService()
log.record(AuditEvent("request", detail="held"))
print("ready", flush=True)
sys.stdin.read()
log.stopService()
"""

#: Tries to take the lock once; prints "locked" or the refusal.
TAKER = """
import sys
from pathlib import Path
from promgate.audit import lock_audit_file
from promgate.errors import StartupError
try:
    lock_audit_file(Path(sys.argv[1])).close()
except StartupError as e:
    print(e)
else:
    print("locked")
"""


def python(script: str, *args: str, stdin: int | None = None) -> subprocess.Popen[str]:
    """A Python child running ``script`` on this checkout, its output piped."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``promgate ARGV...`` in process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


class LockTests(SynchronousTestCase):
    """The exclusive lock, across processes and within one."""

    def setUp(self) -> None:
        self.path = Path(self.mktemp()).resolve()
        self.clock = Clock()

    def hold_in_child(self) -> subprocess.Popen[str]:
        """A child process that holds the audit log until the test ends."""
        child = python(HOLDER, str(self.path), KEY.decode(), stdin=subprocess.PIPE)
        stdout: IO[str] | None = child.stdout
        assert stdout is not None and child.stdin is not None
        self.addCleanup(child.wait, 60)
        self.addCleanup(child.stdin.close)
        self.assertEqual(stdout.readline(), "ready\n")
        return child

    def try_lock_in_child(self) -> str:
        """What another process gets when it asks for the lock now."""
        child = python(TAKER, str(self.path))
        out, _ = child.communicate(timeout=60)
        return out.strip()

    def test_second_process_refused_before_writing(self) -> None:
        """A second writer is refused with the holder's pid, and writes nothing."""
        holder = self.hold_in_child()
        before = self.path.read_bytes()
        log = AuditLog(self.path, KEY, self.clock)
        with self.assertRaises(StartupError) as raised:
            log.startService()
        self.assertEqual(
            str(raised.exception),
            f"audit log {self.path} is in use by another promgate (pid {holder.pid})",
        )
        self.assertFalse(log.running)
        self.assertFalse(log.record(AuditEvent("request")))
        self.assertEqual(self.path.read_bytes(), before)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_verify_while_running(self) -> None:
        """``promgate audit verify`` reads a log another process is writing; it needs no lock."""
        self.hold_in_child()
        key_file = Path(self.mktemp())
        key_file.write_bytes(KEY + b"\n")
        code, out, err = run_cli("audit", "verify", "--key-file", str(key_file), str(self.path))
        self.assertEqual(
            (code, out, err),
            (0, "OK: 2 record(s) verified; no stop record yet (still running?)\n", ""),
        )

    def test_released_at_stop(self) -> None:
        """Once the holder stops, the next writer gets the lock and continues the chain."""
        holder = self.hold_in_child()
        assert holder.stdin is not None
        holder.stdin.close()
        self.assertEqual(holder.wait(60), 0)
        log = AuditLog(self.path, KEY, self.clock)
        log.startService()
        log.stopService()
        result = verify_files(KEY, [self.path])
        self.assertEqual((result.ok, result.count, result.ended_cleanly), (True, 5, True))

    def test_same_process_refused_and_lock_kept(self) -> None:
        """A second writer in the same process is refused, and its attempt keeps the lock.

        POSIX locks belong to the process, and closing any descriptor of the file releases
        them: the refused open, and an in-process verify, must not let another process in.
        """
        log = AuditLog(self.path, KEY, self.clock)
        log.startService()
        self.addCleanup(lambda: log.stopService() if log.running else None)
        refusal = f"audit log {self.path} is in use by another promgate (pid {os.getpid()})"
        second = AuditLog(self.path, KEY, self.clock)
        with self.assertRaises(StartupError) as raised:
            second.startService()
        self.assertEqual(str(raised.exception), refusal)
        self.assertTrue(verify_files(KEY, [self.path]).ok)
        self.assertEqual(self.try_lock_in_child(), refusal)
        self.assertTrue(log.record(AuditEvent("request")))
        log.stopService()
        self.assertEqual(self.try_lock_in_child(), "locked")
        self.assertEqual(verify_files(KEY, [self.path]).count, 3)

    def test_lock_function(self) -> None:
        """lock_audit_file, for commands that write, refuses while a gateway holds the file."""
        self.hold_in_child()
        with self.assertRaises(StartupError) as raised:
            lock_audit_file(self.path)
        self.assertIn("is in use by another promgate (pid ", str(raised.exception))

    def test_directory(self) -> None:
        """An audit path that is a directory is one line naming it, before anything is written."""
        self.path.mkdir()
        log = AuditLog(self.path, KEY, self.clock)
        with self.assertRaises(StartupError) as raised:
            log.startService()
        self.assertEqual(str(raised.exception), f"audit log {self.path}: is a directory")
        self.assertEqual(list(self.path.iterdir()), [])

    def test_missing_directory(self) -> None:
        """An audit path in a directory that does not exist says so."""
        path = self.path / "audit.jsonl"
        with self.assertRaises(StartupError) as raised:
            AuditLog(path, KEY, self.clock).startService()
        self.assertEqual(str(raised.exception), f"audit log {path}: no such file or directory")
