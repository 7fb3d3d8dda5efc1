"""Listeners as Twisted services, bound before anything else starts.

Each listener is a :class:`StreamServerEndpointService` that binds in
``privilegedStartService`` (before ``twistd --uid`` drops privileges, and before the audit
log is opened), so a port in use or an address that is not local stops start-up with one
line that names the listener and the address, and leaves nothing behind.
"""

from __future__ import annotations

import errno
import os

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory

from promgate.addresses import host_port, peer_address
from promgate.errors import StartupError, os_error_text
from promgate.reactors import IListenReactor

__all__ = ["ListenerService", "bind_failure", "where"]


class ListenerService(StreamServerEndpointService):
    """One named listener on one endpoint description (``tcp:9443:interface=...``)."""

    _raiseSynchronously = True

    def __init__(
        self, name: str, description: str, factory: IProtocolFactory, reactor: IListenReactor
    ) -> None:
        super().__init__(serverFromString(reactor, description), factory)  # type: ignore[no-untyped-call]
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
        return port

    def address(self) -> str:
        """Where it listens (``127.0.0.1:9443``, ``[::1]:9443``, a socket path)."""
        assert self.port is not None, "not bound"
        return where(self.port)


def bind_failure(name: str, description: str, error: BaseException) -> str:
    """The one line that says why listener ``name`` could not bind ``description``."""
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
