"""The audit record's byte format and MAC, shared by the writer and the verifier.

A record is one line of compact JSON ending with ``\\n``; its MAC is
``HMAC-SHA256(key, prev_mac_hex + "\\n" + canonical)`` where ``canonical`` is the record
without ``mac`` with sorted keys. Also here: the notes a ``start`` record's ``detail`` uses to
account for lines in the file that are not records, which the verifier accepts as
explanations (they are inside a MAC, so only the key holder can write them), and the
fingerprint of a MAC that the witness metrics publish.
"""

from __future__ import annotations

import hmac
import json
import math
import operator
import re
from datetime import datetime, timezone
from json.encoder import encode_basestring_ascii
from typing import Any

#: The previous MAC of the first record in a chain.
GENESIS_MAC = "0" * 64
#: Appended to a string value cut at ``max_field_length`` characters.
TRUNCATION_MARK = "...[truncated]"
#: How every record line starts; an incomplete line that starts so (or is a prefix of it) is
#: a record the writer did not finish.
RECORD_PREFIX = b'{"seq":'

_finite = math.isfinite


# Pre-built encoders: json.dumps() with non-default arguments builds a new encoder per call.
LINE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)

#: The note with which earlier versions explained the one line they left when a run ended
#: in the middle of a record (they closed the partial line with a newline at the next start).
TERMINATED_NOTE = "previous run ended mid-record; the incomplete line was terminated"
_NOT_RECORDS = re.compile(r"lines after seq (\d+) that are not audit records: (\d+); left in place")


class RecordEncoder:
    """Encodes records of events with the attributes ``fields``, each value JSON-encoded once.

    ``encode`` returns the same bytes as ``LINE.encode`` of the record (with its newline) and
    the MAC over ``CANONICAL.encode`` of it without ``mac``: string values longer than
    ``limit`` characters are cut and marked, floats rounded to 6 places, None fields left out.
    """

    def __init__(self, fields: tuple[str, ...], limit: int) -> None:
        self._get = operator.attrgetter("event", *fields)
        names = ("event", *fields)
        self._prefixes = tuple(json.dumps(name) + ":" for name in names)
        head = ("seq", "time")
        # Where each field goes in the canonical (sorted) form, seq and time included.
        order = sorted(range(len(head) + len(names)), key=lambda i: (*head, *names)[i])
        self._order = tuple(order)
        self._limit = limit

    def encode(
        self, key: bytes, prev_mac: bytes, seq: int, time: str, event: Any
    ) -> tuple[bytes, str]:
        limit = self._limit
        parts: list[str | None] = ['"seq":' + int.__repr__(seq), '"time":"' + time + '"']
        append = parts.append
        for prefix, value in zip(self._prefixes, self._get(event), strict=True):
            if value is None:
                append(None)
            elif isinstance(value, str):
                if len(value) > limit:
                    value = value[:limit] + TRUNCATION_MARK
                append(prefix + encode_basestring_ascii(value))
            elif type(value) is int:
                append(prefix + int.__repr__(value))
            elif type(value) is float and _finite(value):
                append(prefix + float.__repr__(round(value, 6)))  # as json writes a float
            else:
                append(prefix + LINE.encode(round(value, 6) if isinstance(value, float) else value))
        canonical = ",".join([part for i in self._order if (part := parts[i]) is not None])
        record_mac = mac(key, prev_mac, ("{" + canonical + "}").encode("ascii"))
        body = ",".join([part for part in parts if part is not None])
        return ("{" + body + ',"mac":"' + record_mac + '"}\n').encode("ascii"), record_mac


def mac(key: bytes, prev_mac: bytes, canonical: bytes) -> str:
    """The record's MAC in lowercase hex, chained to ``prev_mac`` (hex, as ASCII bytes)."""
    return hmac.digest(key, prev_mac + b"\n" + canonical, "sha256").hex()


def head_fingerprint(mac_hex: str) -> int:
    """The first 48 bits of a MAC as an integer: exact in a float64, so a metric can carry it."""
    return int(mac_hex[:12], 16)


def parse_record(body: bytes) -> dict[str, Any] | None:
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
        or LINE.encode(record).encode("ascii") != body
        or type(record.get("seq")) is not int
        or type(record.get("mac")) is not str
        or not record["mac"].isascii()
    ):
        return None
    return record


def is_record_start(fragment: bytes) -> bool:
    """Whether an incomplete line is the beginning of a record as the writer writes them."""
    return fragment.startswith(RECORD_PREFIX) or RECORD_PREFIX.startswith(fragment)


def not_records_note(seq: int, lines: int) -> str:
    """The ``start`` note for ``lines`` lines after record ``seq`` that are not records."""
    return f"lines after seq {seq} that are not audit records: {lines}; left in place"


def explained_lines(detail: object, seq: int) -> tuple[int, str] | None:
    """How many non-record lines after record ``seq`` a ``start`` detail accounts for, and how.

    ``None`` when the detail accounts for none.
    """
    if not isinstance(detail, str):
        return None
    found = _NOT_RECORDS.search(detail)
    if found is not None and int(found.group(1)) == seq:
        return int(found.group(2)), found.group(0)
    if TERMINATED_NOTE in detail:
        return 1, TERMINATED_NOTE
    return None


class _RecordTime:
    """A record's ``time``: UTC, to the microsecond, as ``strftime("%Y-%m-%dT%H:%M:%S.%fZ")``
    writes it. The date and time to the second are formatted once per second (records
    come many a second); the microseconds are rounded as ``datetime.fromtimestamp`` does
    (half to even, carried into the second)."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = math.nan
        self._prefix = ""

    def __call__(self, seconds: float) -> str:
        fraction, whole = math.modf(seconds)
        micro = round(fraction * 1e6)
        if micro >= 1_000_000:
            micro -= 1_000_000
            whole += 1.0
        elif micro < 0:
            micro += 1_000_000
            whole -= 1.0
        if whole != self._second:
            when = datetime.fromtimestamp(whole, timezone.utc)
            self._prefix = when.strftime("%Y-%m-%dT%H:%M:%S.")
            self._second = whole
        return f"{self._prefix}{micro:06d}Z"


record_time = _RecordTime()
