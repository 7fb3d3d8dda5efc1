"""Checking an audit chain: ``promgate audit verify``.

The files are read as one chain, oldest first; verification stops at the first record that
does not continue it. Lines that are not records are a failure, except a run of them that the
next record explains: a ``start`` record whose ``detail`` says how many such lines the
previous run left (see :func:`promgate.audit_format.explained_lines`), and which itself
continues the chain from the last good record. The chain check is the same across such a gap,
so it cannot hide a removed record; only the bytes of the lines themselves are tolerated.
A file that begins with a ``rotate`` record (:mod:`promgate.audit_rotate`) follows the file
that record names; when the series does not chain there, the failure says which file is
missing. With ``rotated_start``, the first file may begin with such a record whose
predecessors were removed: the chain is then checked from the MAC that record names.
Reading takes no lock: it works while a gateway writes the file. With worker processes,
:func:`verify_chains` checks each worker's chain (:mod:`promgate.audit_chains`) on its own.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import attrs

from promgate.audit_chains import Chain
from promgate.audit_format import CANONICAL, GENESIS_MAC, explained_lines, mac, parse_record
from promgate.audit_lock import close_reader
from promgate.audit_rotate import parse_rotation, rotated_series

__all__ = ["VerifyGap", "VerifyResult", "result_ending", "verify_chains", "verify_files"]


@attrs.frozen
class VerifyGap:
    """Lines that are not records, followed by a ``start`` record that explains them."""

    path: Path  # the file of the first such line
    first_line: int
    lines: int
    start_path: Path  # where the explaining start record is
    start_line: int
    start_seq: int
    explanation: str  # the part of its detail that explains the gap

    def describe(self) -> str:
        """One line for the operator: where the gap is and what explains it."""
        span = f"{self.first_line}" + (
            f"-{self.first_line + self.lines - 1}" if self.lines > 1 else ""
        )
        what = (
            "1 line that is not a record"
            if self.lines == 1
            else f"{self.lines} lines that are not records"
        )
        return (
            f"{self.path}:{span}: {what}, explained by the start record at "
            f"{self.start_path}:{self.start_line} (seq {self.start_seq}): {self.explanation}"
        )


@attrs.frozen
class VerifyResult:
    """The outcome of checking an audit chain, with where it first went wrong."""

    ok: bool
    count: int  # records verified good
    first_bad_seq: int | None  # the seq expected where the chain first breaks
    message: str  # what is wrong and where (file and line number)
    ended_cleanly: bool  # the last record is a "stop" event
    gaps: tuple[VerifyGap, ...] = ()  # explained runs of lines that are not records
    first_seq: int = 1  # where checking began: above 1 after a rotated start
    begins_after: str | None = None  # with a rotated start: the file before, as named

    @property
    def last_seq(self) -> int:
        """The seq of the last record verified good (first_seq - 1 if none)."""
        return self.first_seq + self.count - 1


@attrs.define
class _Pending:
    """Lines that are not records, not yet explained."""

    path: Path
    first_line: int
    what: str
    lines: int = 1


#: Called with each record verified good: its seq, MAC, file and line number.
OnRecord = Callable[[int, str, Path, int], None]


def verify_files(
    key: bytes,
    files: Sequence[Path],
    *,
    rotated_start: bool = False,
    on_record: OnRecord | None = None,
) -> VerifyResult:
    """Check one audit chain spread over ``files`` (oldest first), stopping at the first fault.

    ``rotated_start``: the first file may begin with a ``rotate`` record, whose previous
    files are not given. ``on_record`` sees every record that verifies.
    """
    prev = GENESIS_MAC.encode("ascii")
    count = 0  # the seq of the last record verified good
    first = 1
    begins_after: str | None = None
    last_event: object = None
    gaps: list[VerifyGap] = []
    pending: _Pending | None = None

    def bad(path: Path, lineno: int, what: str) -> VerifyResult:
        return VerifyResult(
            ok=False,
            count=count - first + 1,
            first_bad_seq=count + 1,
            message=f"{path}:{lineno}: {what} (seq {count + 1} expected; "
            f"{count - first + 1} records before it verified)",
            ended_cleanly=False,
            gaps=tuple(gaps),
            first_seq=first,
            begins_after=begins_after,
        )

    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            return bad(path, 0, f"cannot read: {e.strerror}")
        f = os.fdopen(fd, "rb", closefd=False)
        lineno = 0
        first_in_file = True
        try:
            for lineno, raw in enumerate(f, 1):
                record = parse_record(raw[:-1]) if raw[-1:] == b"\n" else None
                if record is None:
                    if pending is not None:
                        pending.lines += 1
                    elif raw[-1:] != b"\n":
                        pending = _Pending(path, lineno, "truncated: the last line is incomplete")
                    else:
                        pending = _Pending(path, lineno, "not a well-formed audit record")
                    continue
                seq = record["seq"]
                rotation = parse_rotation(record)
                if rotation is not None and count == 0 and rotated_start and pending is None:
                    # Anchor the chain where the rotate record says the previous file ended.
                    count, first = rotation.seq, rotation.seq + 1
                    prev = rotation.mac.encode("ascii")
                    begins_after = rotation.previous or "its name unknown"
                at_start, first_in_file = first_in_file, False
                explained = None
                if pending is not None:
                    explained = (
                        explained_lines(record.get("detail"), count)
                        if record.get("event") == "start"
                        else None
                    )
                    if explained is None or explained[0] != pending.lines:
                        return bad(pending.path, pending.first_line, pending.what)
                record_mac = record.pop("mac")
                c = CANONICAL.encode(record).encode("ascii")
                good = hmac.compare_digest(record_mac, mac(key, prev, c))
                if seq != count + 1:
                    what = "records missing" if seq > count + 1 else "out of order or repeated"
                    hint = ""
                    if rotation is not None and at_start:
                        good = hmac.compare_digest(record_mac, mac(key, rotation.mac.encode(), c))
                        hint = f"; this file begins with a rotate record: {rotation.describe()}" + (
                            "; give it first"
                            if count
                            else "; give it first, or use --rotated-start if it was removed"
                        )
                    edited = "" if good else " (or this record was edited)"
                    return bad(path, lineno, f"found seq {seq}: {what}{edited}{hint}")
                if not good:
                    what = "wrong key, or the record was edited" if count < first else "edited"
                    return bad(path, lineno, f"MAC mismatch: {what}")
                if rotation is not None and (rotation.seq, rotation.mac) != (
                    count,
                    prev.decode("ascii"),
                ):
                    return bad(path, lineno, "rotate record names another previous record")
                if pending is not None and explained is not None:  # an explained gap
                    gaps.append(
                        VerifyGap(
                            pending.path,
                            pending.first_line,
                            pending.lines,
                            path,
                            lineno,
                            seq,
                            explained[1],
                        )
                    )
                    pending = None
                prev = record_mac.encode("ascii")
                count += 1
                last_event = record.get("event")
                if on_record is not None:
                    on_record(seq, record_mac, path, lineno)
        except OSError as e:
            return bad(path, lineno, f"cannot read: {e.strerror}")
        finally:
            f.close()
            close_reader(fd)
    if pending is not None:
        return bad(pending.path, pending.first_line, pending.what)
    ended_cleanly = last_event == "stop"
    suffix = ""
    if gaps:
        suffix = f"; {len(gaps)} gap{'' if len(gaps) == 1 else 's'} explained by a start record"
    verified = count - first + 1
    if begins_after is not None:
        suffix += f"; begins at seq {first}, after a rotation from {begins_after} (not given)"
    return VerifyResult(
        ok=True,
        count=verified,
        first_bad_seq=None,
        message=f"{verified} records verified in {len(files)} file"
        + ("" if len(files) == 1 else "s")
        + ("" if ended_cleanly or not verified else "; no stop record at the end (still running?)")
        + suffix,
        ended_cleanly=ended_cleanly,
        gaps=tuple(gaps),
        first_seq=first,
        begins_after=begins_after,
    )


def result_ending(result: VerifyResult) -> str:
    """How a verified chain ends, as ``verify`` prints it after the record count."""
    ending = (
        "ends with a clean stop" if result.ended_cleanly else "no stop record yet (still running?)"
    )
    gaps = len(result.gaps)
    if gaps:
        ending += f"; {gaps} gap{'' if gaps == 1 else 's'} explained by a start record (above)"
    if result.begins_after is not None:
        ending += (
            f"; begins at seq {result.first_seq}, after a rotation from "
            f"{result.begins_after} (not given)"
        )
    return ending


def verify_chains(
    key: bytes,
    chains: Sequence[Chain],
    out: TextIO,
    err: TextIO,
    *,
    rotated_start: bool = False,
) -> int:
    """Check each chain with its rotated files; print one line per chain and a summary.

    Exit status: 1 if a required chain is missing or any chain fails, else 2 if a chain's
    files could not be told apart (give them explicitly), else 0.
    """
    failed: list[str] = []
    unusable = 0
    total = 0
    for chain in chains:
        name = f"{chain.label} ({chain.path})"
        files, notes, problems = rotated_series(chain.path)
        if not chain.path.exists():
            if chain.required:
                print(f"FAIL: {name}: missing: no such file", file=err)
                failed.append(chain.label)
            continue
        for note in notes:
            print(f"NOTE: {note}", file=out)
        if problems:
            for problem in problems:
                print(f"promgate audit verify: {name}: {problem}", file=err)
            unusable += 1
            continue
        if len(files) > 1:
            print(f"FILES: {chain.label}: {', '.join(str(f) for f in files)}", file=out)
        result = verify_files(key, files, rotated_start=rotated_start)
        for gap in result.gaps:
            print(f"GAP: {gap.describe()}", file=out)
        if not result.ok:
            print(f"FAIL: {name}: {result.message}", file=err)
            failed.append(chain.label)
            continue
        total += result.count
        print(f"OK: {name}: {result.count} record(s) verified; {result_ending(result)}", file=out)
    if failed:
        print(
            f"FAIL: {len(failed)} of {len(chains)} chain(s) missing or broken: {', '.join(failed)}",
            file=err,
        )
        return 1
    if unusable:
        print(
            "promgate audit verify: give the files of each such chain explicitly "
            "(--chain K, or FILEs)",
            file=err,
        )
        return 2
    print(f"OK: {len(chains)} chain(s) verified, {total} record(s) in all", file=out)
    return 0
