"""HTTP/1.1 on the wire, for tests that drive the gateway's protocols in memory: request
heads as Prometheus sends them, responses read back strictly from the bytes a client
received, a client protocol that collects them, and iosim transports with fixed addresses.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.test import iosim

from promgate.addresses import address_parts

__all__ = [
    "Collector",
    "WireResponse",
    "address",
    "parse_responses",
    "read_response",
    "request_head",
    "server_transport",
]


def request_head(
    target: bytes,
    *headers: bytes,
    method: bytes = b"GET",
    version: bytes = b"1.1",
    host: bytes = b"gate.example.org:9443",
) -> bytes:
    """A request head as Prometheus would send it (``Host`` first on HTTP/1.1)."""
    lines = [b"%s %s HTTP/%s" % (method, target, version)]
    if version == b"1.1":
        lines.append(b"Host: " + host)
    lines.extend(headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


@attrs.frozen
class WireResponse:
    """One HTTP response as the client received it: header names lower-cased, the body
    de-chunked, and the exact bytes it took on the wire."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes
    raw: bytes


class MalformedResponseError(ValueError):
    """What the client received is not an HTTP/1.1 response."""


def read_response(
    data: bytes, *, head_only: bool = False, closed: bool = False, join_repeated: bool = False
) -> tuple[WireResponse, int] | None:
    """The first complete response in ``data`` and how many bytes it took, or None while
    it is incomplete. ``head_only``: the answer to a HEAD (no body, whatever its length);
    ``closed``: the connection has ended, which ends a body delimited by the close.
    A repeated header is a :class:`MalformedResponseError`, unless ``join_repeated``
    (then its values are joined with ``", "``, as HTTP allows)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head, rest = data[:end], data[end + 4 :]
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split(b" ")[1])
    except (IndexError, ValueError):
        raise MalformedResponseError(f"not a status line: {lines[0]!r}") from None
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        key = name.lower()
        if key in headers:
            if not join_repeated:
                raise MalformedResponseError(f"repeated header: {line!r}")
            headers[key] += b", " + value.strip()
        else:
            headers[key] = value.strip()
    start = end + 4
    if head_only or status in (204, 304) or 100 <= status < 200:
        return WireResponse(status, headers, b"", data[:start]), start
    if b"content-length" in headers:
        n = int(headers[b"content-length"])
        if len(rest) < n:
            return None
        return WireResponse(status, headers, rest[:n], data[: start + n]), start + n
    if headers.get(b"transfer-encoding") == b"chunked":
        body, pos = b"", 0
        while True:
            eol = rest.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(rest[pos:eol].split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                trailer_end = rest.find(b"\r\n\r\n", pos - 2)
                if trailer_end < 0:
                    return None
                pos = trailer_end + 4
                break
            if len(rest) < pos + size + 2:
                return None
            body += rest[pos : pos + size]
            pos += size + 2
        return WireResponse(status, headers, body, data[: start + pos]), start + pos
    if not closed:
        return None
    return WireResponse(status, headers, rest, data), len(data)


def parse_responses(data: bytes) -> list[WireResponse]:
    """Every response in ``data``, which must end with a complete one (a body without
    length or chunking runs to the end)."""
    out = []
    while data:
        found = read_response(data, closed=True)
        if found is None:
            raise MalformedResponseError(f"incomplete response: {data[:200]!r}")
        response, used = found
        out.append(response)
        data = data[used:]
    return out


class Collector(Protocol):
    """A client protocol that keeps what it receives and how its connection ended."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.lost = reason


def address(text: str) -> IPv4Address | IPv6Address:
    """``"192.0.2.1:9443"`` or ``"[2001:db8::1]:9443"`` as a Twisted TCP address."""
    host, port = address_parts(text)
    if host.startswith("["):
        return IPv6Address("TCP", host.strip("[]"), int(port))
    return IPv4Address("TCP", host, int(port))


def server_transport(
    proto: Any, host: str = "192.0.2.1:9443", peer: str = "198.51.100.7:40000"
) -> iosim.FakeTransport:
    """The accepting side's iosim transport, with fixed (documentation) addresses."""
    return iosim.FakeTransport(proto, True, hostAddress=address(host), peerAddress=address(peer))
