"""Tests for the in-memory test kit (``promgate.testing.memory``) and, through it, for the
gateway's assembly (``GatewayService``) on a memory reactor: listeners bound as
configured, real TLS, fake upstreams, audit, metrics, and a drain that waits on Deferreds.
No test here opens a socket."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import attrs
import bcrypt
from twisted.internet.error import TimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from promgate.config.loader import load_config
from promgate.errors import StartupError
from promgate.service import DRAIN_TIMEOUT, GatewayService, Pipeline
from promgate.testing import (
    Basic,
    Bearer,
    MemoryAuditLog,
    MemoryGateway,
    NoResponseError,
    Response,
    TestPKI,
    UpstreamRequest,
)

TOKEN = "agent-token-5f1c"
PASSWORD = "ops-password"
SCRAPE = "/scrape?route=node&target=10.0.0.5%3A9100"
METRICS = b"# TYPE up gauge\nup 1\n"

CONFIG = """\
tls: {{certificate: pki/gate.pem, key: pki/gate-key.pem, client_ca: pki/ca.pem}}
admin: {{endpoint: "tcp:9099:interface=127.0.0.1"}}
listeners:
  - {{name: scrape, protocol: http, endpoint: "tcp:9443"}}
  - {{name: local, protocol: http, endpoint: "tcp:8080:interface=127.0.0.1", tls: false}}
  - {{name: egress, protocol: forward, endpoint: 'tcp6:3128:interface=\\:\\:1'}}
identities:
  prometheus: {{cert: {{uri: "spiffe://promgate.local/prometheus"}}, roles: [scraper]}}
  agent: {{bearer_sha256: "{token_sha256}", roles: [scraper]}}
  ops: {{basic: {{user: ops, bcrypt: "{ops_bcrypt}"}}, roles: [scraper]}}
routes:
  node:
    allow: ["role:scraper"]
    timeout: 10s
    targets: {{static: ["10.0.0.5:9100", "10.0.0.6:9100", "node-b.example.org:9100"]}}
  slow:
    allow: ["role:scraper"]
    timeout: 60s
    targets: {{static: ["10.0.0.7:9100"]}}
audit: {{path: audit.jsonl, key_file: pki/audit.key, on_failure: deny}}
"""

_PKI: TestPKI | None = None


def _pki(base: Path) -> TestPKI:
    """One test PKI for the whole module (issuing certificates is the slow part)."""
    global _PKI
    if _PKI is None:
        _PKI = TestPKI(base)
        _PKI.client("prometheus")
        _PKI.foreign_client("prometheus")
    return _PKI


def write_config(case: SynchronousTestCase) -> Path:
    """The configuration above in a fresh folder, with the module's PKI as ``pki/``."""
    root = Path(case.mktemp()).resolve()
    root.mkdir(parents=True)
    pki = _pki(root.parent / "pki-shared")
    (root / "pki").symlink_to(pki.directory)
    text = CONFIG.format(
        token_sha256=hashlib.sha256(TOKEN.encode()).hexdigest(),
        ops_bcrypt=bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode(),
    )
    path = root / "promgate.yaml"
    path.write_text(textwrap.dedent(text))
    return path


class NoSockets(SynchronousTestCase):
    """Fails any test that opens a socket: everything here runs in memory."""

    def setUp(self) -> None:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a test of the in-memory kit opened a socket")

        self.patch(socket, "socket", refuse)
        self.patch(socket, "socketpair", refuse)
        self.patch(socket, "create_connection", refuse)


class KitTestCase(NoSockets):
    def setUp(self) -> None:
        super().setUp()
        self.pki = _pki(Path(self.mktemp()).resolve())
        self.config_file = write_config(self)
        self.gw = MemoryGateway.from_config_file(self.config_file)
        self.prometheus = self.pki.client("prometheus")


class ScrapeTests(KitTestCase):
    """Scrapes through the real assembly: TLS, identities, upstreams, audit, metrics."""

    def test_scrape_with_client_certificate(self) -> None:
        """A client certificate over real TLS names the identity; the fake exporter's body
        comes back byte for byte, and the request is audited with its TLS details."""
        exporter = self.gw.upstream("10.0.0.5:9100", body=METRICS)
        response = self.gw.get(SCRAPE, identity=self.prometheus, listener="scrape")
        self.assertEqual((response.status, response.body), (200, METRICS))
        self.assertEqual(
            response.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8"
        )
        (request,) = exporter.requests
        self.assertEqual(request.raw, b"GET /metrics HTTP/1.1\r\nHost: 10.0.0.5:9100\r\n\r\n")
        (event,) = self.gw.audit_records("request")
        self.assertEqual(
            (event.listener, event.identity, event.route, event.target, event.decision),
            ("scrape", "prometheus", "node", "10.0.0.5:9100", "allow"),
        )
        self.assertIn(event.tls_version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(event.cert_subject, "CN=prometheus")
        self.assertEqual(event.peer, "127.0.0.1:40000")

    def test_bearer_and_basic_on_plain_listener(self) -> None:
        """Tokens and basic auth (bcrypt, run at once in memory) name their identities."""
        self.gw.upstream("10.0.0.5:9100", body=METRICS)
        for identity, name in ((Bearer(TOKEN), "agent"), (Basic("ops", PASSWORD), "ops")):
            response = self.gw.get(SCRAPE, identity=identity, listener="local")
            self.assertEqual(response.status, 200, response)
            self.assertEqual(self.gw.audit_records("request")[-1].identity, name)
        refused = self.gw.get(SCRAPE, identity=Bearer("wrong"), listener="local")
        self.assertEqual(refused.status, 401)

    def test_untrusted_certificate_refused_in_handshake(self) -> None:
        """A certificate from another CA never gets a response: the handshake fails, and
        the gateway audits it."""
        with self.assertRaises(NoResponseError) as caught:
            self.gw.get(SCRAPE, identity=self.pki.foreign_client("prometheus"), listener="scrape")
        self.assertIsNotNone(caught.exception.lost)
        (event,) = self.gw.audit_records("tls_handshake_failed")
        self.assertEqual(event.listener, "scrape")

    def test_unregistered_upstream_refused(self) -> None:
        """An address no fake upstream was registered for refuses the connection: 502."""
        response = self.gw.get(SCRAPE, identity=Bearer(TOKEN), listener="local")
        self.assertEqual(response.status, 502)
        self.assertEqual(self.gw.audit_records("request")[-1].reason, "upstream_refused")

    def test_host_name_upstream(self) -> None:
        """A target named by host name resolves to the fake registered under that name."""
        self.gw.upstream("node-b.example.org:9100", body=b"up 2\n")
        response = self.gw.get(
            "/scrape?route=node&target=node-b.example.org%3A9100",
            identity=Bearer(TOKEN),
            listener="local",
        )
        self.assertEqual((response.status, response.body), (200, b"up 2\n"))

    def test_handler_answers(self) -> None:
        """A handler sees each request and answers it."""

        def handler(request: UpstreamRequest) -> Response:
            return Response(503, {"Content-Type": "text/plain"}, request.target.encode())

        self.gw.upstream("10.0.0.6:9100", handler=handler)
        response = self.gw.get(
            "/scrape?route=node&target=10.0.0.6%3A9100", identity=Bearer(TOKEN), listener="local"
        )
        self.assertEqual((response.status, response.body), (503, b"/metrics"))

    def test_keep_alive_connection(self) -> None:
        """One connection carries several requests; the upstream connection is reused."""
        exporter = self.gw.upstream("10.0.0.5:9100", body=METRICS)
        conn = self.gw.connect(self.prometheus, listener="scrape")
        for _ in range(3):
            self.assertEqual(conn.request(SCRAPE).status, 200)
        conn.close()
        self.assertEqual((len(exporter.requests), exporter.connections), (3, 1))
        self.assertIsNotNone(conn.lost)

    def test_forward_listener_proxy_authorization(self) -> None:
        """On a forward listener the token goes in Proxy-Authorization."""
        self.gw.upstream("10.0.0.5:9100", body=METRICS)
        response = self.gw.get(
            "http://10.0.0.5:9100/metrics", identity=self.prometheus, listener="egress"
        )
        self.assertEqual((response.status, response.body), (200, METRICS))

    def test_metrics_and_samples(self) -> None:
        """The admin listener's /metrics is the gateway's own registry."""
        self.gw.upstream("10.0.0.5:9100", body=METRICS)
        self.gw.get(SCRAPE, identity=Bearer(TOKEN), listener="local")
        text = self.gw.metrics_text()
        labels = {"code": "200", "identity": "agent", "listener": "local", "route": "node"}
        self.assertIn(
            'promgate_requests_total{code="200",identity="agent",listener="local",'
            'route="node"} 1.0',
            text,
        )
        self.assertEqual(self.gw.sample("promgate_requests_total", labels), 1.0)
        self.assertEqual(self.gw.get("/-/ready", listener="admin").status, 200)

    def test_explain(self) -> None:
        """explain asks the same policy, without a request."""
        self.assertTrue(self.gw.explain("agent", SCRAPE, listener="scrape").decision.allowed)
        answer = self.gw.explain("agent", "/scrape?route=node&target=10.9.9.9%3A1")
        self.assertEqual((answer.decision.allowed, answer.status), (False, 404))


class TimeTests(KitTestCase):
    """Time moves only when the test says so."""

    def test_held_answer(self) -> None:
        """A held upstream answers on release; until then there is no response."""
        exporter = self.gw.upstream("10.0.0.5:9100", body=METRICS, hold=True)
        conn = self.gw.connect(Bearer(TOKEN), listener="local")
        conn.send(SCRAPE)
        self.assertIsNone(conn.response())
        self.gw.advance(5)
        self.assertIsNone(conn.response())
        exporter.release()
        response = conn.response()
        assert response is not None
        self.assertEqual(response.body, METRICS)
        self.assertEqual(self.gw.audit_records("request")[-1].duration, 5.0)

    def test_scrape_deadline(self) -> None:
        """An upstream that never answers: the route's 10s timeout gives a 504."""
        self.gw.upstream("10.0.0.5:9100", hold=True)
        conn = self.gw.connect(Bearer(TOKEN), listener="local")
        conn.send(SCRAPE)
        self.gw.advance(9.9)
        self.assertIsNone(conn.response())
        self.gw.advance(0.1)
        response = conn.response()
        assert response is not None
        self.assertEqual(response.status, 504)

    def test_connect_error(self) -> None:
        """A connection attempt that fails as told: a timeout is upstream_timeout."""
        self.gw.upstream("10.0.0.5:9100", connect_error=TimeoutError())
        response = self.gw.get(SCRAPE, identity=Bearer(TOKEN), listener="local")
        self.assertEqual(response.status, 504)
        self.assertEqual(self.gw.audit_records("request")[-1].reason, "upstream_timeout")

    def test_unreachable(self) -> None:
        """An unreachable upstream hangs until the connect deadline (5s)."""
        self.gw.upstream("10.0.0.5:9100", unreachable=True)
        conn = self.gw.connect(Bearer(TOKEN), listener="local")
        conn.send(SCRAPE)
        self.gw.advance(4.9)
        self.assertIsNone(conn.response())
        self.gw.advance(0.2)
        response = conn.response()
        assert response is not None
        self.assertEqual(response.status, 504)

    def test_raw_protocol_upstream(self) -> None:
        """``factory`` upstreams speak anything: here, a response without a length,
        delimited by the close."""

        class Raw(Protocol):
            def dataReceived(self, data: bytes) -> None:
                assert self.transport is not None
                self.transport.write(b"HTTP/1.1 200 OK\r\n\r\nraw body")
                self.transport.loseConnection()

        self.gw.upstream("10.0.0.5:9100", factory=Factory.forProtocol(Raw))
        response = self.gw.get(SCRAPE, identity=Bearer(TOKEN), listener="local")
        self.assertEqual((response.status, response.body), (200, b"raw body"))


class AssemblyTests(KitTestCase):
    """GatewayService on a memory reactor, as the kit assembles it."""

    def test_listeners_bound_as_configured(self) -> None:
        """Every configured listener is bound on its port and interface, plus admin."""
        bound = {(port, interface) for port, _, _, interface in self.gw.reactor.tcpServers}
        self.assertEqual(
            bound, {(9443, ""), (8080, "127.0.0.1"), (3128, "::1"), (9099, "127.0.0.1")}
        )
        self.assertEqual(
            {name: (b.port, b.interface) for name, b in self.gw.listeners.items()},
            {
                "scrape": (9443, ""),
                "local": (8080, "127.0.0.1"),
                "egress": (3128, "::1"),
                "admin": (9099, "127.0.0.1"),
            },
        )

    def test_start_and_stop_bracket_the_audit(self) -> None:
        """``start`` comes first and ``stop`` last; the stop fires at once when idle."""
        self.gw.upstream("10.0.0.5:9100", body=METRICS)
        self.gw.get(SCRAPE, identity=Bearer(TOKEN), listener="local")
        self.successResultOf(self.gw.stop())
        events = [e.event for e in self.gw.audit_records()]
        self.assertEqual((events[0], events[-1]), ("start", "stop"))
        self.assertIn("request", events)

    def test_stop_drains_in_flight_scrape(self) -> None:
        """Stopping waits for a scrape in flight: /-/ready answers 503 meanwhile, the
        scrape is answered, and the stop fires once its connection has closed."""
        exporter = self.gw.upstream("10.0.0.5:9100", body=METRICS, hold=True)
        conn = self.gw.connect(Bearer(TOKEN), listener="local")
        conn.send(SCRAPE)
        stopped = self.gw.stop()
        self.assertNoResult(stopped)
        self.assertEqual(self.gw.get("/-/ready", listener="admin").status, 503)
        self.gw.advance(1)
        self.assertNoResult(stopped)
        exporter.release()
        response = conn.response()
        assert response is not None
        self.assertEqual((response.status, response.body), (200, METRICS))
        self.successResultOf(stopped)
        self.assertIsNotNone(conn.lost)
        self.assertEqual(self.gw.audit_records()[-1].event, "stop")
        (request,) = self.gw.audit_records("request")
        self.assertEqual((request.status, request.reason), (200, "ok"))

    def test_stop_cuts_at_the_deadline(self) -> None:
        """A scrape still in flight at the drain deadline is cut, and audited."""
        self.gw.upstream("10.0.0.7:9100", hold=True)
        conn = self.gw.connect(Bearer(TOKEN), listener="local")
        conn.send("/scrape?route=slow&target=10.0.0.7%3A9100")
        stopped = self.gw.stop()
        self.gw.advance(DRAIN_TIMEOUT - 0.5)
        self.assertNoResult(stopped)
        self.gw.advance(5)
        self.successResultOf(stopped)
        self.assertIsNotNone(conn.lost)
        (request,) = self.gw.audit_records("request")
        self.assertEqual((request.route, request.decision), ("slow", "allow"))
        self.assertNotEqual(request.reason, "ok")

    def test_no_signal_handler(self) -> None:
        """The kit's gateway leaves the process's SIGHUP handler alone."""
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), self.gw.service._on_sighup)

    def test_collaborators_are_a_frozen_value(self) -> None:
        """The listeners' shared collaborators are one frozen attrs value."""
        pipeline = self.gw.service.pipeline
        self.assertIsInstance(pipeline, Pipeline)
        self.assertTrue(attrs.has(Pipeline))
        with self.assertRaises(attrs.exceptions.FrozenInstanceError):
            pipeline.audit = None  # type: ignore[misc]
        self.assertIs(pipeline.audit, self.gw.service.records)
        self.assertIs(pipeline.reactor, self.gw.reactor)


class ConstructionTests(NoSockets):
    """The assembly's constructor reads no file; start-up does."""

    def setUp(self) -> None:
        super().setUp()
        self.config = load_config(write_config(self))

    def test_missing_files_found_at_start(self) -> None:
        """Certificate and key files that vanished after loading: the constructor does not
        notice, privileged start-up fails with one line naming the listener, and nothing
        stays bound."""
        config = self.config
        missing = Path(self.mktemp()) / "gone.pem"
        tls = attrs.evolve(config.listeners[0].tls, certificate=missing)  # type: ignore[misc]
        listeners = (attrs.evolve(config.listeners[0], tls=tls), *config.listeners[1:])
        config = attrs.evolve(config, listeners=listeners)
        reactor = MemoryReactorClock()
        service = GatewayService(config, reactor, install_signal_handlers=False)
        self.assertEqual(reactor.tcpServers, [])
        with self.assertRaises(StartupError) as caught:
            service.privilegedStartService()
        self.assertIn("listener scrape", str(caught.exception))
        self.assertIn(str(missing), str(caught.exception))

    def test_audit_key_read_at_start(self) -> None:
        """The audit key file is read when start-up begins, not before."""
        missing = Path(self.mktemp()) / "audit.key"
        config = attrs.evolve(self.config, audit=attrs.evolve(self.config.audit, key_file=missing))
        reactor = MemoryReactorClock()
        service = GatewayService(config, reactor, install_signal_handlers=False)
        with self.assertRaises(StartupError) as caught:
            service.privilegedStartService()
        self.assertIn(f"audit key file {missing}", str(caught.exception))
        self.assertTrue(all(s.port is None or not s.running for s in service.listeners))

    def test_injected_audit_sink_started_with_gateway(self) -> None:
        """An injected sink that is a service starts and stops with the gateway."""
        sink = MemoryAuditLog()
        service = GatewayService(
            self.config, MemoryReactorClock(), audit_sink=sink, install_signal_handlers=False
        )
        service.privilegedStartService()
        service.startService()
        self.assertTrue(sink.running)
        self.successResultOf(service.stopService())
        self.assertEqual([e.event for e in sink.events], ["start", "stop"])


EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "test_integrator.py"


def run_trial(test_file: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m twisted.trial FILE`` in ``cwd``, importing the same promgate as we do."""
    import promgate

    env = dict(os.environ)
    root = str(Path(promgate.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "twisted.trial", str(test_file)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


class IntegratorExampleTests(SynchronousTestCase):
    """docs/examples/test_integrator.py runs as an integrator runs it: from another
    directory, with nothing but promgate importable, and it refuses sockets."""

    def test_example_passes(self) -> None:
        """trial runs the example from an unrelated directory, and it passes."""
        cwd = Path(self.mktemp()).resolve()
        cwd.mkdir(parents=True)
        result = run_trial(EXAMPLE, cwd)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("PASSED (successes=2)", result.stdout)

    def test_example_fails_on_a_socket(self) -> None:
        """A test in the example that opens a socket fails, loudly."""
        cwd = Path(self.mktemp()).resolve()
        cwd.mkdir(parents=True)
        copy = cwd / "test_integrator_socket.py"
        copy.write_text(
            EXAMPLE.read_text()
            + textwrap.dedent(
                """

                class OpensASocket(IntegratorTests):
                    def test_socket(self) -> None:
                        socket.create_connection(("127.0.0.1", 9))
                """
            )
        )
        result = run_trial(copy, cwd)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("this test must not open a socket", result.stdout)
        self.assertIn("FAILED", result.stdout)
