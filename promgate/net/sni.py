"""Read the server name (SNI) from a TLS ClientHello without terminating TLS.

``read_client_hello`` is a pure function over the first bytes a client sent: it answers with
the ClientHello it found (and its server name, if any), with ``NEED_MORE`` when the bytes so
far are a correct but incomplete beginning, or raises :class:`ClientHelloError`, whose
``reason`` is a short, bounded name fit for an audit record or a metric label. It never raises
anything else, whatever the input (the property tests in ``tests/test_sni.py`` hold it to
that).

Only what routing needs is checked, but that strictly: record framing (handshake records, the
ClientHello possibly split over several of them), the ClientHello's own structure down to its
extensions, and the ``server_name`` extension (RFC 6066: exactly one ``host_name``, ASCII).
What is buffered is capped (:data:`MAX_CLIENT_HELLO`); the caller also applies a deadline.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

__all__ = [
    "MAX_CLIENT_HELLO",
    "NEED_MORE",
    "ClientHello",
    "ClientHelloError",
    "NeedMore",
    "normalise_server_name",
    "read_client_hello",
]

#: The most bytes read while looking for a complete ClientHello (records included). Real
#: ClientHellos are a few hundred bytes, about 1.8 KiB with post-quantum key shares.
MAX_CLIENT_HELLO: Final = 16 * 1024

_HANDSHAKE: Final = 22
_CLIENT_HELLO: Final = 1
_SERVER_NAME: Final = 0
_HOST_NAME: Final = 0
_MAX_RECORD: Final = 2**14
_RECORD_HEADER: Final = 5
#: A DNS name as SNI carries it: ASCII letters, digits, '-', '_' and dots, 1 to 253 octets
#: (A-labels for internationalised names), no empty labels.
_HOST: Final = re.compile(rb"(?=.{1,253}\Z)[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*\.?")
_HTTP_METHODS: Final = (b"GET ", b"HEAD", b"POST", b"PUT ", b"DELE", b"OPTI", b"CONN", b"PATC")


class ClientHelloError(Exception):
    """The bytes are not the beginning of a TLS ClientHello the gateway can route.

    ``reason`` is one of ``not_tls``, ``plain_http``, ``sslv2``, ``malformed_client_hello``,
    ``client_hello_too_large``, ``client_hello_truncated`` and ``bad_server_name``;
    ``detail`` says what exactly was wrong.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class NeedMore:
    """The bytes so far are a correct but incomplete beginning: read more."""

    _instance: NeedMore | None = None

    def __new__(cls) -> NeedMore:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = NeedMore()


@attrs.frozen
class ClientHello:
    """What routing needs from a complete ClientHello."""

    #: The ``host_name`` from the server_name extension, lower-cased, without a trailing
    #: dot; None when the client sent no server name.
    server_name: str | None
    #: How many bytes (whole records) the ClientHello took on the wire.
    size: int


def normalise_server_name(name: str) -> str:
    """The form server names are compared in: lower case, no trailing dot."""
    return name.lower().rstrip(".")


def read_client_hello(
    data: bytes, *, complete: bool = False, limit: int = MAX_CLIENT_HELLO
) -> ClientHello | NeedMore:
    """Find the ClientHello at the start of ``data``.

    ``complete`` says no more bytes will come (the client closed): an incomplete ClientHello
    is then refused as ``client_hello_truncated`` instead of answered with ``NEED_MORE``.
    """
    handshake = b""
    pos = 0
    end = len(data)
    while True:
        if end - pos < _RECORD_HEADER:
            _check_partial_header(data, pos)
            return _incomplete(complete, end, limit, "in a record header")
        ctype = data[pos]
        if ctype != _HANDSHAKE:
            if pos == 0:
                _not_tls(data)
            raise ClientHelloError(
                "malformed_client_hello",
                f"record of type {ctype} before the ClientHello was complete",
            )
        _check_record_version(data[pos + 1], data[pos + 2])
        length = (data[pos + 3] << 8) | data[pos + 4]
        if length == 0 or length > _MAX_RECORD:
            raise ClientHelloError("malformed_client_hello", f"handshake record of {length} bytes")
        if pos + _RECORD_HEADER + length > limit:
            raise ClientHelloError(
                "client_hello_too_large", f"ClientHello records exceed {limit} bytes"
            )
        if end < pos + _RECORD_HEADER + length:
            fragment = data[pos + _RECORD_HEADER : end]
            _check_message_start(handshake + fragment, limit)
            return _incomplete(complete, end, limit, "in a record")
        handshake += data[pos + _RECORD_HEADER : pos + _RECORD_HEADER + length]
        pos += _RECORD_HEADER + length
        size = _check_message_start(handshake, limit)
        if size is not None and len(handshake) >= 4 + size:
            server_name = _parse_client_hello(handshake[4 : 4 + size])
            return ClientHello(server_name, pos)


def _incomplete(complete: bool, have: int, limit: int, where: str) -> NeedMore:
    if complete:
        raise ClientHelloError(
            "client_hello_truncated", f"the client closed after {have} bytes, {where}"
        )
    if have >= limit:  # unreachable with a sane limit, but never buffer past it
        raise ClientHelloError("client_hello_too_large", f"no ClientHello in {limit} bytes")
    return NEED_MORE


def _check_partial_header(data: bytes, pos: int) -> None:
    """Refuse a record header as soon as its first bytes are wrong."""
    have = len(data) - pos
    if have >= 1 and data[pos] != _HANDSHAKE:
        if pos == 0:
            _not_tls(data)
        raise ClientHelloError(
            "malformed_client_hello",
            f"record of type {data[pos]} before the ClientHello was complete",
        )
    if have >= 2 and data[pos + 1] != 3:
        _check_record_version(data[pos + 1], 0)
    if have >= 3:
        _check_record_version(data[pos + 1], data[pos + 2])


def _check_record_version(major: int, minor: int) -> None:
    if major != 3 or minor > 4:
        raise ClientHelloError(
            "malformed_client_hello", f"record version {major}.{minor} is not TLS"
        )


def _check_message_start(handshake: bytes, limit: int) -> int | None:
    """Check the handshake message header once it is there; the body's size, or None."""
    if not handshake:
        return None
    if handshake[0] != _CLIENT_HELLO:
        raise ClientHelloError(
            "malformed_client_hello", f"first handshake message has type {handshake[0]}"
        )
    if len(handshake) < 4:
        return None
    size = int.from_bytes(handshake[1:4], "big")
    if size + 4 > limit:
        raise ClientHelloError(
            "client_hello_too_large", f"a ClientHello of {size} bytes exceeds {limit} bytes"
        )
    return size


def _not_tls(data: bytes) -> None:
    first = data[0]
    if data[:4] in _HTTP_METHODS or any(m.startswith(data[:4]) for m in _HTTP_METHODS):
        raise ClientHelloError("plain_http", "the client spoke plain HTTP, not TLS")
    if first & 0x80 and len(data) >= 3 and data[2] == 1:
        raise ClientHelloError("sslv2", "an SSL 2.0 ClientHello")
    raise ClientHelloError("not_tls", f"first byte 0x{first:02x} does not start a TLS record")


class _Reader:
    """Reads the fields of one complete message; running out is a malformed message."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.remaining:
            raise ClientHelloError("malformed_client_hello", f"{what} runs past its end")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, length_bytes: int, what: str) -> bytes:
        return self.take(self.uint(length_bytes, f"{what} length"), what)


def _parse_client_hello(body: bytes) -> str | None:
    r = _Reader(body)
    version = r.uint(2, "legacy_version")
    if version >> 8 != 3:
        raise ClientHelloError(
            "malformed_client_hello", f"ClientHello version 0x{version:04x} is not TLS"
        )
    r.take(32, "random")
    if len(r.vector(1, "session_id")) > 32:
        raise ClientHelloError("malformed_client_hello", "session_id longer than 32 bytes")
    suites = r.vector(2, "cipher_suites")
    if not suites or len(suites) % 2:
        raise ClientHelloError("malformed_client_hello", "empty or odd-length cipher_suites")
    if not r.vector(1, "compression_methods"):
        raise ClientHelloError("malformed_client_hello", "no compression_methods")
    if r.remaining == 0:
        return None  # no extensions at all (TLS 1.2 and earlier allow it)
    extensions = _Reader(r.vector(2, "extensions"))
    if r.remaining:
        raise ClientHelloError("malformed_client_hello", "bytes after the extensions")
    seen: set[int] = set()
    server_name = None
    while extensions.remaining:
        kind = extensions.uint(2, "extension type")
        value = extensions.vector(2, "extension")
        if kind in seen:
            raise ClientHelloError("malformed_client_hello", f"extension {kind} given twice")
        seen.add(kind)
        if kind == _SERVER_NAME:
            server_name = _parse_server_name(value)
    return server_name


def _parse_server_name(value: bytes) -> str:
    outer = _Reader(value)
    names = _Reader(outer.vector(2, "server_name_list"))
    if outer.remaining or not names.remaining:
        raise ClientHelloError("malformed_client_hello", "malformed server_name extension")
    kind = names.uint(1, "name_type")
    host = names.vector(2, "host_name")
    if kind != _HOST_NAME or names.remaining:
        raise ClientHelloError(
            "malformed_client_hello", "server_name must hold exactly one host_name"
        )
    if not _HOST.fullmatch(host):
        raise ClientHelloError("bad_server_name", f"server name {host[:64]!r} is not a DNS name")
    return normalise_server_name(host.decode("ascii"))
