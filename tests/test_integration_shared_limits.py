"""Two real ``twistd promgate`` gateways on one real Redis (``shared_limits``), and one
gateway of two worker processes: requests over the route's burst are refused across the
pair (and across the workers), as their audit logs and metrics show; a client that leaves
while Redis is not answering is audited once, and its lease given back when Redis answers
again."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from promgate.testing import FakeExporter, GatewayProcess, TestPKI, https_get
from promgate.testing.integration import eventually, metric_samples, q, scrape_path, workdir
from promgate.testing.redis import RedisServer, require_redis_server


def config(pki: TestPKI, audit_log: Path, upstream: str, redis: str, timeout: str) -> str:
    return f"""
tls: {{certificate: {q(pki.gate_cert)}, key: {q(pki.gate_key)}, client_ca: {q(pki.ca_cert)}}}
admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
listeners:
  - {{name: scrape, endpoint: "tcp:0:interface=127.0.0.1"}}
identities:
  prometheus: {{cert: {{uri: "spiffe://promgate.local/prometheus"}}, roles: [scraper]}}
routes:
  node:
    allow: ["role:scraper"]
    paths: [/metrics]
    limits: {{rate: 1/h, burst: 3, per: identity, max_concurrent: 10}}
    targets: {{static: ["{upstream}"]}}
audit: {{path: {q(audit_log)}, key_file: {q(pki.audit_key)}}}
shared_limits:
  redis: {{endpoint: "{redis}", timeout: {timeout}, on_unavailable: deny}}
"""


class TwoGatewaysTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_redis_server()
        directory = workdir("shared-limits")
        self.redis = RedisServer(directory / "redis").start()
        self.addCleanup(self.redis.stop)
        self.pki = TestPKI(directory / "pki")
        exporter = FakeExporter({"/metrics": b"up 1\n"})
        self.addCleanup(exporter.stop)
        self.path = scrape_path("node", exporter.address)
        self.gateways: list[tuple[GatewayProcess, Path]] = []
        for name, timeout in (("a", "50ms"), ("b", "2s")):
            audit_log = directory / f"audit-{name}.jsonl"
            text = config(self.pki, audit_log, exporter.address, self.redis.endpoint, timeout)
            gateway = GatewayProcess(directory / name, text)
            self.addCleanup(gateway.stop)
            gateway.start()
            self.gateways.append((gateway, audit_log))
        for gateway, _ in self.gateways:
            eventually(
                lambda g=gateway: self.metric(g, "promgate_shared_limits_redis_up") or None,
                "Redis to answer the gateway",
            )

    def metric(self, gateway: GatewayProcess, name: str, **labels: str) -> float:
        text = https_get(gateway.address("admin"), "/metrics", None).body.decode()
        return sum(v for ls, v in metric_samples(text, name) if labels.items() <= ls.items())

    def test_one_budget_for_the_pair(self) -> None:
        """A burst of 3 per identity is 3 for both gateways together: the fourth request,
        wherever it lands, is refused with 429, and the records and counters agree."""
        prometheus = self.pki.client_context("prometheus")
        (a, audit_a), (b, audit_b) = self.gateways
        statuses = [g.get("scrape", self.path, prometheus).status for g in (a, b, a, b, a)]
        self.assertEqual(statuses, [200, 200, 200, 429, 429])

        def requests(gateway: GatewayProcess, log: Path) -> list[tuple[str, str]]:
            return [
                (r["decision"], r["reason"])
                for r in gateway.audit_records(log)
                if r["event"] == "request"
            ]

        allowed, limited_ = ("allow", "ok"), ("deny", "rate_limited")
        self.assertEqual(requests(a, audit_a), [allowed, allowed, limited_])
        self.assertEqual(requests(b, audit_b), [allowed, limited_])
        limited = "promgate_rate_limited_total"
        self.assertEqual(self.metric(a, limited, route="node", reason="rate_limited"), 1)
        self.assertEqual(self.metric(b, limited, route="node", reason="rate_limited"), 1)
        self.assertEqual(self.metric(a, "promgate_shared_limits_unavailable_total"), 0)
        # What Redis holds: the route's one bucket, and no lease left.
        self.assertEqual(self.redis.keys("promgate:*"), ["promgate:node:b:i:prometheus"])

    def test_client_gone_while_redis_paused(self) -> None:
        """Redis paused, a client asks gateway b (timeout 2s) and leaves: audited once as
        aborted, then, once Redis answers, the lease b was granted is given back."""
        _, (b, audit_b) = self.gateways
        context = self.pki.client_context("prometheus")
        host, _, port = b.address("scrape").rpartition(":")
        self.redis.pause()
        try:
            with (
                socket.create_connection((host, int(port)), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.sendall(f"GET {self.path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            record = b.wait_for_audit_record(audit_b, lambda r: r["event"] == "request")
        finally:
            self.redis.resume()
        self.assertEqual((record["decision"], record["reason"]), ("deny", "client_aborted"))
        self.assertIn("shared limits", record["detail"])
        eventually(
            lambda: self.redis.command("EXISTS", "promgate:node:c") == b":0" or None,
            "the lease to be given back",
        )
        requests = [r for r in b.audit_records(audit_b) if r["event"] == "request"]
        self.assertEqual(len(requests), 1)


class WorkersOneBudgetTests(SynchronousTestCase):
    """One gateway of two worker processes on one Redis: the route's burst is the
    gateway's, not each worker's."""

    def test_one_budget_for_the_workers(self) -> None:
        require_redis_server()
        directory = workdir("shared-limits-workers")
        redis = RedisServer(directory / "redis").start()
        self.addCleanup(redis.stop)
        pki = TestPKI(directory / "pki")
        exporter = FakeExporter({"/metrics": b"up 1\n"})
        self.addCleanup(exporter.stop)
        audit_log = directory / "audit.jsonl"
        text = "workers: 2\n" + config(pki, audit_log, exporter.address, redis.endpoint, "2s")
        gateway = GatewayProcess(directory / "gw", text)
        self.addCleanup(gateway.stop)
        gateway.start()
        prometheus = pki.client_context("prometheus")
        path = scrape_path("node", exporter.address)
        pids: list[int] = json.loads(gateway.ready_file.read_text())["workers"]

        def served_alone(worker: int, count: int) -> list[int]:
            """``count`` requests while the other worker is stopped: the kernel hands
            every connection on the shared accept queue to ``worker``."""
            other = pids[1 - worker]
            os.kill(other, signal.SIGSTOP)
            try:
                return [gateway.get("scrape", path, prometheus).status for _ in range(count)]
            finally:
                os.kill(other, signal.SIGCONT)

        def reasons(worker: int) -> list[str]:
            chain = directory / f"audit.w{worker}.jsonl"
            return [r["reason"] for r in gateway.audit_records(chain) if r["event"] == "request"]

        # Burst 3: worker 0 takes two places, worker 1 the last one. Limits of each
        # worker's own would have let worker 1 admit both of its requests.
        self.assertEqual(served_alone(0, 2), [200, 200])
        self.assertEqual(served_alone(1, 2), [200, 429])
        eventually(lambda: len(reasons(0)) + len(reasons(1)) == 4 or None, "every record")
        self.assertEqual(reasons(0), ["ok", "ok"])
        self.assertEqual(reasons(1), ["ok", "rate_limited"])


class SentinelGatewayTests(SynchronousTestCase):
    def test_master_named_by_sentinel(self) -> None:
        """A gateway configured with a sentinel, not an endpoint: it keeps the route's
        budget at the master the sentinel names."""
        require_redis_server()
        directory = workdir("shared-limits-sentinel")
        master = RedisServer(directory / "master").start()
        self.addCleanup(master.stop)
        sentinel = RedisServer(directory / "sentinel", sentinel=("limits", master)).start()
        self.addCleanup(sentinel.stop)
        pki = TestPKI(directory / "pki")
        exporter = FakeExporter({"/metrics": b"up 1\n"})
        self.addCleanup(exporter.stop)
        text = config(pki, directory / "audit.jsonl", exporter.address, "unused", "2s").replace(
            'endpoint: "unused"',
            f'sentinel: {{endpoints: ["127.0.0.1:{sentinel.port}"], master: limits}}',
        )
        gateway = GatewayProcess(directory / "gw", text)
        self.addCleanup(gateway.stop)
        gateway.start()

        def redis_up() -> bool | None:
            text = https_get(gateway.address("admin"), "/metrics", None).body.decode()
            return metric_samples(text, "promgate_shared_limits_redis_up") == [({}, 1.0)] or None

        eventually(redis_up, "the master to answer the gateway")
        prometheus = pki.client_context("prometheus")
        path = scrape_path("node", exporter.address)
        statuses = [gateway.get("scrape", path, prometheus).status for _ in range(4)]
        self.assertEqual(statuses, [200, 200, 200, 429])
        self.assertEqual(master.keys("promgate:*"), ["promgate:node:b:i:prometheus"])
        self.assertIn(f"master 'limits' of sentinels 127.0.0.1:{sentinel.port}", gateway.log())
