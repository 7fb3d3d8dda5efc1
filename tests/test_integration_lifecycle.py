"""Integration: how the real ``twistd promgate`` starts, refuses to start, and stops.

A second instance on the same ports, an address that is not local, a missing socket folder
and an unusable audit file each end start-up with one line and a non-zero status, leaving
the first instance's audit log untouched. SIGTERM with scrapes in flight delivers every
answer the audit log records, while the admin listener reports the gateway leaving.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import signal
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.trial.unittest import SynchronousTestCase

from promgate import cli
from promgate.testing import FakeExporter, GatewayProcess, TestPKI, https_connection

T = TypeVar("T")
#: How ``twistd`` ends after SIGTERM: it re-raises the signal once the reactor has stopped.
STOPPED = (0, -signal.SIGTERM)
KiB = 1024
MiB = 1024 * KiB


def workdir(name: str) -> Path:
    """A fresh directory under trial's working directory, kept for post-mortems."""
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=os.getcwd()))


def q(value: Any) -> str:
    """A YAML scalar (JSON is YAML) for paths interpolated into configurations."""
    return json.dumps(str(value))


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 15.0) -> T:
    """Poll ``probe`` (bounded) until it returns something."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout}s waiting for {what}")
        time.sleep(0.02)


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``promgate ARGV...`` in process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def gateway_config(
    pki: TestPKI,
    audit_log: Path,
    upstream: str,
    *,
    scrape: str = "tcp:0:interface=127.0.0.1",
    admin: str = "tcp:0:interface=127.0.0.1",
) -> str:
    """One mutual-TLS ``http`` listener, an admin listener and one route to ``upstream``."""
    return f"""
tls: {{certificate: {q(pki.gate_cert)}, key: {q(pki.gate_key)}, client_ca: {q(pki.ca_cert)}}}
admin: {{endpoint: {q(admin)}}}
listeners:
  - {{name: scrape, endpoint: {q(scrape)}}}
identities:
  prometheus: {{cert: {{uri: "spiffe://promgate.local/prometheus"}}, roles: [scraper]}}
routes:
  node: {{allow: ["role:scraper"], paths: [/metrics], targets: {{static: ["{upstream}"]}}}}
audit: {{path: {q(audit_log)}, key_file: {q(pki.audit_key)}}}
"""


def verify(case: SynchronousTestCase, pki: TestPKI, audit_log: Path) -> str:
    """``promgate audit verify`` accepts ``audit_log``; its report."""
    code, out, err = run_cli("audit", "verify", "--key-file", str(pki.audit_key), str(audit_log))
    case.assertEqual(code, 0, err)
    return out


def audit_records(path: Path) -> list[dict[str, Any]]:
    """The complete records of an audit log (a line still being written is left out)."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def answers_recorded(path: Path) -> list[dict[str, Any]]:
    """The ``request`` records of answers relayed whole: ``ok`` with status 200."""
    return [
        r
        for r in audit_records(path)
        if r["event"] == "request" and r.get("reason") == "ok" and r.get("status") == 200
    ]


def ready_status(gateway: GatewayProcess, path: str = "/-/ready") -> int | None:
    """The admin listener's answer to ``path``, or None if it does not answer."""
    try:
        return gateway.get("admin", path, None, timeout=5).status
    except OSError:
        return None


def refuses(address: str) -> bool:
    """Whether a connection to ``address`` is refused (nothing listens there)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@attrs.define
class Scrape:
    """One scrape over its own TLS connection, as the client saw it."""

    local: str = ""  # the client's address, as the gateway's audit records name the peer
    status: int | None = None
    body: bytes = b""
    error: str | None = None


def scrape(
    address: str,
    path: str,
    context: ssl.SSLContext,
    result: Scrape,
    before_reading: Callable[[Scrape], object] | None = None,
) -> None:
    """Run one scrape, filling in ``result`` (errors included) instead of raising.

    ``before_reading`` runs once the request is sent and before anything is read: a
    client that is slow to read its answer. Its small receive buffer keeps most of an
    unread answer on the gateway's side of the connection.
    """
    host, _, port = address.rpartition(":")
    conn = https_connection(address, context, timeout=60)
    try:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * KiB)
        raw.settimeout(60)
        try:
            raw.connect((host, int(port)))
            conn.sock = context.wrap_socket(raw, server_hostname=host)
        except BaseException:
            raw.close()
            raise
        result.local = "{}:{}".format(*conn.sock.getsockname()[:2])
        conn.request("GET", path)
        if before_reading is not None:
            before_reading(result)
        resp = conn.getresponse()
        result.status = resp.status
        result.body = resp.read()
    except (OSError, http.client.HTTPException) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()


class ShutdownFlushTests(SynchronousTestCase):
    """SIGTERM with scrapes in flight: every answer the audit log records as ``ok 200``
    reaches its client whole, even a client that starts reading it only once every
    answer is recorded (when the last exchange has ended and the drain is over)."""

    ROUNDS = 5
    CLIENTS = 20

    def test_every_recorded_answer_delivered(self) -> None:
        """Rounds of concurrent slow scrapes answered during the drain: each one the audit
        log records as ``ok 200`` arrived complete at the client it names."""
        directory = workdir("flush")
        pki = TestPKI(directory / "pki")
        for round_ in range(self.ROUNDS):
            self.drain_round(pki, directory, round_)

    def drain_round(self, pki: TestPKI, directory: Path, round_: int) -> None:
        """One gateway, CLIENTS scrapes held upstream, SIGTERM, then the answers: half the
        clients read theirs at once, half only once the audit log has recorded them all."""
        body = os.urandom(MiB)
        exporter = FakeExporter({"/metrics": "held"}, {"/metrics": body})
        self.addCleanup(exporter.stop)
        audit_log = directory / f"audit-{round_}.jsonl"
        gateway = GatewayProcess(
            directory / f"gateway-{round_}", gateway_config(pki, audit_log, exporter.address)
        )
        self.addCleanup(gateway.stop)
        gateway.start()
        context = pki.client_context("prometheus")
        path = "/scrape?route=node&target=" + exporter.address.replace(":", "%3A")
        results = [Scrape() for _ in range(self.CLIENTS)]

        def every_answer_recorded(result: Scrape) -> None:
            eventually(
                lambda: len(answers_recorded(audit_log)) >= self.CLIENTS or None,
                "every answer to be recorded",
                timeout=30,
            )

        workers = [
            threading.Thread(
                target=scrape,
                args=(
                    gateway.address("scrape"),
                    path,
                    context,
                    r,
                    every_answer_recorded if i % 2 else None,
                ),
                daemon=True,
            )
            for i, r in enumerate(results)
        ]
        for worker in workers:
            worker.start()
        eventually(
            lambda: len(exporter.requests) >= self.CLIENTS or None,
            "every scrape to reach the upstream",
        )
        gateway.terminate()
        # The scrapes are answered only once the gateway has stopped accepting.
        eventually(lambda: refuses(gateway.address("scrape")) or None, "the listener to close")
        exporter.release()
        for worker in workers:
            worker.join(60)
        self.assertIn(gateway.wait(60), STOPPED)

        by_peer = {r.local: r for r in results}
        records = audit_records(audit_log)
        delivered = answers_recorded(audit_log)
        for record in delivered:
            seen = by_peer[record["peer"]]
            self.assertEqual(
                (seen.status, len(seen.body), seen.error),
                (200, len(body), None),
                f"round {round_}: recorded ok 200 for {record['peer']}",
            )
            self.assertEqual(seen.body, body)
        self.assertEqual(len(delivered), self.CLIENTS, f"round {round_}")
        self.assertEqual(records[-1]["event"], "stop")
        verify(self, pki, audit_log)
        exporter.stop()


class ShutdownReadinessTests(SynchronousTestCase):
    """During the drain the admin listener stays up: ``/-/ready`` 503, ``/-/healthy`` 200."""

    def test_ready_503_until_drained(self) -> None:
        """While a scrape is held upstream after SIGTERM, the scrape listener no longer
        accepts, ``/-/ready`` answers 503 and ``/-/healthy`` 200; once the scrape is
        answered, the gateway exits and the admin listener is gone."""
        directory = workdir("ready")
        pki = TestPKI(directory / "pki")
        exporter = FakeExporter({"/metrics": "held"}, {"/metrics": b"up 1\n"})
        self.addCleanup(exporter.stop)
        audit_log = directory / "audit.jsonl"
        gateway = GatewayProcess(
            directory / "gateway", gateway_config(pki, audit_log, exporter.address)
        )
        self.addCleanup(gateway.stop)
        gateway.start()
        self.assertEqual(ready_status(gateway), 200)
        result = Scrape()
        path = "/scrape?route=node&target=" + exporter.address.replace(":", "%3A")
        worker = threading.Thread(
            target=scrape,
            args=(gateway.address("scrape"), path, pki.client_context("prometheus"), result),
            daemon=True,
        )
        worker.start()
        eventually(lambda: exporter.requests or None, "the scrape to reach the upstream")
        gateway.terminate()
        eventually(lambda: ready_status(gateway) == 503 or None, "/-/ready to answer 503")
        self.assertEqual(ready_status(gateway, "/-/healthy"), 200)
        self.assertTrue(refuses(gateway.address("scrape")))
        self.assertEqual(ready_status(gateway), 503)  # still draining: the scrape is held
        exporter.release()
        worker.join(30)
        self.assertEqual((result.status, result.body, result.error), (200, b"up 1\n", None))
        self.assertIn(gateway.wait(30), STOPPED)
        self.assertIsNone(ready_status(gateway))
        self.assertIn("clean stop", verify(self, pki, audit_log))
