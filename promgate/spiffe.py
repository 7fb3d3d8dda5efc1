"""SPIFFE IDs: the one place that says which ``spiffe://`` URIs the gateway accepts.

A SPIFFE ID (SPIFFE specification, "SPIFFE-ID") is ``spiffe://TRUST-DOMAIN/PATH``: the
scheme is ``spiffe`` in lower case; the trust domain is 1 to 255 lower-case letters, digits,
``.``, ``-`` and ``_`` (so no port, no user information); the path, if any, is one or more
``/``-separated segments of letters, digits, ``.``, ``-`` and ``_``, none of them empty,
``.`` or ``..``, with no trailing ``/``. Nothing else is allowed: no percent-encoding, no
query, no fragment, and the whole ID is at most 2048 bytes.

Client certificates whose URI SAN has the ``spiffe`` scheme but is not such an ID are
refused before any identity rule is tried, and a configured ``cert: {uri: ...}`` with the
``spiffe`` scheme must be a valid ID, or a valid pattern: one where some whole path
segments are ``*`` (one segment, whatever it is).
"""

from __future__ import annotations

import string

__all__ = ["is_spiffe", "spiffe_id_error", "spiffe_pattern_error"]

#: The longest SPIFFE ID the specification allows, in bytes.
MAX_ID_LENGTH = 2048
#: The longest trust domain name the specification allows.
MAX_TRUST_DOMAIN_LENGTH = 255

_TRUST_DOMAIN_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_SEGMENT_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")
_PREFIX = "spiffe://"


def is_spiffe(uri: str) -> bool:
    """Does ``uri`` claim to be a SPIFFE ID (its scheme is ``spiffe``, in any case)?"""
    return uri[:7].lower() == "spiffe:"


def spiffe_id_error(uri: str) -> str | None:
    """Why ``uri`` is not a valid SPIFFE ID, or None if it is one."""
    return _check(uri, wildcard=False)


def spiffe_pattern_error(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid SPIFFE ID pattern (an ID in which whole path segments
    may be ``*``), or None if it is one. The trust domain is never a wildcard."""
    return _check(pattern, wildcard=True)


def _check(uri: str, *, wildcard: bool) -> str | None:
    if not uri.startswith(_PREFIX):
        return "must start with spiffe:// (the scheme in lower case)"
    if len(uri.encode("utf-8")) > MAX_ID_LENGTH:
        return f"longer than {MAX_ID_LENGTH} bytes"
    rest = uri[len(_PREFIX) :]
    domain, slash, path = rest.partition("/")
    if not domain:
        return "the trust domain is empty"
    if len(domain) > MAX_TRUST_DOMAIN_LENGTH:
        return f"the trust domain is longer than {MAX_TRUST_DOMAIN_LENGTH} characters"
    bad = _first_outside(domain, _TRUST_DOMAIN_CHARS)
    if bad is not None:
        return (
            f"the trust domain contains {bad!r}: only lower-case letters, digits, "
            "'.', '-' and '_' are allowed (no port, no user information)"
        )
    if not slash:
        return None
    for segment in path.split("/"):
        if segment == "":
            return "the path has an empty segment (or a trailing '/')"
        if segment in (".", ".."):
            return f"the path has a {segment!r} segment"
        if wildcard and segment == "*":
            continue
        bad = _first_outside(segment, _SEGMENT_CHARS)
        if bad is not None:
            return (
                f"the path contains {bad!r}: only letters, digits, '.', '-' and '_' are "
                "allowed in a segment (no percent-encoding, query or fragment)"
            )
    return None


def _first_outside(text: str, allowed: frozenset[str]) -> str | None:
    for char in text:
        if char not in allowed:
            return char
    return None
