"""Listeners as Twisted services, bound before anything else starts.

Each listener is a :class:`StreamServerEndpointService` that binds in
``privilegedStartService`` (before ``twistd --uid`` drops privileges, and before the audit
log is opened), so a port in use or an address that is not local stops start-up with one
line that names the listener and the address, and leaves nothing behind.

A ``systemd:`` endpoint adopts a listening socket systemd passed on (socket activation): it
must have been passed, under that index or name, and be a listening stream socket of the
family the endpoint names, or start-up stops with one line saying which of these it is not.
A ``haproxy:`` endpoint wraps the listener's factory so that each connection starts only
once its PROXY protocol header has named the original client (:mod:`promgate.net.proxied`).
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.python.systemd import ListenFDs
from zope.interface import implementer

from promgate.addresses import host_port, peer_address
from promgate.endpoints import EndpointDescription, SystemdSocket, parse_endpoint
from promgate.errors import StartupError, os_error_text
from promgate.net.proxied import ProxiedFactory
from promgate.reactors import IListenReactor

__all__ = [
    "InheritedSocketEndpoint",
    "InheritedSocketError",
    "ListenerService",
    "bind_failure",
    "inherited_sockets",
    "where",
]


class ListenerService(StreamServerEndpointService):
    """One named listener on one endpoint description (``tcp:9443:interface=...``)."""

    _raiseSynchronously = True

    def __init__(
        self,
        name: str,
        description: str,
        factory: IProtocolFactory,
        reactor: IListenReactor,
        *,
        clock: IReactorTime | None = None,
        passed: ListenFDs | None = None,
        descriptor: int | None = None,
    ) -> None:
        """``clock`` times the PROXY header of a ``haproxy:`` endpoint; ``passed`` is what
        systemd passed (by default, what the environment said when Twisted started);
        ``descriptor`` is a listening socket already bound for ``description`` (by a
        worker's supervisor), listened on instead of binding (and closed once adopted)."""
        parsed = parse_endpoint(description)
        endpoint: IStreamServerEndpoint
        if descriptor is not None:
            endpoint = AdoptedStreamServerEndpoint(reactor, descriptor, _family(descriptor))
        elif parsed.systemd is not None:
            endpoint = InheritedSocketEndpoint(reactor, parsed.systemd, passed)
        else:
            endpoint = serverFromString(reactor, parsed.inner)
        wrapped: Any = factory
        if parsed.proxied:
            if clock is None:
                raise ValueError("a haproxy: endpoint needs a clock for its header deadline")
            wrapped = ProxiedFactory(factory, clock, name=name)
        super().__init__(endpoint, wrapped)  # type: ignore[no-untyped-call]
        self.adopted = descriptor is not None
        self.parsed: EndpointDescription = parsed
        self.listener_name = name
        self.description = description
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        """Bind now; a failure is a StartupError naming the listener and the address."""
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except Exception as e:
            raise StartupError(bind_failure(self.listener_name, self.description, e)) from e
        assert self._waitingForPort is not None
        self._waitingForPort.addCallback(self._bound)
        if self.port is None:
            raise StartupError(
                f"listener {self.listener_name}: {self.description}: did not bind at once"
            )

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None]:
        """Stop listening; connections already accepted stay open."""
        d: Deferred[None] = super().stopService()  # type: ignore[no-untyped-call]
        return d

    def _bound(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        if self.adopted and isinstance(getattr(port, "_bindPath", None), bytes):
            # A unix socket handed over by a worker's supervisor, shared with the other
            # workers: closing this copy must neither shut the socket down (Twisted does
            # not for an adopted TCP socket, but does for a unix one) nor unlink its path.
            port._shouldShutdown = False  # type: ignore[attr-defined]
            port._bindPath = b"\0"  # type: ignore[attr-defined]
        return port

    def address(self) -> str:
        """Where it listens (``127.0.0.1:9443``, ``[::1]:9443``, a socket path)."""
        assert self.port is not None, "not bound"
        return where(self.port)


def bind_failure(name: str, description: str, error: BaseException) -> str:
    """The one line that says why listener ``name`` could not bind ``description``."""
    if description.startswith("haproxy:"):
        description = description[len("haproxy:") :]
    if isinstance(error, CannotListenError):
        if error.interface is None:  # a unix socket; the port is its path
            path = os.fsdecode(error.port)
            address = path
            if isinstance(error.socketError, str):  # Twisted's lock on the path
                cause = f"already in use (another process holds {path}.lock)"
            else:
                cause = os_error_text(error.socketError)
        else:
            host = error.interface or ("::" if description.startswith("tcp6:") else "0.0.0.0")
            address = host_port(host, error.port)
            cause = os_error_text(error.socketError)
        return f"listener {name}: {address}: {cause}"
    if isinstance(error, OverflowError):
        return f"listener {name}: {description}: port number must be 0-65535"
    if isinstance(error, OSError) and description.startswith("unix:"):
        path = description[len("unix:") :].split(":", 1)[0]
        folder = os.path.dirname(path) or "."
        if error.errno == errno.ENOENT and not os.path.isdir(folder):
            return f"listener {name}: {path}: folder {folder} does not exist"
        return f"listener {name}: {path}: {os_error_text(error)}"
    if isinstance(error, OSError):
        return f"listener {name}: {description}: {os_error_text(error)}"
    return f"listener {name}: {description}: {error}"


def where(port: IListeningPort) -> str:
    """A listening port's address as operators write it."""
    return peer_address(port.getHost())


class InheritedSocketError(Exception):
    """A ``systemd:`` endpoint names a socket that systemd did not pass, or not as it says."""


def inherited_sockets() -> ListenFDs:
    """The sockets systemd passed to this process (``$LISTEN_FDS``, ``$LISTEN_FDNAMES``).

    Twisted reads (and removes) those variables when ``twisted.internet.endpoints`` is
    first imported, for its own ``systemd:`` endpoint parser; what it read is kept there.
    """
    passed: ListenFDs = endpoints._SystemdParser._sddaemon
    return passed


_FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}


@implementer(IStreamServerEndpoint)
class InheritedSocketEndpoint:
    """Listens on a socket passed by systemd, found (and checked) when it is used, so that
    a missing or mismatched socket is a start-up error naming the listener, not a
    traceback while the gateway is assembled."""

    def __init__(
        self, reactor: IListenReactor, wanted: SystemdSocket, passed: ListenFDs | None = None
    ) -> None:
        self.reactor = reactor
        self.wanted = wanted
        self.passed = passed

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        try:
            fd = self._descriptor()
            _check_listening(fd, self.wanted.domain)
        except InheritedSocketError as e:
            return fail(e)
        adopted = AdoptedStreamServerEndpoint(self.reactor, fd, _FAMILIES[self.wanted.domain])
        d: Deferred[IListeningPort] = adopted.listen(factory)
        return d

    def _descriptor(self) -> int:
        passed = self.passed if self.passed is not None else inherited_sockets()
        fds = passed.inheritedDescriptors()
        if not fds:
            raise InheritedSocketError(
                "systemd passed no sockets (start it from a .socket unit, or use tcp:)"
            )
        if self.wanted.index is not None:
            if self.wanted.index >= len(fds):
                raise InheritedSocketError(
                    f"systemd passed {len(fds)} socket(s); there is no index {self.wanted.index}"
                )
            return fds[self.wanted.index]
        named = passed.inheritedNamedDescriptors()
        if self.wanted.name not in named:
            names = ", ".join(sorted(named)) or "none"
            raise InheritedSocketError(
                f"systemd passed no socket named {self.wanted.name!r} (names passed: {names})"
            )
        return named[self.wanted.name]


def _family(fd: int) -> socket.AddressFamily:
    """The address family of socket ``fd``."""
    s = socket.socket(fileno=fd)
    try:
        return s.family
    finally:
        s.detach()


def _check_listening(fd: int, domain: str) -> None:
    """The descriptor must be a listening stream socket of the family ``domain`` names."""
    try:
        s = socket.socket(fileno=fd)
    except OSError as e:
        raise InheritedSocketError(f"descriptor {fd}: {os_error_text(e)}") from e
    try:
        family, kind = s.family, s.type
        accepting = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        s.detach()
    if family != _FAMILIES[domain]:
        raise InheritedSocketError(
            f"descriptor {fd} is an {family.name} socket, not AF_{domain} as the endpoint says"
        )
    if kind != socket.SOCK_STREAM or not accepting:
        raise InheritedSocketError(
            f"descriptor {fd} is not a listening stream socket "
            "(the .socket unit needs ListenStream= and Accept=no)"
        )
