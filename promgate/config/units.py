"""Prometheus-style durations ("30s", "1m30s") and sizes ("64MiB"), parsed strictly."""

from __future__ import annotations

import re

_DURATION = re.compile(
    r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$"
)
_DURATION_UNITS = (365 * 86400.0, 7 * 86400.0, 86400.0, 3600.0, 60.0, 1.0, 0.001)

_SIZE = re.compile(r"^(\d+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}

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
    return sum(int(g) * unit for g, unit in zip(match.groups(), _DURATION_UNITS, strict=False) if g)


def parse_size(value: object) -> int:
    """Return bytes for a size such as ``64MiB``, ``512KB`` or a plain integer."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("expected a size such as 64MiB")
    match = _SIZE.match(value.strip())
    if match is None:
        raise ValueError(f"not a size: {value!r} (expected e.g. 512KiB, 64MiB, 1GB)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


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
