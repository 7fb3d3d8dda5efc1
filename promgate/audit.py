"""The audit trail: one tamper-evident JSON line per gateway decision.

This is promgate's record of "who scraped what, when, and was it allowed?", kept apart from the
global log. Every record carries a sequence number and an HMAC-SHA256 that covers the previous
record's MAC, so :func:`verify_files` (``promgate audit verify``) detects edited, deleted,
reordered and truncated records. Record schema, one JSON object per line::

    {"seq":1,"time":"2026-11-24T06:11:15.123456Z","event":"request",<non-null fields>,"mac":"..."}

``mac`` is ``HMAC-SHA256(key, prev_mac_hex + "\\n" + canonical)`` in hex, where ``canonical`` is
the record without ``mac`` serialised with sorted keys, and the previous MAC of record 1 is 64
zeros. The chain continues across restarts, into the file that replaces one removed while
the gateway runs, and into the next file after a rotation (:mod:`promgate.audit_rotate`).
The file never keeps part of a record: a write that fails halfway, or one cut by a crash, is
cut back to the last complete line. The byte format is in :mod:`promgate.audit_format`, the
lock in :mod:`promgate.audit_lock`, verification in :mod:`promgate.audit_verify`.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from promgate.audit_format import (
    GENESIS_MAC,
    TRUNCATION_MARK,
    RecordEncoder,
    record_time,
)
from promgate.audit_lock import LockedFile, describe, lock_audit_file
from promgate.audit_rotate import ROTATE, current_name, rotate_detail
from promgate.audit_tail import recover
from promgate.audit_verify import VerifyGap, VerifyResult, verify_files
from promgate.config.model import FSYNC_POLICIES
from promgate.errors import StartupError

__all__ = [
    "GENESIS_MAC",
    "TRUNCATION_MARK",
    "AuditEvent",
    "AuditLog",
    "IAuditSink",
    "MemoryAuditSink",
    "VerifyGap",
    "VerifyResult",
    "load_key",
    "lock_audit_file",
    "verify_files",
]

#: How often the log checks that its path still names the file it writes.
WATCH_INTERVAL = 1.0


class IAuditSink(Interface):
    """Where the gateway writes down each decision; the proxies depend only on this."""

    healthy = Attribute("False after a write failed, until a later write succeeds.")

    def record(event: AuditEvent) -> bool:  # noqa: N805 (zope.interface: no self)
        """Write one record; return False if it could not be written."""


@attrs.frozen
class AuditEvent:
    """One decision or lifecycle event, as the gateway saw it; None fields are left out."""

    event: str  # "request", "tls_handshake_failed", "start", "stop", ...
    listener: str | None = None
    peer: str | None = None  # "1.2.3.4:5678"
    tls_version: str | None = None
    tls_cipher: str | None = None
    cert_sha256: str | None = None
    cert_subject: str | None = None
    identity: str | None = None
    route: str | None = None
    target: str | None = None
    method: str | None = None
    path: str | None = None
    decision: str | None = None  # "allow" | "deny"
    reason: str | None = None  # "ok", "authz_denied", "rate_limited", "upstream_timeout", ...
    status: int | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    duration: float | None = None  # seconds
    detail: str | None = None
    server_name: str | None = None  # TLS SNI, on ``connection`` records of tcp listeners
    count: int | None = None  # how many refusals an aggregated record stands for


#: Record fields after seq, time and event, in the order they are written.
_FIELDS = tuple(a.name for a in attrs.fields(AuditEvent) if a.name != "event")


class _State(Enum):
    """Where an AuditLog writes."""

    STOPPED = "stopped"  # not started, or stopped: records are refused
    OPEN = "open"  # appending to the file its path names
    DETACHED = "detached"  # the path no longer names a usable file; reopening every second


@implementer(IAuditSink)
class AuditLog(Service):
    """The audit trail as a service: an append-only, HMAC-chained JSON-lines file.

    ``fsync`` is ``"always"`` (before record() returns), ``"interval"`` (every
    ``fsync_interval`` seconds on ``clock`` when something was written) or ``"never"``.

    With ``batch`` (and ``fsync`` other than ``"always"``), the records of one reactor turn
    are written together: record() chains and encodes the record at once and queues it, and
    one ``write(2)`` at the end of the turn (``clock.callLater(0)``) appends them all. A write
    that fails then loses the whole batch (cut back to the last complete record, the chain
    continuing from it), makes ``healthy`` False and counts each record as failed, as a
    failed single write does. Without ``batch``, or with ``"always"``, each record is written
    (and synced) before record() returns.

    ``on_result(ok)`` is called for every record after its write attempt, for metrics, and
    ``on_reopen()`` each time the file is reopened because its path no longer named it (or
    was rotated);
    ``on_head(seq, mac)`` after every write, with the seq and MAC of the last record written
    (the chain's head, for the witness metrics). ``note`` begins the detail of every
    ``start`` record (which worker writes this chain). ``write`` replaces
    ``os.write`` (tests use it to fill the disk). ``key`` is the key itself, or the key file
    (:func:`load_key`), read when start-up begins (``privilegedStartService``, before
    ``twistd --uid`` drops privileges), never in the constructor.

    Starting takes the file's exclusive lock (:func:`lock_audit_file`) and raises
    :class:`~promgate.errors.StartupError` before writing anything if another promgate holds
    it or it cannot be opened.
    """

    log = Logger()

    def __init__(
        self,
        path: Path,
        key: bytes | Path,
        clock: IReactorTime,
        fsync: str = "interval",
        fsync_interval: float = 1.0,
        max_field_length: int = 1024,
        on_result: Callable[[bool], None] | None = None,
        on_reopen: Callable[[], None] | None = None,
        write: Callable[[int, bytes], int] | None = None,
        on_head: Callable[[int, str], None] | None = None,
        batch: bool = False,
        note: str | None = None,
    ) -> None:
        if not key:
            raise ValueError("audit key must not be empty")
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
        if fsync == "interval" and not fsync_interval > 0:
            raise ValueError(f"fsync_interval must be positive, not {fsync_interval!r}")
        if max_field_length < 1:
            raise ValueError(f"max_field_length must be positive, not {max_field_length!r}")
        self.path = path
        self._key_file = key if isinstance(key, Path) else None
        self._key = b"" if isinstance(key, Path) else key
        self._clock = clock
        self._fsync = fsync
        self._fsync_interval = fsync_interval
        self._max = max_field_length
        self._encoder = RecordEncoder(_FIELDS, max_field_length)
        self._on_result = on_result
        self._on_reopen = on_reopen
        self._write = write
        self._on_head = on_head
        self._note = note  # what every start record says first (which worker writes)
        # Set by rotate() until the new file's first record is written: the previous
        # file's name when it was let go, and its last seq and MAC.
        self._rotation: tuple[str | None, int, str] | None = None
        self._state = _State.STOPPED
        self._file: LockedFile | None = None
        self._seq = 0
        self._prev = GENESIS_MAC.encode("ascii")
        self._healthy = True
        self._failures = 0  # failed attempts since the log last became unhealthy
        self._dirty = False  # written since the last fsync
        # The end of the last complete record (None: a device or pipe, never cut back), and
        # where the file still has to be cut back to after a failed write and a failed cut.
        self._end: int | None = None
        self._cut: int | None = None
        self._lead = b""  # b"\n" while the file ends with a line that is not ours, unfinished
        self._batch = batch and fsync != "always"
        self._pending: list[bytes] = []  # encoded records not written yet (batch)
        self._flush_call: IDelayedCall | None = None
        # The chain's head as written: what it goes back to when a batch is lost.
        self._written_seq = 0
        self._written_prev = self._prev
        self._sync_loop: LoopingCall | None = None
        self._watch_loop: LoopingCall | None = None

    @property
    def healthy(self) -> bool:
        """False after a write failed, until a later write succeeds."""
        return self._healthy

    # -- service lifecycle -----------------------------------------------------------------

    def privilegedStartService(self) -> None:
        self._load_key()
        Service.privilegedStartService(self)

    def _load_key(self) -> None:
        if self._key_file is None or self._key:
            return
        try:
            self._key = load_key(self._key_file)
        except OSError as e:
            raise StartupError(f"audit key file {self._key_file}: {describe(e)}") from None
        except ValueError as e:
            raise StartupError(str(e)) from None

    def startService(self) -> None:
        self._load_key()
        file = lock_audit_file(self.path)
        try:
            notes = self._recover(file.fd)
        except OSError as e:
            file.close()
            raise StartupError(f"audit log {self.path}: {describe(e)}") from None
        except BaseException:
            file.close()
            raise
        self._opened(file)
        Service.startService(self)
        notes = [self._note, *notes] if self._note else notes
        self.record(AuditEvent("start", detail="; ".join(notes) or None))
        self.flush()
        if self._fsync == "interval":
            self._sync_loop = self._every(self._fsync_interval, self._sync)
        self._watch_loop = self._every(WATCH_INTERVAL, self._watch)

    def stopService(self) -> None:
        Service.stopService(self)
        for loop in (self._sync_loop, self._watch_loop):
            if loop is not None and loop.running:
                loop.stop()
        self._sync_loop = self._watch_loop = None
        if self._state is _State.STOPPED:
            return
        self._watch()  # the stop record goes where the path leads now
        if self._file is not None:
            self.record(AuditEvent("stop"))
            self.flush()
            self._sync()
            self._file.close()
            self._file = None
        self._state = _State.STOPPED

    def _every(self, interval: float, work: Callable[[], None]) -> LoopingCall:
        loop = LoopingCall(work)
        loop.clock = self._clock
        loop.start(interval, now=False).addErrback(self._loop_failed)
        return loop

    def _opened(self, file: LockedFile) -> None:
        self._file = file
        self._state = _State.OPEN
        self._cut = None
        self._end = os.lseek(file.fd, 0, os.SEEK_END) if file.regular else None

    def _recover(self, fd: int) -> list[str]:
        """Continue the chain from the file's last intact record (promgate.audit_tail);
        return the notes for ``start``."""
        found = recover(fd, self._max, self.log, self.path)
        self._seq = self._written_seq = found.seq
        self._prev = self._written_prev = found.prev
        self._lead = found.lead
        return list(found.notes)

    # -- rotation, and the path removed or replaced ----------------------------------------

    def rotate(self) -> None:
        """Reopen the path after the file was renamed away (``SIGUSR1``, for logrotate).

        The new file starts with a ``rotate`` record naming the previous file. If the path
        still names the open file, nothing was rotated and nothing changes.
        """
        if self._state is _State.STOPPED:
            return
        self.flush()  # what was recorded before goes to the file it was recorded for
        if self._state is _State.OPEN:
            if self._names_open_file():
                self.log.info(
                    "audit log rotation asked, but {path} still names the open file; "
                    "nothing to rotate",
                    path=str(self.path),
                )
                return
            assert self._file is not None
            previous = current_name(self._file.fd, self.path)
            self._rotation = (previous, self._seq, self._prev.decode("ascii"))
            self._detach()
        elif self._rotation is None:  # detached: the old file is gone from our hands
            self._rotation = (None, self._seq, self._prev.decode("ascii"))
        self._reopen()

    def _watch(self) -> None:
        """Reopen the path if it no longer names the open file (removed, moved, replaced)."""
        self.flush()
        if self._state is _State.OPEN and not self._names_open_file():
            self._detach()
        if self._state is _State.DETACHED:
            self._reopen()

    def _names_open_file(self) -> bool:
        assert self._file is not None
        try:
            named = os.stat(self.path)
            open_ = os.fstat(self._file.fd)
        except OSError:
            return False
        return (named.st_dev, named.st_ino) == (open_.st_dev, open_.st_ino)

    def _detach(self) -> None:
        """Let go of a file the path no longer names, with what was written to it on disk."""
        file, self._file = self._file, None
        self._state = _State.DETACHED
        assert file is not None
        if self._rotation is not None:
            self.log.info(
                "audit log {path} rotated (last seq {seq}, the file is now {previous}); "
                "reopening it",
                path=str(self.path),
                seq=self._seq,
                previous=self._rotation[0] or "removed",
            )
        else:
            self.log.warn(
                "audit log {path} was removed or replaced while open (last seq {seq}); "
                "reopening it",
                path=str(self.path),
                seq=self._seq,
            )
        # Its records are where the path no longer leads (if anywhere); the new file says so.
        with contextlib.suppress(OSError):
            self._fsync_now(file.fd)
        file.close()

    def _reopen(self) -> None:
        try:
            file = lock_audit_file(self.path)
        except StartupError as e:
            self._unusable(str(e))
            return
        try:
            size = os.fstat(file.fd).st_size
            unfinished = bool(size) and file.regular and os.pread(file.fd, 1, size - 1) != b"\n"
        except OSError as e:
            file.close()
            self._unusable(f"audit log {self.path}: {describe(e)}")
            return
        self._opened(file)
        self._lead = b"\n" if unfinished else b""
        seq = self._seq + 1
        self.log.warn(
            "audit log {path} reopened; continuing the chain at seq {seq}",
            path=str(self.path),
            seq=seq,
        )
        if self._on_reopen is not None:
            self._on_reopen()
        if self._rotation is not None:
            previous, last, last_mac = self._rotation
            self._rotation = None
            self.record(AuditEvent(ROTATE, detail=rotate_detail(previous, last, last_mac, size)))
            return
        detail = (
            f"audit log {self.path} was removed or replaced while open; "
            f"reopened, continuing the chain at seq {seq}"
        )
        if size:
            detail += f"; the file found there already held {size} bytes"
        self.record(AuditEvent("reopen", detail=detail))

    def _unusable(self, error: str) -> None:
        """The path cannot be reopened yet: unhealthy, logged once per outage."""
        self._failures = self._failures + 1 if not self._healthy else 1
        if self._healthy:
            self._healthy = False
            self.log.error(
                "{error}; records are being lost until it can be reopened "
                "(retrying every {interval}s)",
                error=error,
                interval=WATCH_INTERVAL,
            )

    # -- writing ---------------------------------------------------------------------------

    def record(self, event: AuditEvent) -> bool:
        """Append one record; False (and ``healthy`` False) if it could not be written.

        With batching, the record is chained and queued and True means it was queued: it is
        written at the end of the reactor turn, or lost with its batch if that write fails.
        """
        if self._file is None:
            if self._state is _State.DETACHED:
                self._failures += 1
            else:
                self.log.error("audit log {path} is not open; record dropped", path=str(self.path))
            return self._result(False)
        seq = self._seq + 1
        time = record_time(self._clock.seconds())
        line, record_mac = self._encoder.encode(self._key, self._prev, seq, time, event)
        self._seq = seq
        self._prev = record_mac.encode("ascii")
        self._pending.append(line)
        if not self._batch:
            return self._flush()
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush)
        return True

    def flush(self) -> None:
        """Write the queued records now (batching writes them at the end of the turn)."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        if self._pending:
            self._flush()
        self._flush_call = None

    def _flush(self) -> bool:
        """Write every queued record in one write; False if they could not be written."""
        self._flush_call = None
        pending, self._pending = self._pending, []
        count = len(pending)
        if not count:
            return True
        file = self._file
        if file is None:  # let go of meanwhile (not expected: rotation flushes first)
            self._lost()
            self._failures += count
            return self._result(False, count)
        fd = file.fd
        if self._cut is not None:
            try:
                os.ftruncate(fd, self._cut)
            except OSError as e:
                return self._failed("truncate", e, count)
            self._end, self._cut = self._cut, None
        data = self._lead + (pending[0] if count == 1 else b"".join(pending))
        written = 0
        try:
            while written < len(data):
                n = (self._write or os.write)(fd, data[written:] if written else data)
                if n <= 0:  # no progress: do not spin
                    raise OSError(errno.EIO, "write wrote nothing")
                written += n
        except OSError as e:
            self._cut_back(fd, len(data))
            return self._failed("write", e, count)
        self._lead = b""
        if self._end is not None:
            # One lseek per write (no I/O) keeps the offset to cut back to exact, even
            # after the file was truncated in place (copytruncate).
            self._end = os.lseek(fd, 0, os.SEEK_CUR)
        self._written_seq, self._written_prev = self._seq, self._prev
        self._dirty = True
        if self._on_head is not None:
            self._on_head(self._seq, self._prev.decode("ascii"))
        if self._fsync == "always":
            try:
                self._fsync_now(fd)
            except OSError as e:
                return self._failed("fsync", e, count)
        if not self._healthy:
            self._healthy = True
            self.log.info(
                "audit log {path} is writable again after {failures} failed attempts",
                path=str(self.path),
                failures=self._failures,
            )
        return self._result(True, count)

    def _lost(self) -> None:
        """The queued records were not written: the chain goes on from the last written."""
        self._seq, self._prev = self._written_seq, self._written_prev

    def _cut_back(self, fd: int, attempted: int) -> None:
        """After a failed write, cut off whatever part of the record reached the file.

        The cut is at the end of the last complete record, tracked after every write; if the
        file changed under the log (truncated in place), at the last newline before the
        partial record (a record holds no newline but its last byte). If the cut fails too,
        it is tried again before the next record.
        """
        end = self._end
        if end is None:
            return
        try:
            size = os.fstat(fd).st_size
            if size == end:
                return  # nothing reached the file
            if end < size and (end == 0 or os.pread(fd, 1, end - 1) == b"\n"):
                cut = end
            else:
                tail = os.pread(fd, min(size, attempted), size - min(size, attempted))
                newline = tail.rfind(b"\n")
                if newline < 0 and len(tail) < size:
                    return  # not a record of ours: leave it
                cut = size - len(tail) + newline + 1
        except OSError:
            return
        if cut > end:
            self._lead = b""  # the line it had to close was closed
        try:
            os.ftruncate(fd, cut)
        except OSError:
            self._cut = cut
            return
        self._end = cut

    def _result(self, ok: bool, count: int = 1) -> bool:
        if self._on_result is not None:
            for _ in range(count):
                self._on_result(ok)
        return ok

    def _failed(self, operation: str, error: OSError, count: int = 1) -> bool:
        """Mark the log unhealthy; log once per outage, not once per request."""
        if operation != "fsync":  # the records were not written: neither is their chain
            self._lost()
        self._failures = self._failures + count if not self._healthy else count
        if self._healthy:
            self._healthy = False
            self.log.error(
                "audit log {path}: {operation} failed: {error}; records are being lost",
                path=str(self.path),
                operation=operation,
                error=error,
            )
        return self._result(False, count)

    def _fsync_now(self, fd: int) -> None:
        self._dirty = False
        try:
            os.fsync(fd)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: a pipe or device that cannot be synced
                raise

    def _sync(self) -> None:
        """Flush to disk if anything was written since the last flush."""
        if self._file is None or not self._dirty:
            return
        try:
            self._fsync_now(self._file.fd)
        except OSError as e:
            self._failed("fsync", e)

    def _loop_failed(self, failure: Failure) -> None:
        self.log.failure("audit log timer stopped", failure)


@implementer(IAuditSink)
class MemoryAuditSink:
    """An in-memory audit sink for tests: keeps events, and fails on demand via ``healthy``."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.healthy = True

    def record(self, event: AuditEvent) -> bool:
        """Keep ``event`` if healthy; return whether it was kept."""
        if self.healthy:
            self.events.append(event)
        return self.healthy


def load_key(path: Path) -> bytes:
    """Read an audit key file: its text with surrounding whitespace stripped, as UTF-8."""
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise ValueError(f"audit key file {path} is empty")
    return key.encode("utf-8")
