"""The request targets of a forward proxy: absolute-form ``http://HOST:PORT/PATH`` and
CONNECT's authority-form ``HOST:PORT``, split strictly (RFC 9112, section 3.2)."""

from __future__ import annotations

import attrs

from promgate.addresses import canonical_address
from promgate.http.wire import HTTPError
from promgate.policy import BAD_REQUEST


@attrs.frozen
class AbsoluteForm:
    """An absolute-form request target, split but not yet judged."""

    #: The target, canonical (see ``canonical_address``); port 80 when none was given.
    address: str
    #: The path as sent (not yet normalised); ``/`` when the URL had none.
    path: str
    #: The query string, without its ``?``.
    query: bytes


def _bad(message: str) -> HTTPError:
    return HTTPError(400, BAD_REQUEST, message)


def parse_absolute_form(target: bytes) -> AbsoluteForm:
    """Split ``http://HOST[:PORT]/PATH?QUERY`` strictly, or raise HTTPError (400).

    Refused: any other scheme (``https://`` targets are reached with CONNECT), user
    information, a fragment, a malformed or percent-encoded host, non-ASCII bytes.
    """
    scheme, sep, rest = target.partition(b"://")
    if not sep:
        raise _bad("not an absolute URL")
    scheme = scheme.lower()
    if scheme == b"https":
        raise _bad("https targets are reached with CONNECT, not an absolute URL")
    if scheme != b"http":
        raise _bad("only http:// URLs are forwarded")
    if b"#" in rest:
        raise _bad("a fragment does not belong in a request")
    end = len(rest)
    for delimiter in (b"/", b"?"):
        found = rest.find(delimiter)
        if 0 <= found < end:
            end = found
    authority, rest = rest[:end], rest[end:]
    if b"@" in authority:
        raise _bad("user information in the URL is not accepted")
    path, _, query = rest.partition(b"?")
    try:
        authority_text = authority.decode("ascii")
        path_text = path.decode("ascii") if path else "/"
    except UnicodeDecodeError:
        raise _bad("non-ASCII bytes in the URL") from None
    address = canonical_address(authority_text, default_port=80)
    if address is None:
        raise _bad("malformed host or port in the URL")
    return AbsoluteForm(address, path_text, query)


def parse_authority_form(target: bytes) -> str:
    """The canonical address of a CONNECT request's ``HOST:PORT``, or HTTPError (400)."""
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise _bad("non-ASCII bytes in the CONNECT target") from None
    address = canonical_address(text)
    if address is None:
        raise _bad("CONNECT needs HOST:PORT")
    return address


__all__ = ["AbsoluteForm", "parse_absolute_form", "parse_authority_form"]
