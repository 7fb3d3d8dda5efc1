"""Integration: ``workers: 2`` under the real ``twistd promgate``: a supervisor that binds
once and two worker processes that share the listeners.

Which worker served a request is seen in its audit log: each worker keeps a chain of its
own, so the file a request's record is in names the worker, and the record's ``peer``
names the client's connection.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from promgate.testing import FakeExporter, GatewayProcess, TestPKI, https_connection
from promgate.testing.clients import request
from promgate.testing.integration import (
    closed_port,
    eventually,
    http_get,
    metric_samples,
    q,
    run_cli,
    scrape_path,
    workdir,
)
from promgate.testing.systemd import NotifySocket, listening_socket, socket_activation

#: How ``twistd`` ends after SIGTERM: it re-raises the signal once the reactor has stopped.
STOPPED = (0, -signal.SIGTERM)


def config(
    pki: TestPKI,
    directory: Path,
    upstream: str,
    *,
    allow: str = "role:scraper",
    admin: str = "tcp:0:interface=127.0.0.1",
) -> str:
    """Two workers, one mutual-TLS ``http`` listener and one route to ``upstream``."""
    return f"""
workers: 2
tls: {{certificate: {q(pki.gate_cert)}, key: {q(pki.gate_key)}, client_ca: {q(pki.ca_cert)}}}
admin: {{endpoint: {q(admin)}}}
listeners:
  - {{name: scrape, endpoint: "tcp:0:interface=127.0.0.1"}}
identities:
  prometheus: {{cert: {{uri: "spiffe://promgate.local/prometheus"}}, roles: [scraper]}}
  ops: {{cert: {{cn: ops}}}}
routes:
  node: {{allow: [{q(allow)}], paths: [/metrics], targets: {{static: ["{upstream}"]}}}}
audit: {{path: {q(directory / "audit.jsonl")}, key_file: {q(pki.audit_key)}}}
"""


def records(directory: Path) -> dict[str, list[dict[str, Any]]]:
    """Every worker's complete audit records, by file name."""
    found = {}
    for path in sorted(directory.glob("audit*.jsonl")):
        text = path.read_text()
        found[path.name] = [json.loads(line) for line in text.splitlines() if line.endswith("}")]
    return found


def served_by(directory: Path, peer: str) -> str | None:
    """The audit file (so the worker) holding the request record of ``peer``."""
    for name, recs in records(directory).items():
        if any(r["event"] == "request" and r.get("peer") == peer for r in recs):
            return name
    return None


def ready_pids(gateway: GatewayProcess) -> list[int]:
    pids: list[int] = json.loads(gateway.ready_file.read_text())["workers"]
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class WorkersTestCase(SynchronousTestCase):
    """A two-worker gateway before each test, stopped after."""

    def setUp(self) -> None:
        self.directory = workdir(self.mktemp())
        self.pki = TestPKI(self.directory / "pki")
        self.exporter = FakeExporter({"/metrics": b"up 1\n"})
        self.addCleanup(self.exporter.stop)
        self.context = self.pki.client_context("prometheus")
        self.path = scrape_path("node", self.exporter.address)

    def start(self, **kw: Any) -> GatewayProcess:
        gateway = GatewayProcess(
            self.directory, config(self.pki, self.directory, self.exporter.address, **kw)
        )
        self.addCleanup(gateway.stop)
        return gateway.start()

    def held_connections(
        self,
        gateway: GatewayProcess,
        context: ssl.SSLContext,
        count: int = 8,
        listener: str = "scrape",
    ) -> list[tuple[Any, int, str]]:
        """``count`` keep-alive connections opened at once to ``listener``, one scrape
        made on each: (connection, status, audit file of the worker that serves it)."""
        conns = [https_connection(gateway.address(listener), context) for _ in range(count)]
        threads = [threading.Thread(target=c.connect) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        out = []
        for conn in conns:
            self.addCleanup(conn.close)
            status = request(conn, self.path).status
            peer = "{}:{}".format(*conn.sock.getsockname()[:2])
            worker = eventually(lambda p=peer: served_by(self.directory, p), f"record of {peer}")
            out.append((conn, status, worker))
        return out

    def both_workers(
        self, gateway: GatewayProcess, context: ssl.SSLContext, listener: str = "scrape"
    ) -> list[tuple[Any, int, str]]:
        """Connections until each worker has served at least one. The kernel hands a
        shared accept queue's connections to whichever worker wakes first, which may be
        the same one every time; so when one batch went to one worker, that worker is
        stopped for the next, which the other must then accept."""
        seen = self.held_connections(gateway, context, listener=listener)
        served = {w for _, _, w in seen}
        if len(served) == 1:
            (chain,) = served
            busy = ready_pids(gateway)[int(chain.split(".")[1].removeprefix("w"))]
            os.kill(busy, signal.SIGSTOP)
            try:
                seen += self.held_connections(gateway, context, count=2, listener=listener)
            finally:
                os.kill(busy, signal.SIGCONT)
        self.assertEqual(len({w for _, _, w in seen}), 2, "one worker served every connection")
        return seen

    def metrics(self, gateway: GatewayProcess) -> str:
        status, body = http_get(f"http://{gateway.address('admin')}/metrics")
        self.assertEqual(status, 200)
        return body.decode()


class ServingTests(WorkersTestCase):
    def test_both_workers_serve(self) -> None:
        """Two worker processes, each with its own pid, both answer on the one listener;
        the supervisor's /metrics adds up their requests."""
        gateway = self.start()
        pids = ready_pids(gateway)
        self.assertEqual(len(set(pids)), 2)
        self.assertNotIn(gateway.process.pid if gateway.process else 0, pids)
        seen = self.both_workers(gateway, self.context)
        self.assertEqual({status for _, status, _ in seen}, {200})
        self.assertEqual(sorted({w for _, _, w in seen}), ["audit.w0.jsonl", "audit.w1.jsonl"])

        def counted() -> float | None:
            total = sum(
                value
                for labels, value in metric_samples(
                    self.metrics(gateway), "promgate_requests_total"
                )
            )
            return total if total == len(seen) else None

        self.assertEqual(eventually(counted, "every request counted"), len(seen))
        # ... and their audit chains hold one request record for each.
        self.assertEqual(
            sum(
                1
                for recs in records(self.directory).values()
                for r in recs
                if r["event"] == "request"
            ),
            len(seen),
        )
        text = self.metrics(gateway)
        self.assertEqual(
            metric_samples(text, "promgate_workers"),
            [
                ({"state": "starting"}, 0.0),
                ({"state": "ready"}, 2.0),
                ({"state": "unready"}, 0.0),
                ({"state": "stopping"}, 0.0),
                ({"state": "dead"}, 0.0),
            ],
        )
        self.assertNotIn("_created", text)
        self.assertEqual(metric_samples(text, "promgate_ready"), [({}, 1.0)])
        # Each worker's own CPU time and memory, by slot.
        for name in ("promgate_worker_cpu_seconds_total", "promgate_worker_resident_memory_bytes"):
            samples = metric_samples(text, name)
            self.assertEqual(sorted(labels["worker"] for labels, _ in samples), ["0", "1"], name)
            self.assertTrue(all(value > 0 for _, value in samples), samples)
        self.assertEqual(len(metric_samples(text, "promgate_build_info")), 1)

    def test_sigterm_drains_every_worker(self) -> None:
        """SIGTERM (to the supervisor, and to every worker as systemd sends it to the
        whole unit): a scrape in flight on a worker is answered, every worker exits, and
        the supervisor exits as twistd does."""
        self.exporter.routes["/metrics"] = "held"
        self.exporter.bodies["/metrics"] = b"up 1\n"
        gateway = self.start()
        pids = ready_pids(gateway)
        result: dict[str, Any] = {}

        def scrape() -> None:
            try:
                result["status"] = gateway.get("scrape", self.path, self.context).status
            except Exception as e:  # reported below
                result["error"] = repr(e)

        thread = threading.Thread(target=scrape)
        thread.start()
        eventually(lambda: self.exporter.requests or None, "the scrape upstream")
        gateway.terminate()
        for pid in pids:  # as systemd's default KillMode=control-group does
            os.kill(pid, signal.SIGTERM)
        eventually(
            lambda: "draining 1 in-flight request(s)" in gateway.log() or None,
            "the worker with the scrape draining",
        )
        self.exporter.release()
        thread.join(30)
        self.assertEqual(result, {"status": 200})
        self.assertIn(gateway.wait(), STOPPED)
        for pid in pids:
            self.assertFalse(alive(pid), pid)
        # Each worker's chain ends in its stop record, and audit verify checks both.
        code, out, err = run_cli("audit", "verify", "--config", str(gateway.config_path))
        self.assertEqual(code, 0, out + err)
        self.assertIn("OK: 2 chain(s) verified", out)
        for name, recs in records(self.directory).items():
            self.assertEqual(recs[-1]["event"], "stop", name)
            self.assertRegex(recs[0]["detail"] or "", r"^worker [01] of 2", name)


class StartupTests(WorkersTestCase):
    def test_port_in_use(self) -> None:
        """A listener that cannot bind stops the supervisor's start-up with one line,
        before any worker is started."""
        taken = listening_socket()
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        text = config(self.pki, self.directory, self.exporter.address).replace(
            'scrape, endpoint: "tcp:0:interface=127.0.0.1"',
            f'scrape, endpoint: "tcp:{port}:interface=127.0.0.1"',
        )
        failure = GatewayProcess(self.directory, text).start_expecting_failure()
        self.assertEqual(failure.returncode, 1, failure)
        self.assertIn(f"listener scrape: 127.0.0.1:{port}: address already in use", failure.stderr)
        self.assertNotIn("worker 0 started", failure.log)


class ReplacementTests(WorkersTestCase):
    def test_killed_worker_replaced(self) -> None:
        """A worker killed with SIGKILL: the other worker's connections go on serving
        without a failed scrape, and a new worker takes the dead one's slot."""
        gateway = self.start()
        seen = self.both_workers(gateway, self.context)
        pids = ready_pids(gateway)
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        survivors = [conn for conn, _, w in seen if w == "audit.w1.jsonl"]
        self.assertTrue(survivors)
        for conn in survivors:
            self.assertEqual(request(conn, self.path).status, 200)

        def replaced() -> list[int] | None:
            if not gateway.ready_file.exists():
                return None
            now = ready_pids(gateway)
            return now if now[0] != victim else None

        now = eventually(replaced, "a replacement worker", timeout=30)
        self.assertEqual(now[1], pids[1])
        self.assertIn(f"worker 0 (pid {victim}) died: signal 9 (SIGKILL)", gateway.log())
        text = self.metrics(gateway)
        self.assertEqual(metric_samples(text, "promgate_worker_restarts_total"), [({}, 1.0)])
        # The replacement serves too.
        seen = self.both_workers(gateway, self.context)
        self.assertEqual({status for _, status, _ in seen}, {200})

    def test_worker_ending_by_itself_keeps_unix_socket(self) -> None:
        """A worker that ends on its own (SIGTERM to it alone: it drains and exits 0) is
        replaced too, and a unix listener's socket file stays for the other worker."""
        socket_path = Path(tempfile.mkdtemp(prefix="pg-")) / "scrape.sock"
        text = config(self.pki, self.directory, self.exporter.address).replace(
            'scrape, endpoint: "tcp:0:interface=127.0.0.1"',
            f"scrape, endpoint: {q('unix:' + str(socket_path))}",
        )
        gateway = GatewayProcess(self.directory, text)
        self.addCleanup(gateway.stop)
        gateway.start()
        pids = ready_pids(gateway)
        os.kill(pids[1], signal.SIGTERM)
        eventually(lambda: not alive(pids[1]) or None, "worker 1 gone")
        self.assertTrue(socket_path.exists())

        def replaced() -> list[int] | None:
            now = ready_pids(gateway) if gateway.ready_file.exists() else pids
            return now if now[1] != pids[1] else None

        eventually(replaced, "a replacement worker", timeout=30)
        self.assertTrue(socket_path.exists())
        self.assertIn(f"worker 1 (pid {pids[1]}) died: exit code 0", gateway.log())
        for _ in range(4):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.addCleanup(client.close)
            client.settimeout(30)
            client.connect(str(socket_path))
            tls = self.context.wrap_socket(client, server_hostname="127.0.0.1")
            tls.sendall(
                f"GET {self.path} HTTP/1.1\r\nHost: gate\r\nConnection: close\r\n\r\n".encode()
            )
            self.assertTrue(tls.recv(64).startswith(b"HTTP/1.1 200"))
            tls.close()

    def test_ready_only_when_every_worker_is(self) -> None:
        """/-/ready answers 503 while one worker cannot start (its audit log cannot be
        opened), and 200 once it has been replaced by one that starts."""
        blocked = self.directory / "audit.w1.jsonl"
        blocked.mkdir()
        admin = f"127.0.0.1:{closed_port()}"
        gateway = GatewayProcess(
            self.directory,
            config(
                self.pki,
                self.directory,
                self.exporter.address,
                admin=f"tcp:{admin.split(':')[1]}:interface=127.0.0.1",
            ),
        )
        self.addCleanup(gateway.stop)
        gateway._spawn()

        def status() -> int | None:
            try:
                return http_get(f"http://{admin}/-/ready")[0]
            except OSError:
                return None

        def died_twice() -> bool | None:
            return gateway.log().count("worker 1 (pid") >= 3 or None

        eventually(died_twice, "worker 1 failing to start", timeout=30)
        self.assertEqual(status(), 503)
        self.assertFalse(gateway.ready_file.exists())
        blocked.rmdir()
        eventually(lambda: status() == 200 or None, "every worker ready", timeout=60)
        self.assertTrue(gateway.ready_file.exists())


class ReloadTests(WorkersTestCase):
    def test_reload_reaches_every_worker(self) -> None:
        """/-/reload on the supervisor: every worker serves the new policy; a reload
        that cannot be applied is refused (500) and both keep the old one."""
        gateway = self.start()
        admin = gateway.address("admin")
        config_path = gateway.config_path
        good = config_path.read_text()
        config_path.write_text(good.replace("routes:", "routes:\n  broken: {}\n", 1))
        bad = http_post(admin, "/-/reload")
        self.assertEqual(bad[0], 500, bad)
        seen = self.both_workers(gateway, self.context)
        self.assertEqual({status for _, status, _ in seen}, {200})
        config_path.write_text(good.replace('allow: ["role:scraper"]', "allow: [ops]"))
        status, body = http_post(admin, "/-/reload")
        self.assertEqual(status, 200, body)
        self.assertIn(b"reloaded", body)
        seen = self.both_workers(gateway, self.context)
        self.assertEqual({status for _, status, _ in seen}, {403})

        def audited() -> list[list[str]] | None:
            reloads = [
                [r["decision"] for r in recs if r["event"] == "reload"]
                for recs in records(self.directory).values()
            ]
            return reloads if all(len(r) == 2 for r in reloads) else None

        self.assertEqual(
            eventually(audited, "both reloads audited"), [["deny", "allow"], ["deny", "allow"]]
        )


class ReloadBindTests(WorkersTestCase):
    def test_bind_failure_refuses(self) -> None:
        """A reload whose new listener cannot be bound is refused by the supervisor,
        before any worker is asked: 500, both keep serving, and each audits the refusal."""
        gateway = self.start()
        taken = listening_socket()
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        gateway.config_path.write_text(
            gateway.config_path.read_text().replace(
                "listeners:\n",
                f'listeners:\n  - {{name: more, endpoint: "tcp:{port}:interface=127.0.0.1"}}\n',
            )
        )
        status, body = http_post(gateway.address("admin"), "/-/reload")
        self.assertEqual(status, 500, body)
        self.assertIn(f"listener more: 127.0.0.1:{port}: address already in use".encode(), body)
        seen = self.both_workers(gateway, self.context)
        self.assertEqual({status for _, status, _ in seen}, {200})
        refused = ("deny", f"listener more: 127.0.0.1:{port}: address already in use")

        def audited() -> list[list[tuple[str, str]]] | None:
            reloads = [
                [(r["decision"], r["detail"]) for r in recs if r["event"] == "reload"]
                for recs in records(self.directory).values()
            ]
            return reloads if all(reloads) else None

        self.assertEqual(eventually(audited, "the refusal audited"), [[refused], [refused]])


class MovedListenerTests(WorkersTestCase):
    def test_listener_added_and_moved(self) -> None:
        """A reload that adds a listener and moves another: the supervisor binds the new
        sockets and hands them to every worker, which serve on them; the old address
        is closed."""
        gateway = self.start()
        admin = gateway.address("admin")
        old = gateway.address("scrape")
        text = gateway.config_path.read_text().replace(
            '  - {name: scrape, endpoint: "tcp:0:interface=127.0.0.1"}',
            f'  - {{name: scrape, endpoint: "tcp:{closed_port()}:interface=127.0.0.1"}}\n'
            '  - {name: more, endpoint: "tcp:0:interface=127.0.0.1"}',
        )
        gateway.config_path.write_text(text)
        status, body = http_post(admin, "/-/reload")
        self.assertEqual(status, 200, body)
        gateway.addresses = json.loads(gateway.ready_file.read_text())["listeners"]
        self.assertNotEqual(gateway.address("scrape"), old)
        self.assertEqual(set(gateway.addresses), {"scrape", "more", "admin"})
        eventually(lambda: refuses(old) or None, f"{old} closed")
        for name in ("more", "scrape"):
            seen = self.both_workers(gateway, self.context, name)
            self.assertEqual({status for _, status, _ in seen}, {200}, name)


class SystemdTests(WorkersTestCase):
    def test_socket_activation_and_notify(self) -> None:
        """A socket passed by systemd is adopted by the supervisor and served by both
        workers; systemd hears READY=1 once both are ready, RELOADING=1 and READY=1
        around a SIGHUP reload, and STOPPING=1 on SIGTERM; SIGUSR1 has every worker
        reopen its audit log."""
        notify = NotifySocket(Path(tempfile.mkdtemp(prefix="sd-")) / "notify")
        self.addCleanup(notify.close)
        passed = listening_socket()
        address = f"127.0.0.1:{passed.getsockname()[1]}"
        activation = socket_activation(passed, "scrape")
        text = config(self.pki, self.directory, self.exporter.address).replace(
            'scrape, endpoint: "tcp:0:interface=127.0.0.1"',
            'scrape, endpoint: "systemd:domain=INET:name=scrape"',
        )
        gateway = GatewayProcess(
            self.directory,
            text,
            env={**activation.env, "NOTIFY_SOCKET": notify.address},
            pass_fds=activation.pass_fds,
            prelude=activation.prelude,
        )
        self.addCleanup(gateway.stop)
        gateway.start()
        passed.close()
        ready = notify.wait_for("READY")
        self.assertIn(f"serving with 2 workers: scrape {address}", ready["STATUS"])
        self.assertEqual(gateway.address("scrape"), address)
        seen = self.both_workers(gateway, self.context)
        self.assertEqual({status for _, status, _ in seen}, {200})
        # SIGUSR1: every worker reopens its audit log (after logrotate renamed it).
        for path in self.directory.glob("audit.w*.jsonl"):
            path.rename(path.with_name(path.name + ".1"))
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGUSR1)
        eventually(
            lambda: len(list(self.directory.glob("audit.w*.jsonl"))) == 2 or None,
            "both audit logs reopened",
        )
        count = len(notify.messages)
        gateway.process.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING", after=count)
        after = notify.wait_for("READY", after=count)
        self.assertIn("serving with 2 workers", after["STATUS"])
        eventually(lambda: "configuration reloaded in 2 workers" in gateway.log() or None, "reload")
        for conn, _, _ in seen:
            conn.close()
        gateway.terminate()
        notify.wait_for("STOPPING", after=count)
        self.assertIn(gateway.wait(), STOPPED)


def refuses(address: str) -> bool:
    """Whether a connection to ``address`` is refused (nothing listens there)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def http_post(address: str, path: str) -> tuple[int, bytes]:
    conn = https_connection(address, None, timeout=60)
    try:
        response = request(conn, path, method="POST")
    finally:
        conn.close()
    return response.status, response.body
