"""End to end: the real Prometheus fetches OAuth 2.0 tokens (client credentials) from a real
authorization server and scrapes node_exporter through promgate with them.

The authorization server is Authlib's (``tests/oauth2_server.py``, run as a process): OpenID
discovery, JWKS, and a token endpoint issuing RFC 9068 JWT access tokens for the
client-credentials grant. promgate knows it as an identity provider and names the identity
by the token's ``sub`` and ``scope``. Prometheus uses ``oauth2`` in a job that discovers its
target through ``/sd`` (``http_sd_configs``, with ``oauth2`` too) and scrapes ``/scrape``,
and in a job that scrapes through the forward proxy (``proxy_url``). Everything runs on
127.0.0.1 with ephemeral ports.

Skipped when Prometheus, node_exporter, Authlib or Flask are missing, unless ``CI`` is set
(CI installs them: the ``test`` extra and the Debian packages).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from promgate import cli
from promgate.testing import GatewayProcess
from promgate.testing.integration import closed_port, http_get, tail

PROMETHEUS = os.environ.get("PROMGATE_E2E_PROMETHEUS", "/usr/bin/prometheus")
NODE_EXPORTER = os.environ.get("PROMGATE_E2E_NODE_EXPORTER", "/usr/bin/prometheus-node-exporter")
SERVER = Path(__file__).with_name("oauth2_server.py")
SD_JOB = "node-oauth2-sd"
PROXY_JOB = "node-oauth2-proxy"
CLIENT_ID, CLIENT_SECRET = "prometheus", "prometheus-client-secret"
AUDIT_KEY = "5e" * 32
START = 30.0
TARGET_UP = 60.0
QUERY_WAIT = 20.0

T = TypeVar("T")


class PrometheusWithOAuth2Tests(SynchronousTestCase):
    """Prometheus's oauth2 client credentials, a real authorization server, promgate."""

    def setUp(self) -> None:
        missing = [p for p in (PROMETHEUS, NODE_EXPORTER) if not os.access(p, os.X_OK)]
        missing += [m for m in ("authlib", "flask") if importlib.util.find_spec(m) is None]
        if missing:
            message = f"not installed: {', '.join(missing)}"
            if os.environ.get("CI"):
                self.fail(f"{message}; CI is set, so the e2e prerequisites must be present")
            raise SkipTest(message)
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        self.processes: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    # -- harness -----------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log_path = self.dir / f"{name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.processes.append((name, proc, log_path))
        self.addCleanup(self.stop, proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def logs(self) -> str:
        parts = [f"--- {name} ---\n{tail(path)}" for name, _, path in self.processes]
        gate = getattr(self, "gate", None)
        if gate is not None:
            parts.append(f"--- promgate ---\n{tail(gate.log_path)}")
            parts.append(f"--- audit ---\n{tail(gate.directory / 'audit.jsonl')}")
        return "\n".join(parts)

    @contextlib.contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        try:
            yield
        except SkipTest:
            raise
        except self.failureException as e:
            raise self.failureException(f"{e}\n{self.logs()}") from e
        except Exception as e:
            raise self.failureException(f"{type(e).__name__}: {e}\n{self.logs()}") from e

    def wait_for(self, what: str, probe: Callable[[], T | None], timeout: float) -> T:
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while True:
            for name, proc, _ in self.processes:
                if proc.poll() is not None:
                    self.fail(f"{name} exited {proc.returncode} while waiting for {what}")
            try:
                result = probe()
            except (OSError, ValueError, KeyError) as e:
                last, result = e, None
            if result is not None:
                return result
            if time.monotonic() > deadline:
                self.fail(f"gave up after {timeout}s waiting for {what} (last error: {last!r})")
            time.sleep(0.2)

    def api(self, path: str, **params: str) -> Any:
        url = f"http://{self.prom}{path}?{urllib.parse.urlencode(params)}"
        status, body = http_get(url)
        if status != 200:
            raise ValueError(f"{url}: HTTP {status}")
        return json.loads(body)["data"]

    # -- the pieces --------------------------------------------------------------------

    def start_authorization_server(self) -> str:
        port_file = self.dir / "oauth2.json"
        self.spawn(
            "oauth2-server",
            [
                sys.executable,
                str(SERVER),
                "--port-file",
                str(port_file),
                "--client",
                f"{CLIENT_ID}:{CLIENT_SECRET}:metrics.read openid",
            ],
        )

        def issuer() -> str | None:
            if not port_file.exists():
                return None
            url: str = json.loads(port_file.read_text())["issuer"]
            status, _ = http_get(url + "/.well-known/openid-configuration", timeout=2.0)
            return url if status == 200 else None

        return self.wait_for("the authorization server", issuer, START)

    def start_node_exporter(self) -> str:
        address = f"127.0.0.1:{closed_port()}"
        self.spawn(
            "node_exporter",
            [
                NODE_EXPORTER,
                f"--web.listen-address={address}",
                "--collector.disable-defaults",
                "--collector.time",
                "--log.level=warn",
            ],
        )

        def ready() -> bool | None:
            status, body = http_get(f"http://{address}/metrics", timeout=2.0)
            return True if status == 200 and b"node_exporter_build_info" in body else None

        self.wait_for("node_exporter", ready, START)
        return address

    def start_gateway(self, issuer: str, exporter: str) -> GatewayProcess:
        key = self.dir / "audit.key"
        key.write_text(AUDIT_KEY + "\n")
        config = f"""\
admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
listeners:
  - {{name: scrape, protocol: http, endpoint: "tcp:0:interface=127.0.0.1", tls: false}}
  - {{name: egress, protocol: forward, endpoint: "tcp:0:interface=127.0.0.1", tls: false}}
identity_providers:
  authlib:
    issuer: {issuer}
    audiences: [promgate]
    algorithms: [RS256]
identities:
  prometheus-oauth2:
    jwt: {{provider: authlib, subject: {CLIENT_ID}, claims: {{scope: metrics.read}}}}
    roles: [scraper]
routes:
  node:
    allow: ["role:scraper"]
    targets: {{static: ["{exporter}"]}}
audit: {{path: audit.jsonl, key_file: {key}, fsync: always, on_failure: deny}}
"""
        gate = GatewayProcess(self.dir / "gate", config)
        self.gate = gate
        self.addCleanup(gate.stop)
        gate.start()
        return gate

    def start_prometheus(self, issuer: str, gate: GatewayProcess, exporter: str) -> None:
        oauth2 = {
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "token_url": issuer + "/token",
            "scopes": ["metrics.read"],
        }
        job = {"scrape_interval": "1s", "scrape_timeout": "1s", "oauth2": oauth2}
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {
                    **job,
                    "job_name": SD_JOB,
                    "http_sd_configs": [
                        {
                            "url": f"http://{gate.address('scrape')}/sd",
                            "refresh_interval": "1s",
                            "oauth2": oauth2,
                        }
                    ],
                },
                {
                    **job,
                    "job_name": PROXY_JOB,
                    "proxy_url": f"http://{gate.address('egress')}",
                    "static_configs": [{"targets": [exporter]}],
                },
            ],
        }
        path = self.dir / "prometheus.yml"
        path.write_text(json.dumps(config, indent=2))
        self.prom = f"127.0.0.1:{closed_port()}"
        (self.dir / "tsdb").mkdir()
        self.spawn(
            "prometheus",
            [
                PROMETHEUS,
                f"--config.file={path}",
                f"--storage.tsdb.path={self.dir / 'tsdb'}",
                f"--web.listen-address={self.prom}",
                "--log.level=debug",
            ],
        )

        def ready() -> bool | None:
            status, _ = http_get(f"http://{self.prom}/-/ready", timeout=2.0)
            return True if status == 200 else None

        self.wait_for("Prometheus /-/ready", ready, START)

    # -- the test ------------------------------------------------------------------------

    def test_prometheus_oauth2_through_gateway_and_forward_proxy(self) -> None:
        """Both jobs are up with tokens from the real authorization server, and every
        request is audited under the identity the token's sub and scope name."""
        with self.logs_on_failure():
            self.scrape_with_oauth2()

    def scrape_with_oauth2(self) -> None:
        issuer = self.start_authorization_server()
        exporter = self.start_node_exporter()
        gate = self.start_gateway(issuer, exporter)
        self.start_prometheus(issuer, gate, exporter)

        def up(job: str) -> dict[str, Any] | None:
            for t in self.api("/api/v1/targets", state="active")["activeTargets"]:
                if t["scrapePool"] == job and t["health"] == "up":
                    return t  # type: ignore[no-any-return]
            return None

        def query(expr: str) -> list[dict[str, Any]] | None:
            result: list[dict[str, Any]] = self.api("/api/v1/query", query=expr)["result"]
            return result or None

        sd_target = self.wait_for(f"{SD_JOB} up", partial(up, SD_JOB), TARGET_UP)
        self.assertEqual(sd_target["labels"]["instance"], exporter)
        self.assertEqual(urllib.parse.urlsplit(sd_target["scrapeUrl"]).path, "/scrape")
        proxy_target = self.wait_for(f"{PROXY_JOB} up", partial(up, PROXY_JOB), TARGET_UP)
        self.assertEqual(proxy_target["scrapeUrl"], f"http://{exporter}/metrics")
        for job in (SD_JOB, PROXY_JOB):
            series = self.wait_for(
                f"up == 1 for {job}", partial(query, f'up{{job="{job}"}} == 1'), QUERY_WAIT
            )
            self.assertEqual([s["metric"]["instance"] for s in series], [exporter])
            self.wait_for(
                f"{job} samples",
                partial(query, f'node_exporter_build_info{{job="{job}"}}'),
                QUERY_WAIT,
            )
        metrics = http_get(f"http://{gate.address('admin')}/metrics")[1].decode()
        self.assertIn('promgate_identity_provider_keys{provider="authlib"} 1.0', metrics)

        for _, proc, _ in reversed(self.processes):
            self.stop(proc)
        self.assertIn(gate.stop(), (0, -signal.SIGTERM), gate.log())

        audit_path = gate.directory / "audit.jsonl"
        records = gate.audit_records(audit_path)
        requests = [r for r in records if r["event"] == "request"]
        by_listener: dict[str, list[dict[str, Any]]] = {"scrape": [], "egress": []}
        for r in requests:
            by_listener[r["listener"]].append(r)
        scrapes = [r for r in by_listener["scrape"] if r.get("route") == "node"]
        sd = [r for r in by_listener["scrape"] if (r.get("path") or "").startswith("/sd")]
        self.assertTrue(scrapes and sd and by_listener["egress"], requests)
        for r in [*scrapes, *sd, *by_listener["egress"]]:
            self.assertEqual(
                (r["identity"], r["decision"], r["status"]), ("prometheus-oauth2", "allow", 200), r
            )
        for r in [*scrapes, *by_listener["egress"]]:
            self.assertEqual((r["target"], r["path"]), (exporter, "/metrics"), r)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = cli.main(
                ["audit", "verify", "--key-file", str(self.dir / "audit.key"), str(audit_path)]
            )
        self.assertEqual(code, 0, out.getvalue())
