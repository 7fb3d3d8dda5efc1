"""End to end: the real Prometheus server scrapes the real node_exporter through promgate.

Everything runs on 127.0.0.1 with ephemeral ports: node_exporter, ``twistd promgate`` (via
``GatewayProcess``) and Prometheus, which discovers its target from the gateway's ``/sd``
(``http_sd_configs`` over mutual TLS) and scrapes ``/scrape`` with the same client certificate.
Skipped when the Debian packages ``prometheus`` / ``prometheus-node-exporter`` are missing,
unless ``CI`` is set (CI installs them, so there a missing binary is a failure).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import yaml
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from promgate import cli
from promgate.testing import GatewayProcess, TestPKI, https_get
from promgate.testing.integration import closed_port, http_get, tail

PROMETHEUS = os.environ.get("PROMGATE_E2E_PROMETHEUS", "/usr/bin/prometheus")
NODE_EXPORTER = os.environ.get("PROMGATE_E2E_NODE_EXPORTER", "/usr/bin/prometheus-node-exporter")
JOB = "node-via-gate"
#: Bounds on every wait; together they keep a healthy run well under the suite's budget.
EXPORTER_START = 15.0
PROMETHEUS_START = 30.0
TARGET_UP = 60.0
QUERY_WAIT = 20.0
STOP_GRACE = 10.0

T = TypeVar("T")


class Daemon:
    """A subprocess with its output in a log file; ``stop`` terminates, then kills."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv,
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = STOP_GRACE) -> int:
        proc = self.process
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(grace)
        return proc.returncode

    def log(self) -> str:
        return f"--- {self.name} log ({self.log_path}) ---\n{tail(self.log_path)}"


class PrometheusThroughGatewayTests(SynchronousTestCase):
    """The real Prometheus and node_exporter, with promgate in between."""

    def setUp(self) -> None:
        missing = [p for p in (PROMETHEUS, NODE_EXPORTER) if not _executable(p)]
        if missing:
            message = f"not installed: {', '.join(missing)} (Debian prometheus packages)"
            if os.environ.get("CI"):
                self.fail(f"{message}; CI is set, so the e2e prerequisites must be present")
            raise SkipTest(message)
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        self.daemons: list[Daemon] = []

    # -- helpers -----------------------------------------------------------------------

    def logs(self) -> str:
        parts = [d.log() for d in self.daemons]
        gate = getattr(self, "gate", None)
        if gate is not None:
            parts.append(f"--- promgate log ({gate.log_path}) ---\n{tail(gate.log_path)}")
            audit = gate.directory / "audit.jsonl"
            parts.append(f"--- promgate audit log ({audit}) ---\n{tail(audit)}")
        return "\n".join(parts)

    @contextlib.contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """Turn anything raised inside into a failure that carries every process's log."""
        try:
            yield
        except SkipTest:
            raise
        except self.failureException as e:
            raise self.failureException(f"{e}\n{self.logs()}") from e
        except Exception as e:
            raise self.failureException(f"{type(e).__name__}: {e}\n{self.logs()}") from e

    def daemon(self, name: str, argv: list[str]) -> Daemon:
        d = Daemon(name, argv, self.dir / f"{name}.log", self.dir)
        self.daemons.append(d)
        self.addCleanup(d.stop)
        return d

    def wait_for(
        self, what: str, probe: Callable[[], T | None], timeout: float, *, every: float = 0.2
    ) -> T:
        """Call ``probe`` until it returns something other than None, within ``timeout``."""
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while True:
            for d in self.daemons:
                if not d.running():
                    self.fail(f"{d.name} exited {d.process.returncode} while waiting for {what}")
            gate = getattr(self, "gate", None)
            if gate is not None and gate.process is not None and gate.process.poll() is not None:
                self.fail(f"promgate exited {gate.process.returncode} while waiting for {what}")
            try:
                result = probe()
            except (OSError, ValueError) as e:
                last_error, result = e, None
            if result is not None:
                return result
            if time.monotonic() > deadline:
                self.fail(
                    f"gave up after {timeout}s waiting for {what} (last error: {last_error!r})"
                )
            time.sleep(every)

    def prometheus_api(self, path: str, **params: str) -> Any:
        url = f"http://{self.prom_address}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_get(url)
        if status != 200:
            raise ValueError(f"{url}: HTTP {status}: {body[:500]!r}")
        doc = json.loads(body)
        if doc.get("status") != "success":
            raise ValueError(f"{url}: {doc}")
        return doc["data"]

    # -- the pieces --------------------------------------------------------------------

    def start_node_exporter(self) -> str:
        address = f"127.0.0.1:{closed_port()}"
        self.daemon(
            "node_exporter",
            [
                NODE_EXPORTER,
                f"--web.listen-address={address}",
                "--collector.disable-defaults",
                "--collector.cpu",
                "--collector.time",
                "--collector.loadavg",
                "--log.level=warn",
            ],
        )

        def metrics() -> bool | None:
            status, body = http_get(f"http://{address}/metrics", timeout=2.0)
            return True if status == 200 and b"node_exporter_build_info" in body else None

        self.wait_for("node_exporter /metrics", metrics, EXPORTER_START, every=0.05)
        return address

    def start_gateway(self, pki: TestPKI, exporter: str) -> GatewayProcess:
        config = f"""\
tls:
  certificate: {pki.gate_cert}
  key: {pki.gate_key}
  client_ca: {pki.ca_cert}
admin:
  endpoint: "tcp:0:interface=127.0.0.1"
listeners:
  # No 'advertise': /sd answers with the Host header Prometheus sent (the sd URL's host:port),
  # which is the only way to learn a port the gateway picks itself.
  - {{name: scrape, protocol: http, endpoint: "tcp:0:interface=127.0.0.1"}}
identities:
  prometheus:
    cert: {{uri: "spiffe://promgate.local/prometheus"}}
routes:
  node:
    scheme: http
    metrics_path: /metrics
    allow: [prometheus]
    targets:
      static: ["{exporter}"]
audit:
  path: audit.jsonl
  key_file: {pki.audit_key}
  fsync: always
  on_failure: deny
"""
        gate = GatewayProcess(self.dir / "gate", config)
        self.gate = gate
        self.addCleanup(gate.stop)
        gate.start()
        return gate

    def start_prometheus(self, pki: TestPKI, gate_address: str) -> str:
        cert, key = pki.client("prometheus")
        tls = {
            "ca_file": str(pki.ca_cert),
            "cert_file": str(cert),
            "key_file": str(key),
            "server_name": "localhost",
        }
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "scheme": "https",
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "tls_config": tls,
                    "http_sd_configs": [
                        {
                            "url": f"https://{gate_address}/sd",
                            "refresh_interval": "1s",
                            "tls_config": tls,
                        }
                    ],
                }
            ],
        }
        return self.run_prometheus(config)

    def run_prometheus(self, config: dict[str, Any]) -> str:
        """Start the real Prometheus with ``config`` and wait until it is ready."""
        config_path = self.dir / "prometheus.yml"
        # JSON is YAML: no need for a YAML writer here.
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        self.prom_address = f"127.0.0.1:{closed_port()}"
        storage = self.dir / "tsdb"
        storage.mkdir()
        self.daemon(
            "prometheus",
            [
                PROMETHEUS,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={storage}",
                f"--web.listen-address={self.prom_address}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=debug",
            ],
        )

        def ready() -> bool | None:
            status, _ = http_get(f"http://{self.prom_address}/-/ready", timeout=2.0)
            return True if status == 200 else None

        self.wait_for("Prometheus /-/ready", ready, PROMETHEUS_START, every=0.1)
        return self.prom_address

    # -- the test ------------------------------------------------------------------------

    def test_prometheus_scrapes_node_exporter_through_gateway(self) -> None:
        """Prometheus discovers node_exporter via /sd and scrapes it through the gateway."""
        with self.logs_on_failure():
            self.scrape_through_gateway()

    def scrape_through_gateway(self) -> None:
        """The body of the test above: start, wait, assert, stop, check the audit trail."""
        pki = TestPKI(self.dir / "pki")
        exporter = self.start_node_exporter()
        gate = self.start_gateway(pki, exporter)
        gate_address = gate.address("scrape")
        gate_port = gate_address.rpartition(":")[2]

        # 0. With no 'advertise', /sd names the gateway by the request's Host header.
        sd_response = https_get(
            gate_address,
            "/sd",
            pki.client_context("prometheus"),
            headers={"Host": f"localhost:{gate_port}"},
        )
        self.assertEqual(sd_response.status, 200, sd_response)
        self.assertEqual(sd_response.headers["content-type"], "application/json")
        groups = json.loads(sd_response.body)
        self.assertEqual([g["targets"] for g in groups], [[f"localhost:{gate_port}"]])

        self.start_prometheus(pki, gate_address)

        # 1. The target Prometheus discovered through /sd comes up.
        def target_up() -> dict[str, Any] | None:
            data = self.prometheus_api("/api/v1/targets", state="active")
            for t in data["activeTargets"]:
                if t["scrapePool"] == JOB and t["health"] == "up":
                    return t  # type: ignore[no-any-return]
            return None

        target = self.wait_for(f"target of job {JOB} to be up", target_up, TARGET_UP, every=0.25)
        labels, discovered = target["labels"], target["discoveredLabels"]
        self.assertEqual(labels["instance"], exporter)
        self.assertEqual(labels["job"], JOB)
        self.assertEqual(discovered["__address__"], gate_address)
        self.assertEqual(discovered["__scheme__"], "https")
        self.assertEqual(discovered["__metrics_path__"], "/scrape")
        self.assertEqual(discovered["__param_route"], "node")
        self.assertEqual(discovered["__param_target"], exporter)
        self.assertEqual(discovered["instance"], exporter)
        scrape = urllib.parse.urlsplit(target["scrapeUrl"])
        self.assertEqual(
            (scrape.scheme, scrape.netloc, scrape.path), ("https", gate_address, "/scrape")
        )
        self.assertEqual(
            urllib.parse.parse_qs(scrape.query), {"route": ["node"], "target": [exporter]}
        )
        self.assertIn("target=" + urllib.parse.quote(exporter, safe=""), scrape.query)
        self.assertEqual(target["lastError"], "")

        # 2. The scraped samples are in the TSDB under the job, labelled with the real target.
        def query(expr: str) -> list[dict[str, Any]] | None:
            result: list[dict[str, Any]] = self.prometheus_api("/api/v1/query", query=expr)[
                "result"
            ]
            return result or None

        up = self.wait_for("up == 1", partial(query, f'up{{job="{JOB}"}} == 1'), QUERY_WAIT)
        self.assertEqual(len(up), 1, up)
        self.assertEqual(up[0]["metric"]["instance"], exporter)
        self.assertEqual(up[0]["value"][1], "1")
        for name in ("node_exporter_build_info", "node_time_seconds"):
            series = self.wait_for(name, partial(query, f'{name}{{job="{JOB}"}}'), QUERY_WAIT)
            self.assertEqual(
                {s["metric"]["instance"] for s in series}, {exporter}, f"{name}: {series}"
            )

        # 3. Stop everything (Prometheus first, so no request is cut off mid-flight).
        for d in reversed(self.daemons):
            d.stop()
        # twistd re-raises the SIGTERM that stopped it, so a clean stop exits by that signal.
        self.assertIn(gate.stop(), (0, -signal.SIGTERM), gate.log())

        # 4. The audit log recorded both the discovery and the scrapes, and verifies.
        audit_path = gate.directory / "audit.jsonl"
        records = gate.audit_records(audit_path)
        requests = [r for r in records if r["event"] == "request"]
        scrapes = [
            r
            for r in requests
            if r.get("identity") == "prometheus"
            and r.get("route") == "node"
            and r.get("path") == "/metrics"
            and r.get("status") == 200
        ]
        self.assertTrue(scrapes, f"no allowed scrape in the audit log: {requests}")
        for r in scrapes:
            self.assertEqual(r["target"], exporter)
            self.assertEqual(r["method"], "GET")
            self.assertEqual(r["decision"], "allow")
            self.assertEqual(r["listener"], "scrape")
        sd = [
            r
            for r in requests
            if r.get("method") == "GET" and (r.get("path") or "").split("?")[0] == "/sd"
        ]
        self.assertTrue(sd, f"no GET /sd in the audit log: {requests}")
        for r in sd:
            self.assertEqual((r["identity"], r["status"]), ("prometheus", 200), r)
        self.assertEqual([r for r in requests if r.get("decision") != "allow"], [], "denials")
        self.assertEqual(records[0]["event"], "start")
        self.assertEqual(records[-1]["event"], "stop")

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["audit", "verify", "--key-file", str(pki.audit_key), str(audit_path)])
        self.assertEqual(code, 0, f"audit verify failed: {out.getvalue()}{err.getvalue()}")
        self.assertIn(f"OK: {len(records)} record(s) verified", out.getvalue())


class PrometheusThroughForwardProxyTests(SynchronousTestCase):
    """The real Prometheus scraping through promgate's forward proxy (``proxy_url``).

    Two jobs share one ``https://`` proxy_url: one scrapes a plain node_exporter (absolute-form
    GET, path-level policy), the other a node_exporter serving TLS (CONNECT, a tunnel).
    Prometheus 2.42 presents the job's ``tls_config`` client certificate to an ``https``
    proxy, so both are audited under the identity that certificate names.

    The harness (processes, waits, logs, Prometheus API) is borrowed from
    PrometheusThroughGatewayTests, without inheriting its test.
    """

    setUp = PrometheusThroughGatewayTests.setUp
    logs = PrometheusThroughGatewayTests.logs
    logs_on_failure = PrometheusThroughGatewayTests.logs_on_failure
    daemon = PrometheusThroughGatewayTests.daemon
    wait_for = PrometheusThroughGatewayTests.wait_for
    prometheus_api = PrometheusThroughGatewayTests.prometheus_api
    start_node_exporter = PrometheusThroughGatewayTests.start_node_exporter
    run_prometheus = PrometheusThroughGatewayTests.run_prometheus

    PLAIN_JOB = "node-via-proxy"
    TLS_JOB = "node-tls-via-proxy"

    def start_tls_node_exporter(self, pki: TestPKI) -> str:
        """node_exporter serving TLS with the test PKI's server certificate (127.0.0.1)."""
        web_config = self.dir / "node-tls-web.yml"
        web_config.write_text(
            json.dumps(
                {
                    "tls_server_config": {
                        "cert_file": str(pki.gate_cert),
                        "key_file": str(pki.gate_key),
                    }
                }
            )
        )
        address = f"127.0.0.1:{closed_port()}"
        self.daemon(
            "node_exporter_tls",
            [
                NODE_EXPORTER,
                f"--web.listen-address={address}",
                f"--web.config.file={web_config}",
                "--collector.disable-defaults",
                "--collector.time",
                "--log.level=warn",
            ],
        )
        context = pki.client_context(None)

        def metrics() -> bool | None:
            response = https_get(address, "/metrics", context, timeout=2.0)
            return True if b"node_exporter_build_info" in response.body else None

        self.wait_for("TLS node_exporter /metrics", metrics, EXPORTER_START, every=0.05)
        return address

    def start_forward_gateway(self, pki: TestPKI, plain: str, tls_target: str) -> GatewayProcess:
        config = f"""\
tls:
  certificate: {pki.gate_cert}
  key: {pki.gate_key}
  client_ca: {pki.ca_cert}
admin:
  endpoint: "tcp:0:interface=127.0.0.1"
listeners:
  - {{name: egress, protocol: forward, endpoint: "tcp:0:interface=127.0.0.1"}}
identities:
  prometheus:
    cert: {{uri: "spiffe://promgate.local/prometheus"}}
routes:
  node:
    allow: [prometheus]
    targets:
      static: ["{plain}"]
  node-tls:
    scheme: https
    allow: [prometheus]
    targets:
      static: ["{tls_target}"]
audit:
  path: audit.jsonl
  key_file: {pki.audit_key}
  fsync: always
  on_failure: deny
"""
        gate = GatewayProcess(self.dir / "gate", config)
        self.gate = gate
        self.addCleanup(gate.stop)
        gate.start()
        return gate

    def start_prometheus(self, pki: TestPKI, proxy: str, plain: str, tls_target: str) -> None:
        cert, key = pki.client("prometheus")
        # Used for the proxy connection (an https proxy_url) and, in the TLS job, inside the
        # tunnel too: the CA checks both the gateway and the TLS exporter.
        tls = {"ca_file": str(pki.ca_cert), "cert_file": str(cert), "key_file": str(key)}
        job: dict[str, Any] = {
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "proxy_url": f"https://{proxy}",
            "tls_config": tls,
        }
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {**job, "job_name": self.PLAIN_JOB, "static_configs": [{"targets": [plain]}]},
                {
                    **job,
                    "job_name": self.TLS_JOB,
                    "scheme": "https",
                    "static_configs": [{"targets": [tls_target]}],
                },
            ],
        }
        self.run_prometheus(config)

    def test_prometheus_scrapes_through_forward_proxy(self) -> None:
        """Both jobs are up through proxy_url, and audited under Prometheus's identity."""
        with self.logs_on_failure():
            self.scrape_through_forward_proxy()

    def scrape_through_forward_proxy(self) -> None:
        pki = TestPKI(self.dir / "pki")
        plain = self.start_node_exporter()
        tls_target = self.start_tls_node_exporter(pki)
        gate = self.start_forward_gateway(pki, plain, tls_target)
        self.start_prometheus(pki, gate.address("egress"), plain, tls_target)

        # 1. Both targets come up, and their samples are in the TSDB.
        def up(job: str) -> dict[str, Any] | None:
            data = self.prometheus_api("/api/v1/targets", state="active")
            for t in data["activeTargets"]:
                if t["scrapePool"] == job and t["health"] == "up":
                    return t  # type: ignore[no-any-return]
            return None

        def query(expr: str) -> list[dict[str, Any]] | None:
            result: list[dict[str, Any]] = self.prometheus_api("/api/v1/query", query=expr)[
                "result"
            ]
            return result or None

        for job, address, scheme in [
            (self.PLAIN_JOB, plain, "http"),
            (self.TLS_JOB, tls_target, "https"),
        ]:
            target = self.wait_for(f"target of job {job} to be up", partial(up, job), TARGET_UP)
            self.assertEqual(target["labels"]["instance"], address)
            self.assertEqual(target["scrapeUrl"], f"{scheme}://{address}/metrics")
            series = self.wait_for(
                f"{job} samples",
                partial(query, f'node_exporter_build_info{{job="{job}"}}'),
                QUERY_WAIT,
            )
            self.assertEqual({s["metric"]["instance"] for s in series}, {address})

        # 2. Stop Prometheus first: its tunnels end, and each is audited at its end.
        for d in reversed(self.daemons):
            d.stop()
        self.assertIn(gate.stop(), (0, -signal.SIGTERM), gate.log())

        # 3. The audit log holds both kinds of request, under the certificate's identity.
        audit_path = gate.directory / "audit.jsonl"
        records = gate.audit_records(audit_path)
        requests = [r for r in records if r["event"] == "request"]
        gets = [r for r in requests if r.get("method") == "GET"]
        tunnels = [r for r in requests if r.get("method") == "CONNECT"]
        self.assertTrue(gets, f"no absolute-form GET in the audit log: {requests}")
        self.assertTrue(tunnels, f"no CONNECT tunnel in the audit log: {requests}")
        for r in gets:
            self.assertEqual(
                (r["identity"], r["route"], r["target"], r["path"], r["status"]),
                ("prometheus", "node", plain, "/metrics", 200),
                r,
            )
        for r in tunnels:
            self.assertEqual(
                (r["identity"], r["route"], r["target"], r["status"], r["decision"]),
                ("prometheus", "node-tls", tls_target, 200, "allow"),
                r,
            )
            self.assertIn("cert_sha256", r)
            self.assertGreater(r["bytes_out"], 1000, r)
        self.assertEqual([r for r in requests if r.get("decision") != "allow"], [], "denials")
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = cli.main(["audit", "verify", "--key-file", str(pki.audit_key), str(audit_path)])
        self.assertEqual(code, 0, out.getvalue())


class PrometheusThroughTCPListenerTests(SynchronousTestCase):
    """The real Prometheus scraping node_exporter through a ``tcp`` listener.

    Prometheus scrapes ``https://127.0.0.1:PORT/metrics`` with its client certificate as if
    the gateway were the exporter; promgate terminates mutual TLS, recognises Prometheus, and
    relays the plain bytes to node_exporter. Each connection is audited when it ends.

    The harness (processes, waits, logs, Prometheus API) is borrowed from
    PrometheusThroughGatewayTests, without inheriting its test.
    """

    setUp = PrometheusThroughGatewayTests.setUp
    logs = PrometheusThroughGatewayTests.logs
    logs_on_failure = PrometheusThroughGatewayTests.logs_on_failure
    daemon = PrometheusThroughGatewayTests.daemon
    wait_for = PrometheusThroughGatewayTests.wait_for
    prometheus_api = PrometheusThroughGatewayTests.prometheus_api
    start_node_exporter = PrometheusThroughGatewayTests.start_node_exporter
    run_prometheus = PrometheusThroughGatewayTests.run_prometheus

    TCP_JOB = "node-via-tcp"

    def start_tcp_gateway(self, pki: TestPKI, exporter: str) -> GatewayProcess:
        config = f"""\
tls:
  certificate: {pki.gate_cert}
  key: {pki.gate_key}
  client_ca: {pki.ca_cert}
admin:
  endpoint: "tcp:0:interface=127.0.0.1"
listeners:
  - {{name: node-raw, protocol: tcp, endpoint: "tcp:0:interface=127.0.0.1", route: node}}
identities:
  prometheus:
    cert: {{uri: "spiffe://promgate.local/prometheus"}}
routes:
  node:
    allow: [prometheus]
    targets:
      static: ["{exporter}"]
audit:
  path: audit.jsonl
  key_file: {pki.audit_key}
  fsync: always
  on_failure: deny
"""
        gate = GatewayProcess(self.dir / "gate", config)
        self.gate = gate
        self.addCleanup(gate.stop)
        gate.start()
        return gate

    def start_prometheus_static(self, pki: TestPKI, address: str) -> None:
        cert, key = pki.client("prometheus")
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {
                    "job_name": self.TCP_JOB,
                    "scheme": "https",
                    "metrics_path": "/metrics",
                    "tls_config": {
                        "ca_file": str(pki.ca_cert),
                        "cert_file": str(cert),
                        "key_file": str(key),
                        "server_name": "localhost",
                    },
                    "static_configs": [{"targets": [address]}],
                }
            ],
        }
        self.run_prometheus(config)

    def test_prometheus_scrapes_through_tcp_listener(self) -> None:
        """up == 1 through a terminate-mode tcp listener, audited under Prometheus's identity."""
        with self.logs_on_failure():
            self.scrape_through_tcp_listener()

    def scrape_through_tcp_listener(self) -> None:
        pki = TestPKI(self.dir / "pki")
        exporter = self.start_node_exporter()
        gate = self.start_tcp_gateway(pki, exporter)
        address = gate.address("node-raw")
        self.start_prometheus_static(pki, address)
        job = self.TCP_JOB

        def query(expr: str) -> list[dict[str, Any]] | None:
            result: list[dict[str, Any]] = self.prometheus_api("/api/v1/query", query=expr)[
                "result"
            ]
            return result or None

        up = self.wait_for("up == 1", partial(query, f'up{{job="{job}"}} == 1'), TARGET_UP)
        self.assertEqual(up[0]["metric"]["instance"], address)
        self.assertEqual(up[0]["value"][1], "1")
        build = self.wait_for(
            "node_exporter_build_info",
            partial(query, f'node_exporter_build_info{{job="{job}"}}'),
            QUERY_WAIT,
        )
        self.assertEqual({s["metric"]["instance"] for s in build}, {address})
        targets = self.prometheus_api("/api/v1/targets", state="active")["activeTargets"]
        (target,) = [t for t in targets if t["scrapePool"] == job]
        self.assertEqual(target["scrapeUrl"], f"https://{address}/metrics")
        self.assertEqual((target["health"], target["lastError"]), ("up", ""))

        # Prometheus keeps its connection open between scrapes: the record comes at its end.
        for d in reversed(self.daemons):
            d.stop()
        audit_path = gate.directory / "audit.jsonl"
        record = gate.wait_for_audit_record(
            audit_path, lambda r: r["event"] == "connection", timeout=QUERY_WAIT
        )
        self.assertEqual(
            (record["listener"], record["identity"], record["route"], record["target"]),
            ("node-raw", "prometheus", "node", exporter),
        )
        self.assertEqual(record["decision"], "allow")
        self.assertEqual(record["cert_subject"], "CN=prometheus")
        self.assertEqual(record["server_name"], "localhost")
        self.assertGreater(record["bytes_out"], 1000)
        self.assertIn(gate.stop(), (0, -signal.SIGTERM), gate.log())
        records = gate.audit_records(audit_path)
        self.assertEqual([r for r in records if r.get("decision") == "deny"], [], "denials")
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["audit", "verify", "--key-file", str(pki.audit_key), str(audit_path)])
        self.assertEqual(code, 0, f"audit verify failed: {out.getvalue()}{err.getvalue()}")


class PrometheusFollowsFileSDTests(SynchronousTestCase):
    """The real Prometheus picks up a target that appears in a running gateway's file_sd.

    Prometheus follows the gateway's ``/sd`` (``http_sd_configs``, mutual TLS, refreshed
    every second); the gateway's route takes its targets from a file_sd file that lists
    nothing at first. A node_exporter started later and written into the file (atomically)
    must come up in Prometheus with no restart of either, and be audited as scraped by
    ``prometheus``.

    The harness (processes, waits, logs, Prometheus API, Prometheus itself) is borrowed from
    PrometheusThroughGatewayTests, without inheriting its test.
    """

    setUp = PrometheusThroughGatewayTests.setUp
    logs = PrometheusThroughGatewayTests.logs
    logs_on_failure = PrometheusThroughGatewayTests.logs_on_failure
    daemon = PrometheusThroughGatewayTests.daemon
    wait_for = PrometheusThroughGatewayTests.wait_for
    prometheus_api = PrometheusThroughGatewayTests.prometheus_api
    start_node_exporter = PrometheusThroughGatewayTests.start_node_exporter
    run_prometheus = PrometheusThroughGatewayTests.run_prometheus
    start_prometheus = PrometheusThroughGatewayTests.start_prometheus  # job JOB, http_sd on /sd

    def write_targets(self, path: Path, groups: list[dict[str, Any]]) -> None:
        """Write a file_sd file atomically: a temporary name the glob does not match, then
        a rename, so the gateway never reads it half written."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(groups) + "\n")
        tmp.replace(path)

    def start_file_sd_gateway(self, pki: TestPKI, targets: Path) -> GatewayProcess:
        config = f"""\
tls:
  certificate: {pki.gate_cert}
  key: {pki.gate_key}
  client_ca: {pki.ca_cert}
admin:
  endpoint: "tcp:0:interface=127.0.0.1"
listeners:
  - {{name: scrape, protocol: http, endpoint: "tcp:0:interface=127.0.0.1"}}
identities:
  prometheus:
    cert: {{uri: "spiffe://promgate.local/prometheus"}}
routes:
  node:
    scheme: http
    metrics_path: /metrics
    allow: [prometheus]
    targets:
      file_sd: {{files: ["{targets}/*.json"], poll_interval: 1s}}
audit:
  path: audit.jsonl
  key_file: {pki.audit_key}
  fsync: always
  on_failure: deny
"""
        gate = GatewayProcess(self.dir / "gate", config)
        self.gate = gate
        self.addCleanup(gate.stop)
        gate.start()
        return gate

    def test_prometheus_scrapes_target_added_to_file_sd(self) -> None:
        """A target written into file_sd comes up in Prometheus via /sd, and is audited."""
        with self.logs_on_failure():
            self.follow_file_sd()

    def follow_file_sd(self) -> None:
        pki = TestPKI(self.dir / "pki")
        targets = self.dir / "targets"
        targets.mkdir()
        sd_file = targets / "node.json"
        self.write_targets(sd_file, [])
        gate = self.start_file_sd_gateway(pki, targets)
        gate_address = gate.address("scrape")
        audit_path = gate.directory / "audit.jsonl"
        prometheus = pki.client_context("prometheus")

        # 0. The route has no target yet: /sd lists nothing.
        sd_response = https_get(gate_address, "/sd", prometheus)
        self.assertEqual((sd_response.status, json.loads(sd_response.body)), (200, []))

        self.start_prometheus(pki, gate_address)

        # 1. Prometheus has fetched /sd (an audited 200 for its identity) and has no target.
        gate.wait_for_audit_record(
            audit_path,
            lambda r: (
                r["event"] == "request"
                and (r.get("path") or "").split("?")[0] == "/sd"
                and r.get("identity") == "prometheus"
                and r.get("status") == 200
            ),
            timeout=TARGET_UP,
        )
        data = self.prometheus_api("/api/v1/targets", state="any")
        pools = [t["scrapePool"] for t in data["activeTargets"] + data["droppedTargets"]]
        self.assertNotIn(JOB, pools, data)

        # 2. A node_exporter appears in the file; nothing is restarted.
        exporter = self.start_node_exporter()
        self.write_targets(sd_file, [{"targets": [exporter], "labels": {"env": "e2e"}}])

        def target_up() -> dict[str, Any] | None:
            data = self.prometheus_api("/api/v1/targets", state="active")
            for t in data["activeTargets"]:
                if t["scrapePool"] == JOB and t["health"] == "up":
                    return t  # type: ignore[no-any-return]
            return None

        target = self.wait_for(f"target of job {JOB} to be up", target_up, TARGET_UP, every=0.25)
        labels, discovered = target["labels"], target["discoveredLabels"]
        self.assertEqual(
            (labels["instance"], labels["job"], labels["env"]), (exporter, JOB, "e2e"), target
        )
        self.assertEqual(discovered["__address__"], gate_address)
        self.assertEqual(discovered["__param_route"], "node")
        self.assertEqual(discovered["__param_target"], exporter)
        self.assertNotIn("__meta_filepath", discovered)  # not kept unless keep_meta_labels
        self.assertEqual(target["lastError"], "")
        data = self.prometheus_api("/api/v1/targets", state="active")
        self.assertEqual(
            [t["labels"]["instance"] for t in data["activeTargets"] if t["scrapePool"] == JOB],
            [exporter],
        )

        # 3. Stop Prometheus first, then the gateway (twistd re-raises the SIGTERM).
        for d in reversed(self.daemons):
            d.stop()
        self.assertIn(gate.stop(), (0, -signal.SIGTERM), gate.log())

        # 4. The scrapes of the new target are audited under Prometheus's identity.
        records = gate.audit_records(audit_path)
        requests = [r for r in records if r["event"] == "request"]
        scrapes = [r for r in requests if r.get("route") == "node"]
        self.assertTrue(scrapes, f"no scrape of route node in the audit log: {requests}")
        for r in scrapes:
            self.assertEqual(
                (r["identity"], r["target"], r["path"], r["status"], r["decision"]),
                ("prometheus", exporter, "/metrics", 200, "allow"),
                r,
            )
        self.assertEqual([r for r in requests if r.get("decision") != "allow"], [], "denials")
        self.assertEqual((records[0]["event"], records[-1]["event"]), ("start", "stop"))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["audit", "verify", "--key-file", str(pki.audit_key), str(audit_path)])
        self.assertEqual(code, 0, f"audit verify failed: {out.getvalue()}{err.getvalue()}")
        self.assertIn(f"OK: {len(records)} record(s) verified", out.getvalue())


class PrometheusSeesEveryRouteTests(SynchronousTestCase):
    """/sd label sets are unique per (route, target): two routes sharing one target are two
    ``up`` series in the real Prometheus, so a failing route cannot hide behind a healthy
    one. The harness is borrowed from PrometheusThroughGatewayTests."""

    setUp = PrometheusThroughGatewayTests.setUp
    logs = PrometheusThroughGatewayTests.logs
    logs_on_failure = PrometheusThroughGatewayTests.logs_on_failure
    daemon = PrometheusThroughGatewayTests.daemon
    wait_for = PrometheusThroughGatewayTests.wait_for
    prometheus_api = PrometheusThroughGatewayTests.prometheus_api
    start_node_exporter = PrometheusThroughGatewayTests.start_node_exporter
    run_prometheus = PrometheusThroughGatewayTests.run_prometheus
    start_prometheus = PrometheusThroughGatewayTests.start_prometheus

    def test_two_routes_one_target_two_series(self) -> None:
        """Route ``node`` serves /metrics; route ``node-missing`` asks node_exporter for a
        path it does not have (404): Prometheus keeps ``up`` 1 and 0, told apart by the
        ``route`` label. Route ``node-raw``, which only a ``tcp`` listener serves, is not
        offered by /sd at all."""
        with self.logs_on_failure():
            pki = TestPKI(self.dir / "pki")
            exporter = self.start_node_exporter()
            config = f"""\
tls: {{certificate: {pki.gate_cert}, key: {pki.gate_key}, client_ca: {pki.ca_cert}}}
admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
listeners:
  - {{name: scrape, protocol: http, endpoint: "tcp:0:interface=127.0.0.1"}}
  - name: raw
    protocol: tcp
    endpoint: "tcp:0:interface=127.0.0.1"
    route: node-raw
    target: "{exporter}"
    proxy_protocol: v2
identities:
  prometheus: {{cert: {{uri: "spiffe://promgate.local/prometheus"}}}}
routes:
  node: {{allow: [prometheus], targets: {{static: ["{exporter}"]}}}}
  node-raw: {{allow: [prometheus], targets: {{static: ["{exporter}"]}}}}
  node-missing:
    metrics_path: /missing
    allow: [prometheus]
    targets: {{static: ["{exporter}"]}}
audit: {{path: audit.jsonl, key_file: {pki.audit_key}}}
"""
            gate = GatewayProcess(self.dir / "gate", config)
            self.gate = gate
            self.addCleanup(gate.stop)
            gate.start()
            self.start_prometheus(pki, gate.address("scrape"))

            def both() -> dict[str, str] | None:
                result = self.prometheus_api("/api/v1/query", query=f'up{{job="{JOB}"}}')
                values = {r["metric"].get("route", ""): r["value"][1] for r in result["result"]}
                return values if len(result["result"]) >= 2 else None

            values = self.wait_for("two up series", both, TARGET_UP, every=0.25)
            self.assertEqual(values, {"node": "1", "node-missing": "0"})
            # Discovered from the same /sd document as those two: node-raw is not there.
            active = self.prometheus_api("/api/v1/targets", state="active")["activeTargets"]
            routes = sorted(t["labels"].get("route") for t in active if t["scrapePool"] == JOB)
            self.assertEqual(routes, ["node", "node-missing"])


class BearerHTTPSDExampleTests(SynchronousTestCase):
    """The bearer-token example of docs/http-api.md, read from the document itself, works
    with the real Prometheus: discovery and scrapes both carry the token."""

    setUp = PrometheusThroughGatewayTests.setUp
    logs = PrometheusThroughGatewayTests.logs
    logs_on_failure = PrometheusThroughGatewayTests.logs_on_failure
    daemon = PrometheusThroughGatewayTests.daemon
    wait_for = PrometheusThroughGatewayTests.wait_for
    prometheus_api = PrometheusThroughGatewayTests.prometheus_api
    start_node_exporter = PrometheusThroughGatewayTests.start_node_exporter
    run_prometheus = PrometheusThroughGatewayTests.run_prometheus

    def documented_job(self) -> dict[str, Any]:
        """The YAML block after "With a bearer token" in docs/http-api.md, as a mapping."""
        text = (Path(__file__).resolve().parent.parent / "docs" / "http-api.md").read_text()
        after = text[text.index("With a bearer token") :]
        block = after[after.index("```yaml\n") + len("```yaml\n") :]
        block = block[: block.index("```")]
        job: dict[str, Any] = yaml.safe_load(textwrap.dedent(block))
        return job

    def test_documented_bearer_example(self) -> None:
        """Prometheus configured with the documented snippet discovers and scrapes."""
        with self.logs_on_failure():
            pki = TestPKI(self.dir / "pki")
            exporter = self.start_node_exporter()
            token = "bearer-e2e-" + "x" * 20
            token_file = self.dir / "agent.token"
            token_file.write_text(token + "\n")
            digest = hashlib.sha256(token.encode()).hexdigest()
            config = f"""\
tls: {{certificate: {pki.gate_cert}, key: {pki.gate_key}, client_ca: {pki.ca_cert}}}
admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
listeners:
  - {{name: scrape, protocol: http, endpoint: "tcp:0:interface=127.0.0.1"}}
identities:
  agent:
    cert: {{uri: "spiffe://promgate.local/prometheus"}}
    bearer_sha256: "{digest}"
routes:
  node: {{allow: [agent], targets: {{static: ["{exporter}"]}}}}
audit: {{path: audit.jsonl, key_file: {pki.audit_key}}}
"""
            gate = GatewayProcess(self.dir / "gate", config)
            self.gate = gate
            self.addCleanup(gate.stop)
            gate.start()
            job = self.documented_job()
            documented_file = job["authorization"]["credentials_file"]
            self.assertEqual(
                job["http_sd_configs"][0]["authorization"]["credentials_file"], documented_file
            )
            text = json.dumps(job).replace(documented_file, str(token_file))
            text = text.replace("gate.example.org:9443", gate.address("scrape"))
            job = json.loads(text)
            cert, key = pki.client("prometheus")
            tls = {
                "ca_file": str(pki.ca_cert),
                "cert_file": str(cert),
                "key_file": str(key),
                "server_name": "localhost",
            }
            job.update(job_name=JOB, scheme="https", scrape_interval="1s", tls_config=tls)
            job["http_sd_configs"][0].update(refresh_interval="1s", tls_config=tls)
            self.run_prometheus({"scrape_configs": [job]})

            def up() -> bool | None:
                result = self.prometheus_api("/api/v1/query", query=f'up{{job="{JOB}"}} == 1')
                return True if result["result"] else None

            self.wait_for("up == 1 with the documented bearer example", up, TARGET_UP)
            records = gate.audit_records(gate.directory / "audit.jsonl")
            requests = [r for r in records if r["event"] == "request"]
            self.assertTrue(any(r.get("path", "").startswith("/sd") for r in requests))
            self.assertEqual({r.get("identity") for r in requests}, {"agent"}, requests)


def _executable(path: str) -> bool:
    resolved = shutil.which(path)
    return resolved is not None and os.access(resolved, os.X_OK)
