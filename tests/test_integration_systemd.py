"""Integration: the real ``twistd promgate`` as systemd runs it, on 127.0.0.1: told where to
notify (``$NOTIFY_SOCKET``), given a listening socket (socket activation), and behind a front
load balancer that sends PROXY protocol headers."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from promgate.net.proxyproto import encode_v2
from promgate.testing import FakeExporter, GatewayProcess, TestPKI
from promgate.testing.clients import https_get
from promgate.testing.integration import (
    Shared,
    cleanups,
    q,
    scrape_path,
    tls_section,
    workdir,
)
from promgate.testing.systemd import NotifySocket, listening_socket, socket_activation

BODY = b"# TYPE up gauge\nup 1\n"


class _Gateway:
    """One gateway started as systemd would: a notification socket, and the ``scrape``
    listener's socket passed by name; a ``front`` listener behind ``haproxy:``."""

    def __init__(self) -> None:
        self.dir = workdir("systemd")
        self.pki = TestPKI(self.dir / "pki")
        self.exporter = FakeExporter({"/metrics": BODY})
        self.notify = NotifySocket(Path(tempfile.mkdtemp(prefix="sd-")) / "notify")
        self.passed = listening_socket()
        self.passed_address = f"127.0.0.1:{self.passed.getsockname()[1]}"
        self.audit_log = self.dir / "audit.jsonl"
        config = (
            tls_section(self.pki)
            + f"""
admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
listeners:
  - {{name: scrape, endpoint: "systemd:domain=INET:name=scrape"}}
  - {{name: front, endpoint: "haproxy:tcp:0:interface=127.0.0.1"}}
identities:
  prometheus: {{cert: {{uri: "spiffe://promgate.local/prometheus"}}}}
routes:
  node: {{allow: [prometheus], targets: {{static: ["{self.exporter.address}"]}}}}
audit: {{path: {q(self.audit_log)}, key_file: {q(self.pki.audit_key)}}}
"""
        )
        activation = socket_activation(self.passed, "scrape")
        self.gateway = GatewayProcess(
            self.dir / "gateway",
            config,
            env={**activation.env, "NOTIFY_SOCKET": self.notify.address},
            pass_fds=activation.pass_fds,
            prelude=activation.prelude,
        )
        cleanups.append(self.stop)
        self.gateway.start()
        self.passed.close()  # the gateway holds it now
        self.context = self.pki.client_context("prometheus")

    def stop(self) -> None:
        self.gateway.stop()
        self.exporter.stop()
        self.notify.close()


_gateway = Shared(_Gateway)


def proxied_scrape(address: str, header: bytes, context: ssl.SSLContext, path: str) -> bytes:
    """Send ``header`` on a fresh connection, then one scrape over TLS; the answer."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(header)
        with context.wrap_socket(sock, server_hostname=host) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: gate\r\nConnection: close\r\n\r\n".encode())
            received = b""
            while len(received) < 1 << 16:  # bounded: the answer is far smaller
                data = tls.recv(65536)
                if not data:
                    break
                received += data
    return received


class SystemdTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.env = _gateway.get()

    def test_ready_after_bind(self) -> None:
        """READY=1 comes once every listener is bound (the ready file is written first),
        with a status naming the listeners."""
        message = self.env.notify.wait_for("READY")
        self.assertEqual(message["READY"], "1")
        self.assertIn(f"scrape {self.env.passed_address}", message["STATUS"])
        self.assertIn("front 127.0.0.1:", message["STATUS"])
        listeners = json.loads(self.env.gateway.ready_file.read_text())["listeners"]
        self.assertEqual(listeners["scrape"], self.env.passed_address)

    def test_scrape_on_passed_socket(self) -> None:
        """The scrape listener serves on the socket it was given."""
        target = self.env.exporter.address
        response = https_get(self.env.passed_address, scrape_path("node", target), self.env.context)
        self.assertEqual((response.status, response.body), (200, BODY))

    def test_proxied_v1_audited_with_client_address(self) -> None:
        """Behind haproxy:, the audit record names the client the PROXY header names."""
        answer = proxied_scrape(
            self.env.gateway.address("front"),
            b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n",
            self.env.context,
            scrape_path("node", self.env.exporter.address),
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:200])
        self.assertTrue(answer.endswith(BODY))
        record = self.env.gateway.wait_for_audit_record(
            self.env.audit_log,
            lambda r: r.get("listener") == "front" and r.get("peer") == "203.0.113.7:51234",
        )
        self.assertEqual((record["decision"], record["status"]), ("allow", 200))
        self.assertEqual(record["identity"], "prometheus")

    def test_proxied_v2(self) -> None:
        answer = proxied_scrape(
            self.env.gateway.address("front"),
            encode_v2(("2001:db8::7", 40001), ("2001:db8::1", 443)),
            self.env.context,
            scrape_path("node", self.env.exporter.address),
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:200])
        self.env.gateway.wait_for_audit_record(
            self.env.audit_log, lambda r: r.get("peer") == "[2001:db8::7]:40001"
        )

    def test_no_header_cut(self) -> None:
        """A client that skips the header (a TLS ClientHello first) is cut before any
        handshake."""
        address = self.env.gateway.address("front")
        with self.assertRaises((ssl.SSLError, ConnectionError, OSError)):
            https_get(address, "/-/ready", self.env.context, timeout=10)


class StopTests(SynchronousTestCase):
    """RELOADING=1 then READY=1 around a SIGHUP reload; STOPPING=1 when SIGTERM begins the
    shutdown."""

    def test_stopping(self) -> None:
        directory = workdir("systemd-stop")
        pki = TestPKI(directory / "pki")
        notify = NotifySocket(Path(tempfile.mkdtemp(prefix="sd-")) / "notify")
        self.addCleanup(notify.close)
        config = f"""
admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
listeners:
  - {{name: plain, endpoint: "tcp:0:interface=127.0.0.1", tls: false}}
routes: {{}}
audit: {{path: {q(directory / "audit.jsonl")}, key_file: {q(pki.audit_key)}}}
"""
        gateway = GatewayProcess(
            directory / "gateway", config, env={"NOTIFY_SOCKET": notify.address}
        )
        self.addCleanup(gateway.stop)
        gateway.start()
        self.assertEqual(notify.wait_for("READY")["READY"], "1")
        self.assertNotIn("STOPPING", str(notify.messages))
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING")
        self.assertTrue(reloading["MONOTONIC_USEC"].isdigit())
        after = notify.messages.index(reloading) + 1
        self.assertEqual(notify.wait_for("READY", after=after)["READY"], "1")
        gateway.terminate()
        self.assertEqual(notify.wait_for("STOPPING")["STOPPING"], "1")
        gateway.wait()  # twistd ends with the signal's status once it has stopped
        records = gateway.audit_records(directory / "audit.jsonl")
        self.assertEqual(records[-1]["event"], "stop")

    def test_missing_socket(self) -> None:
        """A systemd: listener whose socket was not passed stops start-up with one line."""
        directory = workdir("systemd-missing")
        pki = TestPKI(directory / "pki")
        config = f"""
admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
listeners:
  - {{name: plain, endpoint: "systemd:domain=INET:index=0", tls: false}}
routes: {{}}
audit: {{path: {q(directory / "audit.jsonl")}, key_file: {q(pki.audit_key)}}}
"""
        failure = GatewayProcess(directory / "gateway", config).start_expecting_failure()
        self.assertEqual(failure.returncode, 1)
        self.assertIn(
            "listener plain: systemd:domain=INET:index=0: systemd passed no sockets",
            failure.stderr,
        )
        self.assertFalse((directory / "audit.jsonl").exists())
