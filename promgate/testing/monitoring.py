"""Pieces for testing promgate's monitoring: a small gateway with traffic of every kind on
its counters, ``promtool``, and the real Prometheus scraping the gateway's admin listener.

Everything runs on 127.0.0.1 with ephemeral ports; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from promgate.testing.clients import https_get
from promgate.testing.fakes import FakeExporter
from promgate.testing.integration import closed_port, http_get
from promgate.testing.pki import TestPKI
from promgate.testing.process import GatewayProcess

__all__ = [
    "PROMETHEUS",
    "PROMTOOL",
    "MonitoredGateway",
    "PrometheusProcess",
    "executable",
    "http_get",
    "promtool",
]

PROMTOOL = os.environ.get("PROMGATE_PROMTOOL", "/usr/bin/promtool")
PROMETHEUS = os.environ.get("PROMGATE_E2E_PROMETHEUS", "/usr/bin/prometheus")

T = TypeVar("T")


def executable(path: str) -> bool:
    """Whether ``path`` (or a command of that name) can be run."""
    return os.access(path, os.X_OK) or shutil.which(path) is not None


def promtool(*args: str, stdin: bytes | None = None, timeout: float = 60.0) -> tuple[int, str]:
    """``promtool ARGS...``: its exit status and its output (standard output and error)."""
    result = subprocess.run(
        [PROMTOOL, *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )
    return result.returncode, (result.stdout + result.stderr).decode(errors="replace")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 0.1) -> T:
    """Call ``probe`` until it returns something other than None, within ``timeout``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = probe()
        except (OSError, ValueError) as e:
            last, result = e, None
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(every)


_CONFIG = """\
tls:
  certificate: {cert}
  key: {key}
  client_ca: {ca}
admin:
  endpoint: "tcp:0:interface=127.0.0.1"
listeners:
  - {{name: scrape, protocol: http, endpoint: "tcp:0:interface=127.0.0.1"}}
  - {{name: raw, protocol: tcp, endpoint: "tcp:0:interface=127.0.0.1", route: rawnode}}
identities:
  prometheus:
    cert: {{uri: "spiffe://promgate.local/prometheus"}}
    roles: [scraper]
routes:
  node:
    scheme: http
    metrics_path: /metrics
    allow: ["role:scraper"]
    limits: {{rate: "1/m", burst: 2, per: identity}}
    targets:
      static: ["{exporter}"]
  rawnode:
    scheme: http
    allow: ["role:scraper"]
    targets:
      static: ["{exporter}"]
  broken:
    scheme: http
    metrics_path: /metrics
    allow: ["role:scraper"]
    targets:
      static: ["{closed}"]
audit:
  path: audit.jsonl
  key_file: {audit_key}
  fsync: interval
  on_failure: deny
"""


class MonitoredGateway:
    """A running ``twistd promgate`` with an exporter behind it and some traffic through it:
    relayed scrapes, an upstream failure, refusals, a rate-limited burst and a refused
    handshake, so that the metrics a dashboard or rule reads have samples."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.pki = TestPKI(self.directory / "pki")
        self.pki.client("prometheus")
        self.pki.client("stranger")
        self.exporter = FakeExporter({"/metrics": b"up_fake 1\n"})
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            self.closed = f"127.0.0.1:{s.getsockname()[1]}"
        config = _CONFIG.format(
            cert=json.dumps(str(self.pki.gate_cert)),
            key=json.dumps(str(self.pki.gate_key)),
            ca=json.dumps(str(self.pki.ca_cert)),
            audit_key=json.dumps(str(self.pki.audit_key)),
            exporter=self.exporter.address,
            closed=self.closed,
        )
        self.gate = GatewayProcess(self.directory / "gate", config)

    def start(self) -> MonitoredGateway:
        self.gate.start()
        return self

    def stop(self) -> None:
        self.gate.stop()
        self.exporter.stop()

    @property
    def admin(self) -> str:
        return self.gate.address("admin")

    def metrics_text(self) -> bytes:
        """The admin listener's ``/metrics`` body (the classic text format)."""
        response = https_get(self.admin, "/metrics", None)
        if response.status != 200:
            raise AssertionError(f"/metrics answered {response.status}")
        return response.body

    def traffic(self) -> None:
        """One of each kind of request the counters distinguish."""
        target = self.exporter.address.replace(":", "%3A")
        good = self.pki.client_context("prometheus")
        for _ in range(4):  # the burst of 2 is spent: some are rate limited
            self.gate.get("scrape", f"/scrape?route=node&target={target}", good)
        closed = self.closed.replace(":", "%3A")
        self.gate.get("scrape", f"/scrape?route=broken&target={closed}", good)
        self.gate.get("scrape", "/sd", self.pki.client_context("stranger"))
        with contextlib.suppress(OSError):  # the handshake is refused: no certificate
            self.gate.get("scrape", "/sd", self.pki.client_context(None))
        host, _, port = self.gate.address("raw").rpartition(":")
        with (
            socket.create_connection((host, int(port)), timeout=10) as sock,
            good.wrap_socket(sock, server_hostname=host) as tls,
        ):
            tls.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            for _ in range(64):  # bounded: the answer is short
                received += tls.recv(65536)
                if b"up_fake" in received:
                    break


class PrometheusProcess:
    """The real Prometheus scraping the given plain-HTTP targets every second, with
    ``rule_files`` loaded; ``query`` asks its HTTP API."""

    def __init__(
        self, directory: Path, targets: list[str], rule_files: list[Path] | None = None
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.address = f"127.0.0.1:{closed_port()}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files or []],
            "scrape_configs": [
                {"job_name": "promgate", "static_configs": [{"targets": list(targets)}]}
            ],
        }
        self.config_path = self.directory / "prometheus.yml"
        self.config_path.write_text(json.dumps(config))
        self.log_path = self.directory / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> PrometheusProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.directory / 'data'}",
                    f"--web.listen-address={self.address}",
                    "--log.level=warn",
                ],
                cwd=self.directory,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

        def ready() -> bool | None:
            self._check_running()
            status, _ = http_get(f"http://{self.address}/-/ready", timeout=2.0)
            return True if status == 200 else None

        wait_for("Prometheus to be ready", ready, timeout)
        return self

    def _check_running(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"prometheus exited {self.process.returncode}:\n{self.log()}")

    def stop(self, grace: float = 10.0) -> None:
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(grace)

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-6000:]

    def api(self, path: str, **params: str) -> tuple[str, Any]:
        """GET ``/api/v1/PATH``: (status, data or error) as Prometheus answers it."""
        url = f"http://{self.address}/api/v1/{path}?" + urllib.parse.urlencode(params)
        _, body = http_get(url, timeout=10.0)
        doc = json.loads(body)
        if doc.get("status") != "success":
            return "error", f"{doc.get('errorType')}: {doc.get('error')}"
        return "success", doc["data"]

    def query(self, expr: str) -> tuple[str, Any]:
        """An instant query: (status, data or error)."""
        return self.api("query", query=expr)

    def wait_for_samples(self, metric: str, timeout: float = 60.0) -> None:
        """Wait until Prometheus has stored at least one sample of ``metric``."""

        def present() -> bool | None:
            self._check_running()
            status, data = self.query(metric)
            return True if status == "success" and data["result"] else None

        wait_for(f"{metric} in Prometheus", present, timeout, every=0.25)
