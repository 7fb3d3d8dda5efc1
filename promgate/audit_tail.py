"""Reading back from the end of an audit file for its last intact record.

The writer continues the chain from there when it starts; see :mod:`promgate.audit`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
from twisted.logger import Logger

from promgate.audit_format import (
    GENESIS_MAC,
    TRUNCATION_MARK,
    is_record_start,
    not_records_note,
    parse_record,
)

__all__ = ["Recovered", "Tail", "recover", "scan_tail"]

_MIN_TAIL_SCAN = 4 * 1024 * 1024

_TAIL_BLOCK = 64 * 1024


@attrs.frozen
class Tail:
    """What the end of an existing audit file holds."""

    record: dict[str, Any] | None  # the last intact record
    junk_lines: int  # complete lines after it that are not records
    fragment: int  # bytes after the last newline: a line left unfinished
    fragment_ours: bool  # that line is the start of a record as the writer writes them


def scan_tail(read: Callable[[int, int], bytes], size: int, limit: int) -> Tail:
    """Read back from the end of a file (at most ``limit`` bytes) for its last intact record."""
    end: int | None = None  # the end of the last complete line
    pos = size
    while pos > 0 and size - pos < limit:
        start = max(0, pos - _TAIL_BLOCK)
        newline = read(start, pos - start).rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        pos = start
    else:
        end = 0 if pos == 0 else None
    if end is None:  # no line ends within the limit: not a record of ours
        return Tail(None, 0, size, False)
    fragment = size - end
    ours = fragment > 0 and is_record_start(read(end, min(fragment, 16)))
    junk = 0
    for body in _lines_before(read, end, limit - fragment):
        record = parse_record(body)
        if record is not None:
            return Tail(record, junk, fragment, ours)
        junk += 1
    return Tail(None, junk, fragment, ours)


def _lines_before(read: Callable[[int, int], bytes], end: int, limit: int) -> Iterator[bytes]:
    """The complete lines that end at or before ``end`` (just after a newline), last first."""
    pos = end
    carry = b""  # the end of a line whose beginning is not read yet, with its newline
    while pos > 0 and end - pos < limit:
        start = max(0, pos - _TAIL_BLOCK)
        lines = (read(start, pos - start) + carry).split(b"\n")
        pos = start
        yield from reversed(lines[1 if pos else 0 : -1])
        carry = lines[0] + b"\n" if pos else b""


@attrs.frozen
class Recovered:
    """Where the writer continues an existing file's chain, and what ``start`` says of it."""

    seq: int
    prev: bytes  # the MAC the next record chains to
    lead: bytes  # written before the next record (a newline closing a foreign line)
    notes: tuple[str, ...]


def recover(fd: int, max_field_length: int, log: Logger, path: Path) -> Recovered:
    """Continue the chain from the file's last intact record.

    An unfinished record at the end (a crash mid-write) is cut off. Lines after the last
    intact record that are not records (nor ours) are left, counted in a note that
    ``verify`` accepts as their explanation.
    """
    genesis = GENESIS_MAC.encode("ascii")
    size = os.fstat(fd).st_size
    if size == 0:  # a new log (or a device such as /dev/full)
        return Recovered(0, genesis, b"", ())
    # A record holds 15 capped strings of up to 12 bytes per character, plus numbers.
    limit = max(_MIN_TAIL_SCAN, 4 * 16 * 12 * (max_field_length + len(TRUNCATION_MARK)))
    tail = scan_tail(lambda offset, n: os.pread(fd, n, offset), size, limit)
    notes = []
    junk = tail.junk_lines
    lead = b""
    if tail.fragment and tail.fragment_ours:
        os.ftruncate(fd, size - tail.fragment)
        size -= tail.fragment
        notes.append(
            "previous run ended mid-record; "
            f"dropped its incomplete last record ({tail.fragment} bytes)"
        )
    elif tail.fragment:
        lead = b"\n"  # close the line before the start record
        junk += 1
    last = tail.record
    if last is None:
        if size == 0:  # nothing but an unfinished first record
            return Recovered(0, genesis, lead, tuple(notes))
        log.error(
            "no intact audit record in the last {limit} bytes of {path}; "
            "starting a new chain at seq 1, which will not verify against the old one",
            limit=limit,
            path=str(path),
        )
        notes.append(f"no intact record found in the last {limit} bytes; chain restarted")
        return Recovered(0, genesis, lead, tuple(notes))
    seq = last["seq"]
    if junk:
        notes.append(not_records_note(seq, junk))
    if last.get("event") != "stop":
        notes.append(f"previous run ended without a stop record (last seq {seq})")
    return Recovered(seq, last["mac"].encode("ascii"), lead, tuple(notes))
