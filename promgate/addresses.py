"""Addresses as promgate writes and compares them: ``host:port``, ``[v6]:port``.

One home for splitting, checking and spelling addresses, used by configuration loading,
discovery, the listeners and the audit records alike.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

__all__ = [
    "HOSTNAME",
    "address_parts",
    "canonical_address",
    "host_port",
    "peer_address",
    "peer_prefix",
    "split_address",
]

#: A DNS name (letters, digits, ``-`` and ``_`` in labels of at most 63), optionally
#: ending in a dot.
HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_PORT = re.compile(r"[0-9]{1,5}")


def split_address(text: str) -> tuple[str, int] | None:
    """Split ``host:port`` (``[v6]:port`` for IPv6) or return None if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None
        return host[1:-1], int(port)
    if ":" in host:
        return None
    try:
        ipaddress.IPv4Address(host)
        return host, int(port)
    except ValueError:
        pass
    if not HOSTNAME.match(host) or host.replace(".", "").isdigit():
        return None
    return host, int(port)


def canonical_address(text: str, default_port: int | None = None) -> str | None:
    """``text`` as ``host:port`` in the one spelling targets are compared in, or None.

    Names are lower-cased without a trailing dot, IPv4 addresses are dotted quads, IPv6
    addresses compressed, in brackets. Without ``default_port`` the port is required.
    """
    if default_port is not None and (
        ":" not in text or (text.startswith("[") and text.endswith("]"))
    ):
        text = f"{text}:{default_port}"
    split = split_address(text) if "%" not in text else None  # no zone ids, no escapes
    if split is None:
        return None
    host, port = split
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.lower()
        return f"{name[:-1] if name.endswith('.') else name}:{port}"
    if address.version == 6:
        return f"[{address.compressed}]:{port}"
    return f"{address}:{port}"


def address_parts(text: str) -> tuple[str, str]:
    """``text`` split at its last colon, unchecked: the host as written (an IPv6 address
    keeps its brackets) and the port text; ``("", text)`` when there is no colon.

    For rebuilding an address from its parts (discovery's rewrite templates);
    ``split_address`` is the check.
    """
    host, _, port = text.rpartition(":")
    return host, port


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (once: ``[v6]`` stays as it is)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def peer_address(addr: Any) -> str:
    """A Twisted address (``IPv4Address``, ``IPv6Address``, ``UNIXAddress``) as text."""
    host = getattr(addr, "host", None)
    port = getattr(addr, "port", None)
    if host is None or port is None:
        name = getattr(addr, "name", None)
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return str(name or "unix")
    return host_port(host, port)


def ip_endpoint(addr: Any) -> tuple[str, int] | None:
    """(ip, port) of a Twisted address whose host is an IP address (for a PROXY header),
    None for anything else (a UNIX socket, a name)."""
    host = getattr(addr, "host", None)
    port = getattr(addr, "port", None)
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host, port


def peer_prefix(peer: str | None) -> str:
    """The network a peer address (``ip:port``, ``[v6]:port``) belongs to: ``a.b.c.0/24``
    for IPv4, the ``/64`` for IPv6, the text itself for anything else (a UNIX socket)."""
    if not peer:
        return ""
    host = peer
    if peer.startswith("["):
        host = peer[1:].partition("]")[0]
    elif peer.count(":") == 1:
        host = peer.partition(":")[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    bits = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))
