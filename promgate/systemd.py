"""Telling systemd how the gateway is doing: the ``sd_notify`` protocol, with no dependency.

Under ``Type=notify`` (or ``notify-reload``), systemd passes ``$NOTIFY_SOCKET``, a unix
datagram socket, and waits for ``READY=1`` before it counts the service as started. The
gateway sends ``READY=1`` once every listener is bound and it is ready, ``RELOADING=1``
(with ``MONOTONIC_USEC``, which ``Type=notify-reload`` requires) and then ``READY=1``
around a configuration reload, and ``STOPPING=1`` when it begins to stop; each with a
``STATUS=`` line that ``systemctl status`` shows. Without ``$NOTIFY_SOCKET`` (not started
by systemd) every call does nothing. A message that cannot be sent is logged, never raised:
systemd's bookkeeping must not take the gateway down.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

from twisted.logger import Logger

__all__ = ["SystemdNotifier", "notify_socket_address"]


def notify_socket_address(value: str | None) -> str | bytes | None:
    """The address ``$NOTIFY_SOCKET`` names: a path, or (``@name``) a name in the abstract
    namespace; None when it is unset, empty, or not a unix socket (``vsock:``)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return value
    return None


class SystemdNotifier:
    """Sends ``sd_notify`` messages to one socket, or nowhere."""

    log = Logger()

    def __init__(
        self,
        address: str | bytes | None,
        *,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.address = address
        #: CLOCK_MONOTONIC, which systemd compares ``MONOTONIC_USEC`` with (not the
        #: gateway's clock: that one may be a test's).
        self._monotonic_ns = monotonic_ns

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        """The notifier ``$NOTIFY_SOCKET`` asks for."""
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET")
        address = notify_socket_address(value)
        if value and address is None:
            cls.log.warn(
                "NOTIFY_SOCKET {value} is not a unix socket: systemd is not notified",
                value=value,
            )
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=value``) as one message; whether it was sent."""
        if self.address is None or not fields:
            return False
        message = "\n".join(fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.setblocking(False)
                s.sendto(message, self.address)
        except OSError as e:
            self.log.warn(
                "cannot notify systemd at {address}: {error}",
                address=_shown(self.address),
                error=os.strerror(e.errno) if e.errno else str(e),
            )
            return False
        return True

    def notify_ready(self, status: str = "ready") -> bool:
        """Start-up, or a reload, is complete: the gateway serves."""
        return self.notify("READY=1", _status(status))

    def notify_reloading(self, status: str = "reloading the configuration") -> bool:
        """A reload begins; :meth:`notify_ready` must follow when it ends, applied or not."""
        usec = self._monotonic_ns() // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", _status(status))

    def notify_stopping(self, status: str = "stopping") -> bool:
        """Shutdown has begun (listeners closing, in-flight work draining)."""
        return self.notify("STOPPING=1", _status(status))

    def notify_status(self, status: str) -> bool:
        """Only a new ``STATUS=`` line."""
        return self.notify(_status(status))


def _status(text: str) -> str:
    """One ``STATUS=`` line: a newline would start another field."""
    return "STATUS=" + " ".join(text.split())[:400]


def _shown(address: str | bytes) -> str:
    if isinstance(address, bytes):
        return "@" + address[1:].decode("utf-8", "replace")
    return address
