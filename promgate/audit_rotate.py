"""Rotation of the audit log while the gateway runs, and the ``rotate`` record that links files.

logrotate (or an operator) renames the audit file and sends ``SIGUSR1``; the gateway then
reopens its path and starts the new file with a ``rotate`` record. That record continues the
chain (next ``seq``, MAC chained to the previous record's), and its ``detail`` names what it
follows: the last ``seq`` and MAC of the previous file, and that file's name as it was when
the gateway let go of it::

    rotated; previous file ends at seq 1233 with mac 5f1c...e0; now named "/var/log/audit.jsonl.1"

The detail is inside the record's MAC, so only the key holder can write one. The verifier uses
it to say which file is missing when a series does not chain, and to begin checking at a
``rotate`` record when the files before it were removed (``--rotated-start``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import attrs

from promgate.audit_chains import is_chain_name
from promgate.audit_format import parse_record

__all__ = [
    "ROTATE",
    "Rotation",
    "current_name",
    "parse_rotation",
    "rotate_detail",
    "rotated_series",
]

#: The event of the first record of a file opened after a rotation.
ROTATE = "rotate"
#: Rotated files with these endings are compressed: verify reads only uncompressed files.
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".Z", ".zip")
#: How much of a sibling's first line is read to find its first record.
_FIRST_LINE = 1024 * 1024

_DETAIL = re.compile(
    r"previous file ends at seq (\d+) with mac ([0-9a-f]{64}); "
    r'(?:now named ("(?:[^"\\]|\\.)*")|its name is unknown)$'
)


@attrs.frozen
class Rotation:
    """What a ``rotate`` record says about the file before it."""

    seq: int  # the previous file's last record
    mac: str  # that record's MAC, hex
    previous: str | None  # the previous file's name when it was let go, if it had one

    def describe(self) -> str:
        """The previous file as an operator should look for it."""
        where = f"now named {self.previous}" if self.previous else "its name unknown"
        return f"the previous file ({where}) ends at seq {self.seq}"


def rotate_detail(previous: str | None, seq: int, mac: str, found: int = 0) -> str:
    """The ``detail`` of a ``rotate`` record; ``found``: bytes the new file already held."""
    held = f"; the file found there already held {found} bytes" if found else ""
    name = f"now named {json.dumps(previous)}" if previous else "its name is unknown"
    return f"rotated{held}; previous file ends at seq {seq} with mac {mac}; {name}"


def parse_rotation(record: dict[str, Any]) -> Rotation | None:
    """What a record says about the previous file, if it is a ``rotate`` record."""
    detail = record.get("detail")
    if record.get("event") != ROTATE or not isinstance(detail, str):
        return None
    found = _DETAIL.search(detail)
    if found is None:
        return None
    previous = json.loads(found.group(3)) if found.group(3) else None
    return Rotation(int(found.group(1)), found.group(2), previous)


def current_name(fd: int, path: Path) -> str | None:
    """Where the open file ``fd`` is now (after a rename), or None if it has no name.

    Asks ``/proc/self/fd`` where there is one; otherwise looks for the file's inode among
    the names in ``path``'s directory, where logrotate leaves it.
    """
    try:
        named = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        pass
    else:
        return None if named.endswith(" (deleted)") else named
    try:
        st = os.fstat(fd)
        with os.scandir(path.parent) as entries:
            for entry in entries:
                if entry.inode() == st.st_ino and entry.stat().st_dev == st.st_dev:
                    return str(path.parent / entry.name)
    except OSError:
        return None
    return None


def rotated_series(path: Path) -> tuple[list[Path], list[str], list[str]]:
    """``path`` and its rotated siblings, oldest first: (files, notes, problems).

    Siblings are the files in ``path``'s directory named ``NAME.*`` or ``NAME-*`` (logrotate's
    numbered and dated names), ordered by the seq of their first record; ``path`` comes last.
    Worker processes' chain files of ``path`` and their rotated files are not its siblings
    (:mod:`promgate.audit_chains`).
    Compressed and empty siblings are left out, with a note; a sibling whose first line is not
    an audit record is a problem (the caller should refuse to guess).
    """
    notes: list[str] = []
    problems: list[str] = []
    found: list[tuple[int, str, Path]] = []
    try:
        names = sorted(os.listdir(path.parent))
    except OSError as e:
        return [path], notes, [f"{path.parent}: {e.strerror}"]
    for name in names:
        candidate = path.parent / name
        if name == path.name or not name.startswith((path.name + ".", path.name + "-")):
            continue
        if is_chain_name(path, name):
            continue
        if not candidate.is_file():
            continue
        if name.endswith(COMPRESSED):
            notes.append(f"{candidate}: compressed, left out (decompress it to include it)")
            continue
        try:
            with candidate.open("rb") as f:
                line = f.readline(_FIRST_LINE)
        except OSError as e:
            problems.append(f"{candidate}: cannot read: {e.strerror}")
            continue
        if not line:
            notes.append(f"{candidate}: empty, left out")
            continue
        record = parse_record(line[:-1]) if line.endswith(b"\n") else None
        if record is None:
            problems.append(f"{candidate}: its first line is not an audit record")
            continue
        found.append((record["seq"], name, candidate))
    found.sort()
    return [c for _, _, c in found] + [path], notes, problems
