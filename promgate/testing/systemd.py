"""Standing in for systemd in tests: a notification socket that collects what the gateway
says (``READY=1``, ``STOPPING=1``), and a listening socket passed to a ``twistd promgate``
child as systemd's socket activation passes it (descriptor 3, ``$LISTEN_FDS``,
``$LISTEN_FDNAMES``, and ``$LISTEN_PID`` naming the child itself)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import attrs

__all__ = ["NotifySocket", "SocketActivation", "listening_socket", "socket_activation"]


class NotifySocket:
    """A unix datagram socket at ``path`` (or, for ``@name``, in the abstract namespace),
    as ``$NOTIFY_SOCKET`` names it; the messages sent to it, in order."""

    def __init__(self, path: Path | str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if isinstance(path, str) and path.startswith("@"):
            self.sock.bind(b"\0" + path[1:].encode())
        else:
            self.sock.bind(str(path))
        self.address = str(path)
        self.messages: list[dict[str, str]] = []

    def close(self) -> None:
        self.sock.close()

    def wait_for(self, key: str, timeout: float = 30.0, after: int = 0) -> dict[str, str]:
        """The first message carrying ``key`` among those received since the start (or
        since the first ``after``); waits for it."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages[after:]:
                if key in message:
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} in {self.messages} after {timeout}s")
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.messages.append(dict(_field(line) for line in data.decode().split("\n")))


def _field(line: str) -> tuple[str, str]:
    key, _, value = line.partition("=")
    return key, value


@attrs.frozen
class SocketActivation:
    """What :class:`~promgate.testing.GatewayProcess` needs to pass a socket as systemd
    would: the environment, the descriptor to keep open, the Python to run first."""

    env: dict[str, str]
    pass_fds: tuple[int, ...]
    prelude: str


def socket_activation(sock: socket.socket, name: str = "") -> SocketActivation:
    """Pass ``sock`` as systemd's first socket, named ``name`` (``FileDescriptorName``).

    The child moves it to descriptor 3 and sets ``$LISTEN_PID`` to its own process id before
    Twisted is imported (Twisted reads the variables then), as systemd does between fork and
    exec.
    """
    fd = sock.fileno()
    env = {"PROMGATE_TEST_PASSED_FD": str(fd), "LISTEN_FDS": "1"}
    if name:
        env["LISTEN_FDNAMES"] = name
    prelude = (
        "import os\n"
        "_fd = int(os.environ.pop('PROMGATE_TEST_PASSED_FD'))\n"
        "if _fd != 3:\n"
        "    os.dup2(_fd, 3)\n"
        "    os.close(_fd)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    )
    return SocketActivation(env, (fd,), prelude)


def listening_socket(family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    """A stream socket listening on loopback, on a port of the system's choosing."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    sock.listen(16)
    os.set_inheritable(sock.fileno(), True)
    return sock
