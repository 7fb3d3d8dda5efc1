"""What ``check-config`` can find out about this host before a gateway starts on it.

Listener endpoints and the audit log path are checked against the machine: a port number
that does not fit, an interface that is not one of this host's addresses, a unix socket
folder that does not exist, an audit path that is a directory or cannot be written. These
are errors, because start-up would fail on them too. An address already in use is only a
warning: the gateway that holds it may be this very configuration's, checked before a
reload. Nothing here keeps a socket open or writes a file.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import attrs
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor

from promgate.addresses import host_port

__all__ = ["Finding", "audit_path_findings", "endpoint_findings"]


@attrs.frozen
class Finding:
    """One thing found: an error (start-up would fail) or a warning."""

    error: bool
    message: str


def endpoint_findings(description: str) -> list[Finding]:
    """Check a server endpoint description (already parsed as valid) against this host."""
    reactor = MemoryReactor()
    try:
        serverFromString(reactor, description).listen(Factory())
    except (ValueError, TypeError, KeyError, RuntimeError, OverflowError):
        return []  # the loader reports an endpoint it cannot parse
    if reactor.unixServers:
        return _unix_findings(os.fsdecode(reactor.unixServers[0][0]))
    if reactor.tcpServers:
        port, _, _, interface = reactor.tcpServers[0]
        v6 = description.startswith("tcp6:")
        return _tcp_findings(interface or ("::" if v6 else ""), port)
    return []


def _unix_findings(path: str) -> list[Finding]:
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return [Finding(True, f"{path}: folder {folder} does not exist")]
    return []


def _tcp_findings(interface: str, port: int) -> list[Finding]:
    if not 0 <= port <= 65535:
        return [Finding(True, f"port number {port} must be 0-65535")]
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    shown = host_port(interface or "0.0.0.0", port)
    error = _try_bind(family, interface, 0)
    if error is not None and error.errno == errno.EADDRNOTAVAIL:
        return [Finding(True, f"{shown}: {interface} is not an address of this host")]
    if error is not None:
        return [Finding(True, f"{shown}: {os.strerror(error.errno or 0).lower()}")]
    if port == 0:
        return []
    error = _try_bind(family, interface, port)
    if error is None:
        return []
    if error.errno == errno.EADDRINUSE:
        return [
            Finding(
                False,
                f"{shown}: address already in use (start-up will fail unless it is freed; "
                "ignore this if it is this gateway's own, before a reload)",
            )
        ]
    if error.errno == errno.EACCES:
        return [
            Finding(
                False,
                f"{shown}: binding needs privileges (start twistd as root with --uid/--gid)",
            )
        ]
    return [Finding(True, f"{shown}: {os.strerror(error.errno or 0).lower()}")]


def _try_bind(family: socket.AddressFamily, interface: str, port: int) -> OSError | None:
    """Bind a throwaway socket as Twisted's listener would (SO_REUSEADDR), then close it."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((interface, port))
    except OSError as e:  # also a host without IPv6, where the socket cannot be made
        return e
    return None


def audit_path_findings(path: Path) -> list[Finding]:
    """The audit log must be a file this process can append to, in a folder it can write."""
    if path.is_dir():
        return [Finding(True, f"{path} is a directory")]
    if path.exists():
        if not os.access(path, os.W_OK):
            return [Finding(True, f"{path} is not writable")]
        return []
    folder = path.parent
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        return [Finding(True, f"cannot create {path}: folder {folder} is not writable")]
    return []
