"""Reading back from the end of an audit file for its last intact record.

The writer continues the chain from there when it starts; see :mod:`promgate.audit`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import attrs

from promgate.audit_format import is_record_start, parse_record

__all__ = ["Tail", "scan_tail"]

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
