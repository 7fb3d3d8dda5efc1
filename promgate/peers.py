"""Peer addresses as the gateway groups them: by network, for counting and backoff."""

from __future__ import annotations

import ipaddress


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


__all__ = ["peer_prefix"]
