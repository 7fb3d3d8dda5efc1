"""The audit trail: one tamper-evident JSON line per gateway decision.

This is promgate's record of "who scraped what, when, and was it allowed?", kept apart from the
global log. Every record carries a sequence number and an HMAC-SHA256 that covers the previous
record's MAC, so :func:`verify_files` (``promgate audit verify``) detects edited, deleted,
reordered and truncated records. Record schema, one JSON object per line::

    {"seq":1,"time":"2026-11-24T06:11:15.123456Z","event":"request",<non-null fields>,"mac":"..."}

``mac`` is ``HMAC-SHA256(key, prev_mac_hex + "\\n" + canonical)`` in hex, where ``canonical`` is
the record without ``mac`` serialised with sorted keys, and the previous MAC of record 1 is 64
zeros. The chain continues across restarts and across rotated files.
"""

from __future__ import annotations

import errno
import hmac
import json
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

__all__ = [
    "AuditEvent",
    "AuditLog",
    "IAuditSink",
    "MemoryAuditSink",
    "VerifyResult",
    "load_key",
    "verify_files",
]

#: The previous MAC of the first record in a chain.
GENESIS_MAC = "0" * 64
#: Appended to a string value cut at ``max_field_length`` characters.
TRUNCATION_MARK = "...[truncated]"
FSYNC_POLICIES = ("always", "interval", "never")

# Pre-built encoders: json.dumps() with non-default arguments builds a new encoder per call.
_LINE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_TAIL_BLOCK = 64 * 1024
_MIN_TAIL_SCAN = 4 * 1024 * 1024


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


#: Record fields after seq, time and event, in the order they are written.
_OPTIONAL_FIELDS = tuple(a.name for a in attrs.fields(AuditEvent) if a.name != "event")


def _mac(key: bytes, prev_mac: bytes, canonical: bytes) -> str:
    return hmac.digest(key, prev_mac + b"\n" + canonical, "sha256").hex()


def _parse_record(body: bytes) -> dict[str, Any] | None:
    """Parse one line (without its newline) as a record exactly as the writer produces it.

    Anything else is rejected, including equivalent JSON spelled differently (other escapes,
    whitespace, duplicate keys), so that no byte of a line can change without detection.
    """
    try:
        record = json.loads(body.decode("ascii"))
    except (ValueError, RecursionError):
        return None
    if (
        type(record) is not dict
        or _LINE.encode(record).encode("ascii") != body
        or type(record.get("seq")) is not int
        or type(record.get("mac")) is not str
        or not record["mac"].isascii()
    ):
        return None
    return record


@implementer(IAuditSink)
class AuditLog(Service):
    """The audit trail as a service: an append-only, HMAC-chained JSON-lines file.

    ``fsync`` is ``"always"`` (before record() returns), ``"interval"`` (every
    ``fsync_interval`` seconds on ``clock`` when something was written) or ``"never"``.
    ``on_result(ok)`` is called after every write attempt, for metrics.
    """

    log = Logger()

    def __init__(
        self,
        path: Path,
        key: bytes,
        clock: IReactorTime,
        fsync: str = "interval",
        fsync_interval: float = 1.0,
        max_field_length: int = 1024,
        on_result: Callable[[bool], None] | None = None,
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
        self._key = key
        self._clock = clock
        self._fsync = fsync
        self._fsync_interval = fsync_interval
        self._max = max_field_length
        self._on_result = on_result
        self._fd: int | None = None
        self._seq = 0
        self._prev = GENESIS_MAC.encode("ascii")
        self._healthy = True
        self._failures = 0  # failed attempts since the log last became unhealthy
        self._dirty = False  # written since the last fsync
        self._torn = False  # the file may end mid-line (a partial write failed)
        self._sync_loop: LoopingCall | None = None

    @property
    def healthy(self) -> bool:
        """False after a write failed, until a later write succeeds."""
        return self._healthy

    # -- service lifecycle -----------------------------------------------------------------

    def startService(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            notes = self._recover()
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        Service.startService(self)
        self.record(AuditEvent("start", detail="; ".join(notes) or None))
        if self._fsync == "interval":
            loop = self._sync_loop = LoopingCall(self._sync)
            loop.clock = self._clock
            loop.start(self._fsync_interval, now=False).addErrback(self._sync_loop_failed)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._sync_loop is not None and self._sync_loop.running:
            self._sync_loop.stop()
        self._sync_loop = None
        if self._fd is None:
            return
        self.record(AuditEvent("stop"))
        self._sync()
        os.close(self._fd)
        self._fd = None

    def _recover(self) -> list[str]:
        """Continue the chain from the file's last intact record; return notes for "start"."""
        self._seq, self._prev, self._torn = 0, GENESIS_MAC.encode("ascii"), False
        with self.path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:  # a new log (or a device such as /dev/full)
                return []
            f.seek(size - 1)
            self._torn = f.read(1) != b"\n"
            # A record holds 15 capped strings of up to 12 bytes per character, plus numbers.
            limit = max(_MIN_TAIL_SCAN, 4 * 16 * 12 * (self._max + len(TRUNCATION_MARK)))
            last = _last_record(f, size, limit)
        notes = []
        if self._torn:
            notes.append("previous run ended mid-record; the incomplete line was terminated")
        if last is None:
            self.log.error(
                "no intact audit record in the last {limit} bytes of {path}; "
                "starting a new chain at seq 1, which will not verify against the old one",
                limit=limit,
                path=str(self.path),
            )
            notes.append(f"no intact record found in the last {limit} bytes; chain restarted")
            return notes
        self._seq = last["seq"]
        self._prev = last["mac"].encode("ascii")
        if last.get("event") != "stop":
            notes.append(f"previous run ended without a stop record (last seq {self._seq})")
        return notes

    # -- writing ---------------------------------------------------------------------------

    def record(self, event: AuditEvent) -> bool:
        """Append one record; False (and ``healthy`` False) if it could not be written."""
        fd = self._fd
        if fd is None:
            self.log.error("audit log {path} is not open; record dropped", path=str(self.path))
            return self._result(False)
        limit = self._max
        seq = self._seq + 1
        value: Any = event.event
        if len(value) > limit:
            value = value[:limit] + TRUNCATION_MARK
        record: dict[str, Any] = {
            "seq": seq,
            "time": datetime.fromtimestamp(self._clock.seconds(), timezone.utc).strftime(
                _TIME_FORMAT
            ),
            "event": value,
        }
        for name in _OPTIONAL_FIELDS:
            value = getattr(event, name)
            if value is None:
                continue
            if isinstance(value, str):
                if len(value) > limit:
                    value = value[:limit] + TRUNCATION_MARK
            elif isinstance(value, float):
                value = round(value, 6)
            record[name] = value
        mac = _mac(self._key, self._prev, _CANONICAL.encode(record).encode("ascii"))
        record["mac"] = mac
        data = (_LINE.encode(record) + "\n").encode("ascii")
        if self._torn:
            data = b"\n" + data
        written = 0
        try:
            while written < len(data):
                written += os.write(fd, data[written:] if written else data)
        except OSError as e:
            if written:
                self._torn = data[written - 1] != 0x0A
            return self._failed("write", e)
        self._torn = False
        self._seq = seq
        self._prev = mac.encode("ascii")
        self._dirty = True
        if self._fsync == "always":
            try:
                self._fsync_now(fd)
            except OSError as e:
                return self._failed("fsync", e)
        if not self._healthy:
            self._healthy = True
            self.log.info(
                "audit log {path} is writable again after {failures} failed attempts",
                path=str(self.path),
                failures=self._failures,
            )
        return self._result(True)

    def _result(self, ok: bool) -> bool:
        if self._on_result is not None:
            self._on_result(ok)
        return ok

    def _failed(self, operation: str, error: OSError) -> bool:
        """Mark the log unhealthy; log once per outage, not once per request."""
        self._failures = self._failures + 1 if not self._healthy else 1
        if self._healthy:
            self._healthy = False
            self.log.error(
                "audit log {path}: {operation} failed: {error}; records are being lost",
                path=str(self.path),
                operation=operation,
                error=error,
            )
        return self._result(False)

    def _fsync_now(self, fd: int) -> None:
        self._dirty = False
        try:
            os.fsync(fd)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: a pipe or device that cannot be synced
                raise

    def _sync(self) -> None:
        """Flush to disk if anything was written since the last flush."""
        if self._fd is None or not self._dirty:
            return
        try:
            self._fsync_now(self._fd)
        except OSError as e:
            self._failed("fsync", e)

    def _sync_loop_failed(self, failure: Failure) -> None:
        self.log.failure("audit fsync loop stopped", failure)


def _last_record(f: BinaryIO, size: int, limit: int) -> dict[str, Any] | None:
    """The last complete, parseable record in the final ``limit`` bytes of ``f``."""
    pos = size
    carry = b""  # the start of what was read: the end of a line whose beginning is not read yet
    tail_open = True  # the last segment has no newline after it (the torn tail, or b"")
    while pos > 0 and size - pos < limit:
        start = max(0, pos - _TAIL_BLOCK)
        f.seek(start)
        lines = (f.read(pos - start) + carry).split(b"\n")
        pos = start
        for body in reversed(lines[1 if pos else 0 : len(lines) - 1 if tail_open else None]):
            record = _parse_record(body)
            if record is not None:
                return record
        if len(lines) > 1:
            tail_open = False
        carry = lines[0] if pos else b""
    return None


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


@attrs.frozen
class VerifyResult:
    """The outcome of checking an audit chain, with where it first went wrong."""

    ok: bool
    count: int  # records verified good
    first_bad_seq: int | None  # the seq expected where the chain first breaks
    message: str  # what is wrong and where (file and line number)
    ended_cleanly: bool  # the last record is a "stop" event


def verify_files(key: bytes, files: Sequence[Path]) -> VerifyResult:
    """Check one audit chain spread over ``files`` (oldest first), stopping at the first fault."""
    prev = GENESIS_MAC.encode("ascii")
    count = 0
    last_event: object = None

    def bad(path: Path, lineno: int, what: str) -> VerifyResult:
        return VerifyResult(
            ok=False,
            count=count,
            first_bad_seq=count + 1,
            message=f"{path}:{lineno}: {what} (seq {count + 1} expected; "
            f"{count} records before it verified)",
            ended_cleanly=False,
        )

    for path in files:
        try:
            f = path.open("rb")
        except OSError as e:
            return bad(path, 0, f"cannot read: {e.strerror}")
        with f:
            for lineno, raw in enumerate(f, 1):
                if raw[-1:] != b"\n":
                    return bad(path, lineno, "truncated: the last line is incomplete")
                record = _parse_record(raw[:-1])
                if record is None:
                    return bad(path, lineno, "not a well-formed audit record")
                seq = record["seq"]
                mac = record.pop("mac")
                good = hmac.compare_digest(
                    mac, _mac(key, prev, _CANONICAL.encode(record).encode("ascii"))
                )
                if seq != count + 1:
                    what = "records missing" if seq > count + 1 else "out of order or repeated"
                    edited = "" if good else " (or this record was edited)"
                    return bad(path, lineno, f"found seq {seq}: {what}{edited}")
                if not good:
                    what = "wrong key, or the record was edited" if count == 0 else "edited"
                    return bad(path, lineno, f"MAC mismatch: {what}")
                prev = mac.encode("ascii")
                count += 1
                last_event = record.get("event")
    ended_cleanly = last_event == "stop"
    return VerifyResult(
        ok=True,
        count=count,
        first_bad_seq=None,
        message=f"{count} records verified in {len(files)} file{'' if len(files) == 1 else 's'}"
        + ("" if ended_cleanly or not count else "; no stop record at the end (still running?)"),
        ended_cleanly=ended_cleanly,
    )
