"""PROXY protocol version 2 headers, as a ``tcp`` listener sends them to its upstream.

The header (HAProxy's ``proxy-protocol.txt``, section 2.2) tells the upstream who the client
really is: its address and port and the address it connected to, then TLVs. promgate sends:

- ``PP2_TYPE_AUTHORITY`` (0x02): the server name (SNI) the client asked for, when it sent one.
- ``PP2_TYPE_SSL`` (0x20), when promgate terminated TLS: ``client`` has ``PP2_CLIENT_SSL``
  and ``PP2_CLIENT_CERT_CONN`` set, ``verify`` is 0 (the certificate was verified: promgate
  never completes a handshake with an unverified one), followed by the sub-TLVs
  ``PP2_SUBTYPE_SSL_VERSION`` (0x21, e.g. ``TLSv1.3``), ``PP2_SUBTYPE_SSL_CN`` (0x22, the
  certificate's first Common Name, if any) and ``PP2_SUBTYPE_SSL_CIPHER`` (0x23).
- ``PP2_TYPE_PROMGATE_IDENTITY`` (0xE0, in the range the specification reserves for
  custom use): the name of the promgate identity the client certificate was recognised as,
  UTF-8. Present only when TLS was terminated and the caller was recognised.

:func:`encode_v2` builds the header; :func:`decode_v2` parses one back, for upstreams
written in Python and for tests.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from typing import Final

import attrs

__all__ = [
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "PP2_CLIENT_SSL",
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_PROMGATE_IDENTITY",
    "PP2_TYPE_SSL",
    "SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderError",
    "decode_ssl_tlv",
    "decode_v2",
    "encode_v2",
    "ssl_tlv",
    "tlv",
]

SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"

_VERSION_PROXY: Final = 0x21  # version 2, command PROXY
_VERSION_LOCAL: Final = 0x20  # version 2, command LOCAL
_UNSPEC: Final = 0x00
_TCP4: Final = 0x11
_TCP6: Final = 0x21

PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_SSL: Final = 0x20
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CN: Final = 0x22
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
#: promgate's own TLV: the identity the verified client certificate was recognised as.
PP2_TYPE_PROMGATE_IDENTITY: Final = 0xE0

PP2_CLIENT_SSL: Final = 0x01
PP2_CLIENT_CERT_CONN: Final = 0x02
PP2_CLIENT_CERT_SESS: Final = 0x04

_MAX_PAYLOAD: Final = 0xFFFF


class ProxyHeaderError(ValueError):
    """A PROXY v2 header that cannot be built or parsed."""


def tlv(kind: int, value: bytes) -> bytes:
    """One type-length-value entry."""
    if not 0 <= kind <= 0xFF:
        raise ProxyHeaderError(f"TLV type {kind} out of range")
    if len(value) > _MAX_PAYLOAD:
        raise ProxyHeaderError(f"TLV value of {len(value)} bytes is too long")
    return struct.pack("!BH", kind, len(value)) + value


def ssl_tlv(
    *, version: str | None, cipher: str | None, cn: str | None, verified: bool = True
) -> bytes:
    """``PP2_TYPE_SSL`` for a TLS connection with a client certificate.

    ``verify`` is 0 when the certificate was verified and 1 otherwise (the specification
    only gives meaning to zero).
    """
    client = PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN
    subs = b""
    if version:
        subs += tlv(PP2_SUBTYPE_SSL_VERSION, version.encode("ascii", "replace"))
    if cn:
        subs += tlv(PP2_SUBTYPE_SSL_CN, cn.encode("utf-8"))
    if cipher:
        subs += tlv(PP2_SUBTYPE_SSL_CIPHER, cipher.encode("ascii", "replace"))
    return tlv(PP2_TYPE_SSL, struct.pack("!BI", client, 0 if verified else 1) + subs)


def encode_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    tlvs: Iterable[bytes] = (),
) -> bytes:
    """A PROXY v2 header for a TCP connection from ``source`` to ``destination``.

    Both IPv4 gives ``TCP over IPv4``; both IPv6 ``TCP over IPv6``; one of each maps the
    IPv4 one into IPv6 (``::ffff:a.b.c.d``). Without addresses (a UNIX socket listener) the
    family is ``UNSPEC``, and the upstream should use the connection's own endpoints.
    ``tlvs`` are complete entries, as :func:`tlv` builds them.
    """
    extra = b"".join(tlvs)
    if source is None or destination is None:
        family, addresses = _UNSPEC, b""
    else:
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
        if isinstance(src, ipaddress.IPv4Address) and isinstance(dst, ipaddress.IPv4Address):
            family = _TCP4
        else:
            family = _TCP6
            src, dst = _as_v6(src), _as_v6(dst)
        addresses = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    payload = addresses + extra
    if len(payload) > _MAX_PAYLOAD:
        raise ProxyHeaderError(f"header payload of {len(payload)} bytes is too long")
    return SIGNATURE + struct.pack("!BBH", _VERSION_PROXY, family, len(payload)) + payload


def _as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)


@attrs.frozen
class ProxyHeader:
    """A parsed PROXY v2 header."""

    command: str  # "PROXY" or "LOCAL"
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: Sequence[tuple[int, bytes]]
    size: int  # bytes the header took

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of type ``kind``, if there is one."""
        for k, v in self.tlvs:
            if k == kind:
                return v
        return None


def decode_v2(data: bytes) -> ProxyHeader | None:
    """Parse the PROXY v2 header at the start of ``data``; None if it is not all there yet."""
    if len(data) < 16:
        if not SIGNATURE.startswith(data[:12]):
            raise ProxyHeaderError("no PROXY v2 signature")
        return None
    if data[:12] != SIGNATURE:
        raise ProxyHeaderError("no PROXY v2 signature")
    version, family, length = struct.unpack("!BBH", data[12:16])
    if version not in (_VERSION_PROXY, _VERSION_LOCAL):
        raise ProxyHeaderError(f"version/command byte 0x{version:02x}")
    if len(data) < 16 + length:
        return None
    payload = data[16 : 16 + length]
    source = destination = None
    if family == _TCP4:
        if length < 12:
            raise ProxyHeaderError("IPv4 address block too short")
        a, b, sp, dp = struct.unpack("!4s4sHH", payload[:12])
        source = (str(ipaddress.IPv4Address(a)), sp)
        destination = (str(ipaddress.IPv4Address(b)), dp)
        rest = payload[12:]
    elif family == _TCP6:
        if length < 36:
            raise ProxyHeaderError("IPv6 address block too short")
        a, b, sp, dp = struct.unpack("!16s16sHH", payload[:36])
        source = (str(ipaddress.IPv6Address(a)), sp)
        destination = (str(ipaddress.IPv6Address(b)), dp)
        rest = payload[36:]
    elif family == _UNSPEC:
        rest = payload
    else:
        raise ProxyHeaderError(f"unsupported family/protocol byte 0x{family:02x}")
    return ProxyHeader(
        "PROXY" if version == _VERSION_PROXY else "LOCAL",
        source,
        destination,
        tuple(_tlvs(rest)),
        16 + length,
    )


def _tlvs(data: bytes) -> Iterable[tuple[int, bytes]]:
    pos = 0
    while pos < len(data):
        if len(data) - pos < 3:
            raise ProxyHeaderError("truncated TLV")
        kind, length = struct.unpack("!BH", data[pos : pos + 3])
        if pos + 3 + length > len(data):
            raise ProxyHeaderError("TLV runs past the header")
        yield kind, data[pos + 3 : pos + 3 + length]
        pos += 3 + length


def decode_ssl_tlv(value: bytes) -> tuple[int, int, list[tuple[int, bytes]]]:
    """Split a ``PP2_TYPE_SSL`` value into (client flags, verify, sub-TLVs)."""
    if len(value) < 5:
        raise ProxyHeaderError("PP2_TYPE_SSL value too short")
    client, verify = struct.unpack("!BI", value[:5])
    return client, verify, list(_tlvs(value[5:]))
