"""systemd integration: ``sd_notify`` messages, ``systemd:`` (socket activation) endpoints,
and how ``check-config`` reads them."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.python.systemd import ListenFDs
from twisted.trial.unittest import SynchronousTestCase

from promgate.endpoints import SystemdSocket, parse_endpoint
from promgate.errors import StartupError
from promgate.listening import InheritedSocketEndpoint, ListenerService
from promgate.systemd import SystemdNotifier, notify_socket_address
from promgate.testing.configs import ProblemAssertions
from promgate.testing.systemd import NotifySocket, listening_socket

ADMIN = 'endpoint: "tcp:9099:interface=127.0.0.1"'


def _short_dir() -> Path:
    """A directory whose socket paths fit in sun_path (trial's own can be too deep)."""
    return Path(tempfile.mkdtemp(prefix="sd-"))


class NotifierTests(SynchronousTestCase):
    """What the gateway sends to ``$NOTIFY_SOCKET``."""

    def setUp(self) -> None:
        self.dir = _short_dir()
        self.receiver = NotifySocket(self.dir / "notify")
        self.addCleanup(self.receiver.close)
        self.notifier = SystemdNotifier(str(self.dir / "notify"), monotonic_ns=lambda: 5_000_123)

    def test_ready(self) -> None:
        """READY=1 with a STATUS= line."""
        self.assertTrue(self.notifier.notify_ready("serving: scrape 127.0.0.1:9443"))
        self.assertEqual(
            self.receiver.wait_for("READY", timeout=5),
            {"READY": "1", "STATUS": "serving: scrape 127.0.0.1:9443"},
        )

    def test_reloading_then_ready(self) -> None:
        """RELOADING=1 carries MONOTONIC_USEC (CLOCK_MONOTONIC in microseconds), as
        ``Type=notify-reload`` requires; READY=1 ends the reload."""
        self.notifier.notify_reloading()
        self.notifier.notify_ready("reloaded")
        self.receiver.wait_for("READY", timeout=5)
        reloading, ready = self.receiver.messages
        self.assertEqual(reloading["RELOADING"], "1")
        self.assertEqual(reloading["MONOTONIC_USEC"], "5000")
        self.assertEqual(ready, {"READY": "1", "STATUS": "reloaded"})

    def test_stopping(self) -> None:
        self.notifier.notify_stopping()
        self.assertEqual(self.receiver.wait_for("STOPPING", timeout=5)["STOPPING"], "1")

    def test_status_is_one_line(self) -> None:
        """A newline in a status cannot smuggle in another field."""
        self.notifier.notify_status("bad\nREADY=1")
        self.assertEqual(self.receiver.wait_for("STATUS", timeout=5), {"STATUS": "bad READY=1"})

    def test_abstract_namespace(self) -> None:
        """``@name`` is a socket in the abstract namespace."""
        name = f"@promgate-test-{os.getpid()}-{id(self)}"
        receiver = NotifySocket(name)
        self.addCleanup(receiver.close)
        notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": name})
        self.assertTrue(notifier.notify_ready())
        self.assertEqual(receiver.wait_for("READY", timeout=5)["READY"], "1")

    def test_addresses(self) -> None:
        self.assertEqual(notify_socket_address("/run/systemd/notify"), "/run/systemd/notify")
        self.assertEqual(notify_socket_address("@abc"), b"\0abc")
        self.assertIsNone(notify_socket_address(None))
        self.assertIsNone(notify_socket_address(""))
        self.assertIsNone(notify_socket_address("vsock:2:1234"))

    def test_not_under_systemd(self) -> None:
        """Without $NOTIFY_SOCKET nothing is sent, and nothing fails."""
        notifier = SystemdNotifier.from_environment({})
        self.assertFalse(notifier.enabled)
        self.assertFalse(notifier.notify_ready())
        self.assertFalse(notifier.notify_stopping())

    def test_unreachable_is_logged(self) -> None:
        """A socket that is gone is a warning in the log, never an exception."""
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        notifier = SystemdNotifier(str(self.dir / "missing"))
        self.assertFalse(notifier.notify_ready())
        self.assertTrue(
            any("cannot notify systemd" in str(e.get("log_format")) for e in events), events
        )


class EndpointFormTests(SynchronousTestCase):
    """``systemd:`` and ``haproxy:`` endpoint descriptions taken apart."""

    def test_forms(self) -> None:
        cases = {
            "tcp:9443": ("tcp", False, None),
            "haproxy:tcp:9443:interface=127.0.0.1": ("tcp", True, None),
            "haproxy:unix:/run/promgate/s.sock": ("unix", True, None),
            "systemd:domain=INET:index=0": ("systemd", False, SystemdSocket("INET", index=0)),
            "systemd:domain=INET6:name=scrape": (
                "systemd",
                False,
                SystemdSocket("INET6", name="scrape"),
            ),
            "haproxy:systemd:name=front:domain=UNIX": (
                "systemd",
                True,
                SystemdSocket("UNIX", name="front"),
            ),
        }
        for text, (kind, proxied, inherited) in cases.items():
            parsed = parse_endpoint(text)
            self.assertEqual(
                (parsed.kind, parsed.proxied, parsed.systemd), (kind, proxied, inherited)
            )

    def test_refused(self) -> None:
        cases = {
            "ssl:9443": "must be tcp:, tcp6: or unix:",
            "haproxy:ssl:9443": "must be tcp:, tcp6: or unix:",
            "haproxy:haproxy:tcp:1": "given twice",
            "systemd:index=0": "needs domain=",
            "systemd:domain=INET": "exactly one of index",
            "systemd:domain=INET:index=0:name=a": "exactly one of index",
            "systemd:domain=AX25:index=0": "must be INET, INET6 or UNIX",
            "systemd:domain=INET:index=-1": "non-negative",
            "systemd:domain=INET:index=x": "non-negative",
            "systemd:domain=INET:name=": "printable ASCII",
            "systemd:domain=INET:port=1": "unknown option",
            "systemd:domain=INET:index": "not key=value",
            "systemd:domain=INET:domain=INET:index=0": "given twice",
            "systemd:domain=INET:name=a\\:b": "no escapes",
        }
        for text, message in cases.items():
            with self.assertRaises(ValueError, msg=text) as caught:
                parse_endpoint(text)
            self.assertIn(message, str(caught.exception), text)


class InheritedSocketTests(SynchronousTestCase):
    """A ``systemd:`` listener adopts the socket systemd passed, after checking it."""

    def listener(
        self, description: str, passed: ListenFDs
    ) -> tuple[ListenerService, MemoryReactor]:
        reactor = MemoryReactor()
        return ListenerService("scrape", description, Factory(), reactor, passed=passed), reactor

    def test_adopts_by_name_and_index(self) -> None:
        for description in ("systemd:domain=INET:name=scrape", "systemd:domain=INET:index=1"):
            other, sock = listening_socket(), listening_socket()
            self.addCleanup(other.close)
            fd = os.dup(sock.fileno())  # adopting closes the descriptor it was given
            sock.close()
            service, reactor = self.listener(
                description, ListenFDs([other.fileno(), fd], ("admin", "scrape"))
            )
            service.privilegedStartService()
            ((adopted_fd, family, _),) = reactor.adoptedPorts
            self.assertEqual((adopted_fd, family), (fd, socket.AF_INET))
            with self.assertRaises(OSError):
                os.fstat(fd)

    def start_failure(self, description: str, passed: ListenFDs) -> str:
        service, reactor = self.listener(description, passed)
        with self.assertRaises(StartupError) as caught:
            service.privilegedStartService()
        self.assertEqual(reactor.adoptedPorts, [])
        return str(caught.exception)

    def test_none_passed(self) -> None:
        self.assertEqual(
            self.start_failure("systemd:domain=INET:index=0", ListenFDs([])),
            "listener scrape: systemd:domain=INET:index=0: systemd passed no sockets "
            "(start it from a .socket unit, or use tcp:)",
        )

    def test_missing(self) -> None:
        sock = listening_socket()
        self.addCleanup(sock.close)
        passed = ListenFDs([sock.fileno()], ("admin",))
        self.assertIn(
            "systemd passed 1 socket(s); there is no index 1",
            self.start_failure("systemd:domain=INET:index=1", passed),
        )
        self.assertIn(
            "no socket named 'scrape' (names passed: admin)",
            self.start_failure("systemd:domain=INET:name=scrape", passed),
        )

    def test_wrong_family(self) -> None:
        sock = listening_socket()
        self.addCleanup(sock.close)
        self.assertIn(
            "is an AF_INET socket, not AF_INET6",
            self.start_failure("systemd:domain=INET6:index=0", ListenFDs([sock.fileno()])),
        )

    def test_not_listening(self) -> None:
        """A connected socket (``Accept=yes``) or a datagram socket is refused."""
        a, b = socket.socketpair()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (a, b, udp):
            self.addCleanup(s.close)
        self.assertIn(
            "not a listening stream socket",
            self.start_failure("systemd:domain=UNIX:index=0", ListenFDs([a.fileno()])),
        )
        self.assertIn(
            "not a listening stream socket",
            self.start_failure("systemd:domain=INET:index=0", ListenFDs([udp.fileno()])),
        )

    def test_endpoint_reads_twisteds_environment(self) -> None:
        """By default the sockets are those Twisted read from the environment at import:
        this test process was given none."""
        endpoint = InheritedSocketEndpoint(MemoryReactor(), SystemdSocket("INET", index=0))
        failure = self.failureResultOf(endpoint.listen(Factory()))
        self.assertIn("systemd passed no sockets", str(failure.value))


class CheckConfigTests(ProblemAssertions):
    """check-config accepts systemd: and haproxy: endpoints, without binding anything, and
    says FILE:LINE: key: what is wrong with a malformed one."""

    def test_accepted(self) -> None:
        self.tree.standard()
        self.tree.write(
            "conf.d/zz.yaml",
            """\
            listeners:
              - {name: a, endpoint: "systemd:domain=INET:index=0"}
              - {name: b, endpoint: "systemd:domain=INET6:name=scrape"}
              - {name: c, endpoint: "haproxy:tcp:0:interface=127.0.0.1"}
              - {name: d, endpoint: "haproxy:systemd:domain=INET:name=front"}
            """,
        )
        config, errors, _ = self.tree.check()
        self.assertEqual(errors, [])
        assert config is not None
        endpoints = {lst.name: lst.endpoint for lst in config.listeners}
        self.assertEqual(endpoints["a"], "systemd:domain=INET:index=0")
        self.assertEqual(endpoints["d"], "haproxy:systemd:domain=INET:name=front")

    def test_admin(self) -> None:
        self.tree.standard()
        main = self.tree.texts["main.yaml"]
        self.assertIn(ADMIN, main)
        self.tree.write(
            "main.yaml", main.replace(ADMIN, 'endpoint: "systemd:domain=INET:name=admin"')
        )
        config, errors, _ = self.tree.check()
        self.assertEqual(errors, [])
        assert config is not None
        self.assertEqual(config.admin.endpoint, "systemd:domain=INET:name=admin")

    def test_refused(self) -> None:
        text = """\
            listeners:
              - {name: a, endpoint: "systemd:domain=INET"}
              - {name: b, endpoint: "systemd:domain=IPX:index=0"}
              - {name: c, endpoint: "haproxy:ssl:9443"}
              - {name: d, endpoint: "haproxy:tcp:notaport"}
              - {name: e, endpoint: "systemd:domain=INET:index=0:name=x"}
            """
        errors = self.errors_with("conf.d/zz.yaml", text)
        messages = {
            0: "exactly one of index=N and name=NAME",
            1: "domain 'IPX' must be INET, INET6 or UNIX",
            2: "must be tcp:, tcp6: or unix:, or systemd:",
            3: "invalid endpoint 'haproxy:tcp:notaport'",
            4: "exactly one of index=N and name=NAME",
        }
        for i, message in messages.items():
            self.assertProblem(errors, "conf.d/zz.yaml", 2 + i, f"listeners[{i}].endpoint", message)

    def test_same_socket_twice(self) -> None:
        """Two listeners cannot both adopt one passed socket."""
        text = """\
            listeners:
              - {name: a, endpoint: "systemd:domain=INET:name=scrape"}
              - {name: b, endpoint: "haproxy:systemd:domain=INET6:name=scrape"}
            """
        errors = self.errors_with("conf.d/zz.yaml", text)
        problem = self.assertProblem(
            errors, "conf.d/zz.yaml", 3, "listeners[1].endpoint", "name 'scrape' is already"
        )
        self.assertIn("zz.yaml:2", problem.message)
