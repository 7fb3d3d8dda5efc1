"""Tests for start-up failures, in memory: the one line that names the listener (or file)
and the cause, and the excepthook that makes it twistd's last word instead of a traceback."""

from __future__ import annotations

import errno
import io
import sys
from unittest import mock

from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from promgate.errors import StartupError, one_line_startup_errors, os_error_text
from promgate.listening import ListenerService, bind_failure


def in_use(interface: str | None, port: object) -> CannotListenError:
    return CannotListenError(interface, port, OSError(errno.EADDRINUSE, "Address already in use"))


class BindFailureTests(SynchronousTestCase):
    """A listener that cannot bind is described as ``listener NAME: ADDRESS: CAUSE``."""

    def test_in_use(self) -> None:
        """The address as operators write it, the cause in lower case."""
        self.assertEqual(
            bind_failure("scrape", "tcp:9443:interface=127.0.0.1", in_use("127.0.0.1", 9443)),
            "listener scrape: 127.0.0.1:9443: address already in use",
        )
        self.assertEqual(
            bind_failure("scrape", "tcp6:9443:interface=\\:\\:1", in_use("::1", 9443)),
            "listener scrape: [::1]:9443: address already in use",
        )

    def test_every_interface(self) -> None:
        """No interface: every IPv4 (tcp) or IPv6 (tcp6) address."""
        self.assertEqual(
            bind_failure("scrape", "tcp:9443", in_use("", 9443)),
            "listener scrape: 0.0.0.0:9443: address already in use",
        )
        self.assertEqual(
            bind_failure("scrape", "tcp6:9443", in_use("", 9443)),
            "listener scrape: [::]:9443: address already in use",
        )

    def test_not_local(self) -> None:
        error = CannotListenError(
            "10.9.9.9", 9443, OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
        )
        self.assertEqual(
            bind_failure("scrape", "tcp:9443:interface=10.9.9.9", error),
            "listener scrape: 10.9.9.9:9443: cannot assign requested address",
        )

    def test_unix_socket_locked(self) -> None:
        """Twisted's lock beside a unix socket is held by another process."""
        error = CannotListenError(None, b"/run/promgate/scrape.sock", "Cannot acquire lock")
        self.assertEqual(
            bind_failure("scrape", "unix:/run/promgate/scrape.sock", error),
            "listener scrape: /run/promgate/scrape.sock: already in use "
            "(another process holds /run/promgate/scrape.sock.lock)",
        )

    def test_port_overflow(self) -> None:
        self.assertEqual(
            bind_failure("admin", "tcp:99999999999999999999", OverflowError("bind(): port")),
            "listener admin: tcp:99999999999999999999: port number must be 0-65535",
        )

    def test_os_error_text(self) -> None:
        """Capitalised strerror texts lose the capital; acronyms keep theirs."""
        self.assertEqual(os_error_text(OSError(errno.EISDIR, "x")), "is a directory")
        self.assertEqual(os_error_text(ValueError("TLS is off")), "TLS is off")


class ListenerServiceTests(SynchronousTestCase):
    """Binding happens in privilegedStartService; its failure is a StartupError."""

    def test_binds_in_privileged_start(self) -> None:
        reactor = MemoryReactor()
        service = ListenerService("scrape", "tcp:9443:interface=127.0.0.1", Factory(), reactor)
        service.privilegedStartService()
        ((port, _, _, interface),) = reactor.tcpServers
        self.assertEqual((port, interface), (9443, "127.0.0.1"))
        self.assertEqual(service.address(), "0.0.0.0:9443")  # MemoryReactor: no interface
        service.startService()
        self.assertEqual(len(reactor.tcpServers), 1)  # bound once

    def test_failure(self) -> None:
        reactor = MemoryReactor()

        def refuse(*args: object, **kwargs: object) -> None:
            raise in_use("127.0.0.1", 9443)

        reactor.listenTCP = refuse  # type: ignore[method-assign]
        service = ListenerService("scrape", "tcp:9443:interface=127.0.0.1", Factory(), reactor)
        with self.assertRaises(StartupError) as raised:
            service.privilegedStartService()
        self.assertEqual(
            str(raised.exception), "listener scrape: 127.0.0.1:9443: address already in use"
        )


class ExceptHookTests(SynchronousTestCase):
    """The hook twistd promgate installs for exceptions that end the process."""

    def test_startup_error_is_one_line(self) -> None:
        calls: list[object] = []
        hook = one_line_startup_errors(lambda *args: calls.append(args))
        err = io.StringIO()
        error = StartupError("listener scrape: 127.0.0.1:9443: address already in use")
        with mock.patch.object(sys, "__stderr__", err):
            hook(StartupError, error, None)
        self.assertEqual(err.getvalue(), f"{error}\n")
        self.assertEqual(calls, [])

    def test_anything_else_passed_on(self) -> None:
        calls: list[object] = []
        hook = one_line_startup_errors(lambda *args: calls.append(args))
        error = RuntimeError("bug")
        hook(RuntimeError, error, None)
        self.assertEqual(calls, [(RuntimeError, error, None)])
