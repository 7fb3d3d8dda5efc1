"""Prometheus-style durations ("30s", "1m30s") and sizes ("64MiB"), parsed strictly."""

from __future__ import annotations

import re

_DURATION = re.compile(
    r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$"
)
_DURATION_UNITS = (365 * 86400.0, 7 * 86400.0, 86400.0, 3600.0, 60.0, 1.0, 0.001)

#: Sizes as Prometheus reads them (``units.ParseBase2Bytes``): every multiple is a power of
#: 1024, whether it is written ``KB`` or ``KiB``.
_SIZE = re.compile(r"^(\d+)\s*(?:([KMGTPE])i?B|(B))?$")
_SIZE_POWERS = {"K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}

#: The largest duration a key accepts: a year. Beyond it a typo, not an intent (and a
#: timer that far out is no timer at all).
MAX_DURATION = 365 * 86400.0

_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*/\s*(s|m|h)$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Return seconds for a Prometheus duration such as ``30s`` or ``1m30s``.

    Raises ValueError with a human message on anything else (including bare numbers,
    which Prometheus itself refuses).
    """
    if not isinstance(text, str) or text == "":
        raise ValueError("expected a duration such as 30s, 5m or 1h30m")
    match = _DURATION.match(text)
    if match is None or not any(match.groups()):
        raise ValueError(f"not a duration: {text!r} (expected e.g. 30s, 5m, 1h30m)")
    seconds = sum(
        int(g) * unit for g, unit in zip(match.groups(), _DURATION_UNITS, strict=False) if g
    )
    if seconds > MAX_DURATION:
        raise ValueError(f"{text} is longer than the limit of 1y")
    return seconds


def parse_size(value: object, limit: int | None = None) -> int:
    """Return bytes for a size such as ``64MiB``, ``512KB`` or a plain integer.

    As in Prometheus, ``KB``, ``MB``, ``GB``... are powers of 1024 like ``KiB``, ``MiB``,
    ``GiB``. A size above ``limit`` is refused with the limit in the message.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return _within(value, str(value), limit)
    if not isinstance(value, str):
        raise ValueError("expected a size such as 64MiB")
    match = _SIZE.match(value.strip())
    if match is None:
        raise ValueError(f"not a size: {value!r} (expected e.g. 512KiB, 64MiB, 1GB)")
    power = _SIZE_POWERS[match.group(2)] if match.group(2) else 0
    return _within(int(match.group(1)) * 1024**power, value.strip(), limit)


def format_size(size: int) -> str:
    """``size`` bytes in the largest unit that divides it (``4GiB``, ``1536KiB``, ``7B``)."""
    for unit, power in reversed(_SIZE_POWERS.items()):
        if size and size % 1024**power == 0:
            return f"{size // 1024**power}{unit}iB"
    return f"{size}B"


def _within(size: int, text: str, limit: int | None) -> int:
    if limit is not None and size > limit:
        raise ValueError(f"{text} is larger than the limit of {format_size(limit)}")
    return size


def parse_rate(value: object) -> float:
    """Return tokens per second for ``"10/s"``, ``"30/m"``, ``"100/h"`` or a number."""
    if isinstance(value, bool):
        raise ValueError("expected a rate such as 1/s or 30/m")
    if isinstance(value, (int, float)):
        rate = float(value)
    elif isinstance(value, str):
        match = _RATE.match(value.strip())
        if match is None:
            raise ValueError(f"not a rate: {value!r} (expected e.g. 1/s, 30/m, 100/h)")
        rate = float(match.group(1)) / _RATE_UNITS[match.group(2)]
    else:
        raise ValueError("expected a rate such as 1/s or 30/m")
    if not 0 < rate < float("inf"):  # also refuses NaN (YAML .nan)
        raise ValueError("a rate must be positive and finite")
    return rate
