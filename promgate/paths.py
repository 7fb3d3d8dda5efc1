"""Strict normalisation of upstream paths: one canonical spelling, or a refusal.

``normalize_path`` is applied once to a path that policy is about to evaluate (the decoded
``path=`` of ``/scrape``; later the raw path of an absolute-form request to the forward
proxy, with its query already split off). What it returns is the exact string policy
compares with the route's paths *and* the exact string sent upstream, so no upstream can
read it as something policy did not see. Configured paths must already be in this form.

Refused (``PathRefused``): anything not starting with ``/``; ``.`` and ``..`` segments;
empty segments (``//``); ``\\``, ``;``, ``?``, ``#``, NUL and every other control
character, space and any character outside RFC 3986 ``pchar``; malformed ``%`` escapes; and
escapes that decode to something refused or interpreted: ``%2E`` (``.``), ``%2F`` (``/``),
``%5C`` (``\\``), ``%25`` (``%``, i.e. double encoding), ``%3B`` (``;``) and control
characters (``%00`` to ``%1F``, ``%7F``), in any letter case.

Canonical form: escapes of unreserved characters other than ``.`` (letters, digits, ``-``,
``_``, ``~``) are decoded; every other escape is kept with upper-case hex digits.
"""

from __future__ import annotations

import string

#: RFC 3986 unreserved characters, whose escapes are decoded (except ``.``: refused).
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
#: Characters allowed as themselves: pchar (unreserved, sub-delims, ``:``, ``@``) and
#: ``/``, minus ``;``; ``%`` only as the start of an escape.
_LITERAL = _UNRESERVED | frozenset("!$&'()*+,=:@/")
_HEX = frozenset(string.hexdigits)
#: Escapes refused outright, by the character they stand for.
_REFUSED_ESCAPES = {
    ".": "encoded '.' (%2E)",
    "/": "encoded '/' (%2F)",
    "\\": "encoded '\\' (%5C)",
    "%": "encoded '%' (%25, double encoding)",
    ";": "encoded ';' (%3B)",
}
#: Characters refused as themselves, with the reason given.
_REFUSED_LITERALS = {
    "\\": "backslash",
    ";": "';' (path parameters)",
    "?": "'?' (a query does not belong in a path)",
    "#": "'#' (a fragment does not belong in a path)",
}


class PathRefused(ValueError):  # noqa: N818 (a refusal, named as the issue names it)
    """A path that is not acceptable as an upstream path; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _is_control(char: str) -> bool:
    return char < " " or char == "\x7f" or "\x80" <= char <= "\x9f"


def normalize_path(raw: str) -> str:
    """Return the canonical form of ``raw`` or raise ``PathRefused``."""
    for char in raw:
        if char == "\x00":
            raise PathRefused("NUL character")
        if _is_control(char):
            raise PathRefused("control character")
    if not raw.startswith("/"):
        raise PathRefused("must start with '/'")
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        char = raw[i]
        if char == "%":
            hex_digits = raw[i + 1 : i + 3]
            if len(hex_digits) != 2 or not all(h in _HEX for h in hex_digits):
                raise PathRefused("malformed '%' escape")
            byte = int(hex_digits, 16)
            decoded = chr(byte)
            if decoded in _REFUSED_ESCAPES:
                raise PathRefused(_REFUSED_ESCAPES[decoded])
            if byte < 0x20 or byte == 0x7F:
                raise PathRefused("encoded NUL" if byte == 0 else "encoded control character")
            out.append(decoded if decoded in _UNRESERVED else "%" + hex_digits.upper())
            i += 3
            continue
        if char in _REFUSED_LITERALS:
            raise PathRefused(_REFUSED_LITERALS[char])
        if char not in _LITERAL:
            raise PathRefused("character not allowed in a path (percent-encode it)")
        out.append(char)
        i += 1
    path = "".join(out)
    segments = path.split("/")[1:]
    for k, segment in enumerate(segments):
        if segment in (".", ".."):
            raise PathRefused(f"'{segment}' segment")
        if segment == "" and k < len(segments) - 1:
            raise PathRefused("empty segment ('//')")
    return path


__all__ = ["PathRefused", "normalize_path"]
