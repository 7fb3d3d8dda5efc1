"""Integration: how the real ``twistd promgate`` starts, refuses to start, and stops.

A second instance on the same ports, an address that is not local, a missing socket folder,
a port number that does not fit and an unusable audit file each end start-up with one line
and a non-zero status, leaving nothing behind (and the first instance's audit log
untouched). SIGTERM with scrapes in flight delivers every answer the audit log records,
while the admin listener reports the gateway leaving. ``--version`` names promgate.
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
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.trial.unittest import SynchronousTestCase

import promgate
from promgate import cli
from promgate.testing import (
    FakeExporter,
    GatewayProcess,
    StartFailure,
    TestPKI,
    https_connection,
    run_twistd,
)
from promgate.testing.integration import eventually, q, run_cli, workdir

T = TypeVar("T")
#: How ``twistd`` ends after SIGTERM: it re-raises the signal once the reactor has stopped.
STOPPED = (0, -signal.SIGTERM)
KiB = 1024
MiB = 1024 * KiB


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


class StartupFailureTests(SynchronousTestCase):
    """What only start-up can find out ends it with one line on standard error, exit
    status 1, no traceback, and nothing written: no ready file, no ``start`` record."""

    def setUp(self) -> None:
        self.directory = workdir("startup")
        self.pki = TestPKI(self.directory / "pki")
        self.audit_log = self.directory / "audit.jsonl"

    def refused(self, name: str, config: str) -> StartFailure:
        """Start a gateway that must refuse to start; its failure, checked for the
        properties every refused start shares."""
        failure = GatewayProcess(self.directory / name, config).start_expecting_failure()
        self.assertNotEqual(failure.returncode, 0)
        self.assertNotIn("Traceback", failure.stderr + failure.log)
        self.assertEqual(len(failure.stderr.splitlines()), 1, failure.stderr)
        return failure

    def assert_no_start_record(self) -> None:
        starts = [r for r in audit_records(self.audit_log) if r["event"] == "start"]
        self.assertEqual(starts, [])

    def test_second_instance(self) -> None:
        """A second gateway on the first one's ports says which listener and address are
        in use, and leaves the first one's audit log exactly as it was."""
        exporter = FakeExporter({"/metrics": b"up 1\n"})
        self.addCleanup(exporter.stop)
        first = GatewayProcess(
            self.directory / "first", gateway_config(self.pki, self.audit_log, exporter.address)
        )
        self.addCleanup(first.stop)
        first.start()
        scrape, admin = first.address("scrape"), first.address("admin")
        before = self.audit_log.read_bytes()
        failure = self.refused(
            "second",
            gateway_config(
                self.pki,
                self.audit_log,
                exporter.address,
                scrape="tcp:{}:interface=127.0.0.1".format(scrape.rpartition(":")[2]),
                admin="tcp:{}:interface=127.0.0.1".format(admin.rpartition(":")[2]),
            ),
        )
        self.assertEqual(failure.stderr, f"listener scrape: {scrape}: address already in use\n")
        self.assertEqual(self.audit_log.read_bytes(), before)
        self.assertEqual(ready_status(first), 200)
        self.assertIn(first.stop(), STOPPED)
        self.assertIn("clean stop", verify(self, self.pki, self.audit_log))

    def test_audit_log_in_use(self) -> None:
        """A second gateway on other ports but the same audit log is refused by the log's
        lock, names the running gateway's pid, and writes not one byte into the log."""
        exporter = FakeExporter({"/metrics": b"up 1\n"})
        self.addCleanup(exporter.stop)
        first = GatewayProcess(
            self.directory / "first", gateway_config(self.pki, self.audit_log, exporter.address)
        )
        self.addCleanup(first.stop)
        first.start()
        assert first.process is not None
        before = self.audit_log.read_bytes()
        failure = self.refused("second", gateway_config(self.pki, self.audit_log, exporter.address))
        self.assertEqual(
            failure.stderr,
            f"audit log {self.audit_log} is in use by another promgate (pid {first.process.pid})\n",
        )
        self.assertEqual(self.audit_log.read_bytes(), before)
        self.assertEqual(ready_status(first), 200)
        self.assertIn(first.stop(), STOPPED)
        self.assertIn("clean stop", verify(self, self.pki, self.audit_log))

    def test_address_not_local(self) -> None:
        """An interface address this host does not have."""
        failure = self.refused(
            "gateway",
            gateway_config(
                self.pki, self.audit_log, "127.0.0.1:9100", scrape="tcp:9443:interface=10.9.9.9"
            ),
        )
        self.assertEqual(
            failure.stderr, "listener scrape: 10.9.9.9:9443: cannot assign requested address\n"
        )
        self.assert_no_start_record()

    def test_socket_folder_missing(self) -> None:
        """A unix socket in a folder that does not exist."""
        folder = self.directory / "missing"
        failure = self.refused(
            "gateway",
            gateway_config(
                self.pki, self.audit_log, "127.0.0.1:9100", scrape=f"unix:{folder}/scrape.sock"
            ),
        )
        self.assertEqual(
            failure.stderr,
            f"listener scrape: {folder}/scrape.sock: folder {folder} does not exist\n",
        )
        self.assert_no_start_record()

    def test_port_out_of_range(self) -> None:
        """A port number that does not fit in 16 bits."""
        failure = self.refused(
            "gateway",
            gateway_config(
                self.pki, self.audit_log, "127.0.0.1:9100", admin="tcp:99999999999999999999"
            ),
        )
        self.assertEqual(
            failure.stderr,
            "listener admin: tcp:99999999999999999999: port number must be 0-65535\n",
        )
        self.assert_no_start_record()

    def test_audit_path_is_a_directory(self) -> None:
        """An audit log path that names a directory: the line names the file."""
        self.audit_log.mkdir()
        failure = self.refused(
            "gateway", gateway_config(self.pki, self.audit_log, "127.0.0.1:9100")
        )
        self.assertTrue(failure.stderr.startswith(f"audit log {self.audit_log}"), failure.stderr)
        self.assertEqual(list(self.audit_log.iterdir()), [])


class EntryPointTests(SynchronousTestCase):
    """Both entry points name promgate's version; the command's help is plain text."""

    def test_twistd_version(self) -> None:
        """``twistd promgate --version`` prints promgate's version as well as Twisted's."""
        done = run_twistd("promgate", "--version")
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertIn(f"promgate {promgate.__version__}", lines)
        self.assertTrue(any(line.startswith("Twisted version:") for line in lines), lines)

    def test_cli_version(self) -> None:
        """``promgate --version``."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as exited:
            cli.main(["--version"])
        self.assertEqual(exited.exception.code, 0)
        self.assertEqual(out.getvalue(), f"promgate {promgate.__version__}\n")

    def test_help_is_plain_text(self) -> None:
        """``promgate --help`` (and each command's) shows no reStructuredText markup."""
        top = cli.parser()
        helps = [top.format_help()]
        pending = [top]
        while pending:  # bounded: the parser tree is finite
            for action in pending.pop()._actions:
                choices = getattr(action, "choices", None)
                if isinstance(choices, dict):  # sub-commands
                    helps.extend(parser.format_help() for parser in choices.values())
                    pending.extend(choices.values())
        self.assertGreater(len(helps), 5)
        for text in helps:
            for markup in ("``", ":func:", ":class:", ".. "):
                self.assertNotIn(markup, text)
        self.assertIn("twistd -n promgate --config FILE", helps[0])
