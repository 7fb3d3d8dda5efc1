"""Shared pieces for integration tests that run the real ``twistd promgate``: fixtures built
once per test run, configuration snippets, handshake probes, metric parsing and a bounded
wait. Everything talks to 127.0.0.1 only."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import json
import os
import socket
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from prometheus_client.parser import text_string_to_metric_families

from promgate import cli
from promgate.addresses import host_port, split_address
from promgate.testing import (
    TestPKI,
)

T = TypeVar("T")

cleanups: list[Callable[[], object]] = []


@atexit.register
def _run_cleanups() -> None:
    while cleanups:
        with contextlib.suppress(Exception):
            cleanups.pop()()


class Shared(Generic[T]):
    """Something built once, on first use, for every test that asks; a failure is kept too."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._value: T | None = None
        self._error: str | None = None

    def get(self) -> T:
        if self._value is None:
            if self._error is not None:
                raise RuntimeError(f"shared fixture failed earlier:\n{self._error}")
            try:
                self._value = self._build()
            except Exception as e:
                self._error = f"{type(e).__name__}: {e}"
                raise
        return self._value


def workdir(name: str) -> Path:
    """A fresh directory under trial's working directory, kept for post-mortems."""
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=os.getcwd()))


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound a moment ago, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """Plain HTTP GET; (status, body), or OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def tail(path: Path, limit: int = 6000) -> str:
    """The end of a log file, for failure messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<{path}: {e}>"
    return text[-limit:]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cert_sha256(path: Path) -> str:
    """The SHA-256 fingerprint of a PEM certificate, as audit records spell it."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex()


def q(value: Any) -> str:
    """A YAML scalar (JSON is YAML) for paths and strings interpolated into configurations."""
    return json.dumps(str(value))


def tls_section(pki: TestPKI) -> str:
    return (
        f"tls: {{certificate: {q(pki.gate_cert)}, key: {q(pki.gate_key)}, "
        f"client_ca: {q(pki.ca_cert)}}}\n"
    )


IDENTITIES = """
identities:
  prometheus: {cert: {uri: "spiffe://promgate.local/prometheus"}, roles: [scraper]}
  ops: {cert: {cn: ops}}
"""


def scrape_path(route: str, target: str, path: str | None = None) -> str:
    extra = f"&path={path}" if path else ""
    return f"/scrape?route={route}&target={target.replace(':', '%3A')}{extra}"


def attempt_handshake(address: str, context: ssl.SSLContext) -> tuple[str, bytes, Exception]:
    """Try a request over TLS; return (our address, bytes received, what stopped us).

    With TLS 1.3 the client finishes its side of the handshake before the server has
    judged the client certificate, so the refusal arrives as an alert on the first read.
    """
    split = split_address(address)
    if split is None:
        raise ValueError(f"not host:port: {address!r}")
    host, port = split
    with socket.create_connection((host, port), timeout=10) as sock:
        local = host_port(*sock.getsockname()[:2])
        received = b""
        try:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                tls.sendall(b"GET /sd HTTP/1.1\r\nHost: gate\r\n\r\n")
                for _ in range(64):  # bounded: a refused handshake ends this at once
                    data = tls.recv(65536)
                    if not data:
                        return local, received, ConnectionError("closed without an alert")
                    received += data
        except (ssl.SSLError, ConnectionError) as e:
            return local, received, e
    raise AssertionError(f"the gateway answered a refused client: {received[:200]!r}")


def refused_handshake_from(peer: str) -> Callable[[dict[str, Any]], bool]:
    """Matches the audit record of a refused TLS handshake from ``peer``."""

    def matches(record: dict[str, Any]) -> bool:
        return record["event"] == "tls_handshake_failed" and record.get("peer") == peer

    return matches


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called ``name`` in a Prometheus text exposition."""
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 15.0) -> T:
    """Poll ``probe`` (bounded) until it returns something; for counters that the gateway
    updates when it sees a connection close, just after the client gave up on it."""
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
