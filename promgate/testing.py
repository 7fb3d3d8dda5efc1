"""Helpers for testing a promgate setup with trial: a test PKI, fake exporters, an
in-memory audit sink, and a harness that runs the real ``twistd promgate`` on loopback.

Integrators use these in their own trial suites::

    from promgate.testing import TestPKI, FakeExporter, GatewayProcess

The harness waits on the gateway's own readiness (its ``--ready-file``), never on sleeps.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509

from promgate.audit import MemoryAuditSink
from promgate.pki import CertificateAuthority, IssuedCert

__all__ = [
    "FakeExporter",
    "GatewayProcess",
    "MemoryAuditSink",
    "Response",
    "StartFailure",
    "TestPKI",
    "https_connection",
    "https_get",
    "request",
    "run_twistd",
]


class TestPKI:
    """A throw-away CA with a gateway certificate and client certificates on disk.

    Client ``NAME`` gets CN=NAME and the URI SAN ``spiffe://promgate.local/NAME``.
    """

    __test__ = False  # not a test case, despite the name

    def __init__(self, directory: Path, trust_domain: str = "promgate.local") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.trust_domain = trust_domain
        self.ca = CertificateAuthority.create("promgate test CA")
        self.ca.write(self.ca_cert, self.directory / "ca-key.pem")
        self.ca.issue_server(["localhost"], ["127.0.0.1", "::1"]).write(
            self.gate_cert, self.gate_key
        )
        (self.directory / "audit.key").write_text(os.urandom(32).hex() + "\n")
        os.chmod(self.directory / "audit.key", 0o600)

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def gate_cert(self) -> Path:
        return self.directory / "gate.pem"

    @property
    def gate_key(self) -> Path:
        return self.directory / "gate-key.pem"

    @property
    def audit_key(self) -> Path:
        return self.directory / "audit.key"

    def client(
        self,
        name: str,
        *,
        expired: bool = False,
        uris: Sequence[str] | None = None,
        ca: CertificateAuthority | None = None,
    ) -> tuple[Path, Path]:
        """Issue (once) a client certificate; returns (cert, key) paths."""
        suffix = "-expired" if expired else ""
        if ca is not None and ca is not self.ca:
            suffix += "-foreign"
        cert_path = self.directory / f"client-{name}{suffix}.pem"
        key_path = self.directory / f"client-{name}{suffix}-key.pem"
        if not cert_path.exists():
            now = datetime.now(timezone.utc)
            issued: IssuedCert = (ca or self.ca).issue_client(
                name,
                uris=list(uris) if uris is not None else [f"spiffe://{self.trust_domain}/{name}"],
                not_before=now - timedelta(days=30) if expired else None,
                not_after=now - timedelta(days=1) if expired else None,
            )
            issued.write(cert_path, key_path)
        return cert_path, key_path

    def foreign_client(self, name: str) -> tuple[Path, Path]:
        """A client certificate from a CA the gateway does not trust."""
        return self.client(name, ca=CertificateAuthority.create("some other CA"))

    def server_context(
        self, *, cert: tuple[Path, Path] | None = None, require_client_cert: bool = False
    ) -> ssl.SSLContext:
        """A TLS server context with the gate certificate (localhost, 127.0.0.1, ::1), for
        an ``https`` fake exporter: ``FakeExporter(..., tls=pki.server_context())``.

        ``cert`` serves another (certificate, key) pair instead, such as one from
        ``upstream``. ``require_client_cert`` makes the exporter demand a client
        certificate issued by this CA, as an exporter behind mutual TLS does.
        """
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert_path, key_path = cert if cert is not None else (self.gate_cert, self.gate_key)
        ctx.load_cert_chain(str(cert_path), str(key_path))
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=str(self.ca_cert))
        return ctx

    def upstream(
        self,
        name: str,
        *,
        uris: Sequence[str] = (),
        hostnames: Sequence[str] = ("localhost",),
        ips: Sequence[str] = ("127.0.0.1", "::1"),
    ) -> tuple[Path, Path]:
        """Issue (once) a server certificate for an upstream exporter; returns (cert, key).

        ``uris`` are URI SANs (a SPIFFE ID, say) for routes that expect ``identity: {uri}``.
        """
        cert_path = self.directory / f"upstream-{name}.pem"
        key_path = self.directory / f"upstream-{name}-key.pem"
        if not cert_path.exists():
            self.ca.issue_server(list(hostnames), list(ips), uris=list(uris)).write(
                cert_path, key_path
            )
        return cert_path, key_path

    def client_context(self, name: str | None, **kwargs: Any) -> ssl.SSLContext:
        """A verifying client TLS context presenting ``name``'s certificate (or none)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        if name is not None:
            cert, key = self.client(name, **kwargs)
            ctx.load_cert_chain(str(cert), str(key))
        return ctx


@attrs.frozen
class Response:
    """An HTTP response as a test sees it."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def https_connection(
    address: str, context: ssl.SSLContext | None, *, timeout: float = 30.0
) -> http.client.HTTPConnection:
    """A client connection to ``address`` (TLS unless ``context`` is None), not yet opened.

    Reuse it for several requests to exercise keep-alive. The certificate is checked
    against the literal address, which TestPKI's gateway certificate carries as an IP SAN.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if context is None:
        return http.client.HTTPConnection(host, int(port), timeout=timeout)
    return http.client.HTTPSConnection(host, int(port), context=context, timeout=timeout)


def https_get(
    address: str,
    path: str,
    context: ssl.SSLContext | None,
    *,
    headers: Mapping[str, str] | None = None,
    method: str = "GET",
    timeout: float = 30.0,
) -> Response:
    """One request over a fresh connection (TLS unless ``context`` is None)."""
    conn = https_connection(address, context, timeout=timeout)
    try:
        return request(conn, path, headers=headers, method=method)
    finally:
        conn.close()


def request(
    conn: http.client.HTTPConnection,
    path: str,
    *,
    headers: Mapping[str, str] | None = None,
    method: str = "GET",
) -> Response:
    """One request on ``conn`` (opened if need be), its body read to the end."""
    conn.request(method, path, headers=dict(headers or {}))
    resp = conn.getresponse()
    body = resp.read()
    return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)


def _subprocess_env() -> dict[str, str]:
    """The environment for a child ``twistd``: it imports the same promgate as we do."""
    import promgate

    env = dict(os.environ)
    root = str(Path(promgate.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


@attrs.frozen
class StartFailure:
    """How a ``twistd promgate`` that refused to start ended: exit status, what it wrote
    on standard error, and its log (standard output)."""

    returncode: int
    stderr: str
    log: str


def run_twistd(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``twistd ARGS...`` to its end, with the same promgate as ours; its output as text."""
    return subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args],
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class GatewayProcess:
    """The real ``twistd promgate`` in a subprocess, on loopback, for integration tests."""

    def __init__(self, directory: Path, config: str, *, name: str = "promgate.yaml") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path = self.directory / name
        self.config_path.write_text(config)
        self.ready_file = self.directory / "ready.json"
        self.log_path = self.directory / "twistd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.addresses: dict[str, str] = {}

    def _spawn(self, stderr: Path | None = None) -> subprocess.Popen[bytes]:
        """Run ``twistd -n promgate``; its output goes to ``log_path`` (standard error too,
        unless ``stderr`` names a file of its own)."""
        if self.ready_file.exists():
            self.ready_file.unlink()
        with contextlib.ExitStack() as files:
            log = files.enter_context(self.log_path.open("ab"))
            err: Any = subprocess.STDOUT
            if stderr is not None:
                err = files.enter_context(stderr.open("wb"))
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from twisted.scripts.twistd import run; run()",
                    "-n",
                    "--pidfile=",
                    "promgate",
                    "--config",
                    str(self.config_path),
                    "--ready-file",
                    str(self.ready_file),
                ],
                cwd=self.directory,
                env=_subprocess_env(),
                stdout=log,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        return self.process

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        process = self._spawn()
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if process.poll() is not None:
                raise RuntimeError(f"twistd promgate exited {process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"twistd promgate not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.02)
        self.addresses = json.loads(self.ready_file.read_text())["listeners"]
        return self

    def start_expecting_failure(self, timeout: float = 30.0) -> StartFailure:
        """Start ``twistd promgate`` where it must refuse to start; wait for it to exit.

        Raises AssertionError if it becomes ready (it is then stopped) or does not exit in
        time. Standard error is kept apart from the log, as an operator's terminal or
        journal shows it.
        """
        stderr_path = self.directory / "twistd.stderr"
        process = self._spawn(stderr=stderr_path)
        try:
            returncode = process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"twistd promgate still running after {timeout}s") from None
        if self.ready_file.exists():
            raise AssertionError("twistd promgate wrote its ready file and then exited")
        return StartFailure(returncode, stderr_path.read_text(errors="replace"), self.log())

    def terminate(self) -> None:
        """Send SIGTERM (the gateway drains, then exits) without waiting for the exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the gateway to exit; its exit status."""
        assert self.process is not None, "never started"
        return self.process.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def address(self, listener: str) -> str:
        return self.addresses[listener]

    def get(self, listener: str, path: str, context: ssl.SSLContext | None, **kw: Any) -> Response:
        return https_get(self.address(listener), path, context, **kw)

    def audit_records(self, path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def last_audit_seq(self, path: Path) -> int:
        """The sequence number of the last complete record in ``path`` (0 if none): a mark
        to tell later records apart from earlier ones of the same peer address."""
        text = path.read_text() if path.exists() else ""
        for line in reversed(text.splitlines()):
            if line.endswith("}"):
                seq: int = json.loads(line)["seq"]
                return seq
        return 0

    def wait_for_audit_record(
        self,
        path: Path,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """The first record in the audit log ``path`` that ``predicate`` accepts.

        Waits (bounded by ``timeout``) because some records are written when the gateway
        sees a connection close, which can be just after the client gave up on it: a
        refused TLS handshake, for instance.
        """
        deadline = time.monotonic() + timeout
        while True:
            text = path.read_text() if path.exists() else ""
            for line in text.splitlines():
                if line.endswith("}"):  # skip a line still being written
                    record: dict[str, Any] = json.loads(line)
                    if predicate(record):
                        return record
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"no matching record in {path}, and the gateway exited")
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching record in {path} after {timeout}s")
            time.sleep(0.02)


#: SO_LINGER on with a zero timeout: close() then sends a TCP reset instead of a FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)

Handler = Callable[
    [bytes, Mapping[str, str]], "tuple[int, Mapping[str, str], bytes | Iterable[bytes]]"
]


class FakeExporter:
    """A small HTTP/1.1 server on 127.0.0.1 serving fixed bodies, or misbehaving on purpose.

    ``routes`` maps a request path to either bytes (served with Content-Length) or a
    behaviour: ``"hang"`` (never answers), ``"held"`` (the registered body, with a
    Content-Length, once :meth:`release` is called), ``"reset"`` (closes at once),
    ``"chunked:N"`` (the registered body in N-byte chunks), ``"close"`` (no length,
    close-delimited), ``"garbage"`` (not HTTP), ``"reset_mid_body"`` (the head and the
    first half of the registered body, with the full Content-Length, then a TCP reset),
    ``"raw"`` (the registered body sent as the whole response, byte for byte, then a close:
    for responses no well-behaved server would send).
    Requests it saw are in ``requests``; ``connections`` counts the connections accepted.
    Over TLS, ``client_subjects`` lists the subject of each client certificate shown in a
    completed handshake, and ``tls_failures`` counts the handshakes that failed.
    """

    def __init__(
        self,
        routes: Mapping[str, bytes | str],
        bodies: Mapping[str, bytes] | None = None,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.tls = tls
        self.routes = dict(routes)
        self.bodies = dict(bodies or {})
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.connections = 0
        self.client_subjects: list[str] = []
        self.tls_failures = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._stopping = threading.Event()
        self._released = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: list[socket.socket] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    def release(self) -> None:
        """Let every ``"held"`` answer go, those waiting now and any later ones."""
        self._released.set()

    def stop(self) -> None:
        """Stop accepting and close every connection; the serving threads then end."""
        self._stopping.set()
        self._released.set()
        for s in [self._sock, *self._open]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept() or recv()
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            self._open.append(client)
            t = threading.Thread(target=self._serve, args=(client,), daemon=True)
            t.start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(60)
        if self.tls is not None:
            try:
                client = self.tls.wrap_socket(client, server_side=True)
            except (ssl.SSLError, OSError):
                self.tls_failures += 1
                client.close()
                return
            assert isinstance(client, ssl.SSLSocket)
            der = client.getpeercert(binary_form=True)
            if der:
                subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
                self.client_subjects.append(subject)
        buf = b""
        try:
            while not self._stopping.is_set():
                while b"\r\n\r\n" not in buf:
                    data = client.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                self.requests.append((target, headers))
                path = target.split("?", 1)[0]
                if not self._answer(client, method, path):
                    return
        except OSError:
            return
        finally:
            try:
                self._open.remove(client)
                client.close()
            except (OSError, ValueError):
                pass

    def _answer(self, client: socket.socket, method: str, path: str) -> bool:
        spec = self.routes.get(path)
        ctype = b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
        if spec is None:
            client.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\nnot found\n")
            return True
        if isinstance(spec, bytes):
            body = b"" if method == "HEAD" else spec
            client.sendall(
                b"HTTP/1.1 200 OK\r\n" + ctype + b"Content-Length: %d\r\n\r\n" % len(spec) + body
            )
            return True
        if spec == "hang":
            self._stopping.wait(120)
            return False
        if spec == "held":
            self._released.wait(120)
            if self._stopping.is_set():
                return False
            body = self.bodies.get(path, b"")
            client.sendall(
                b"HTTP/1.1 200 OK\r\n" + ctype + b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            return True
        if spec == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            return False
        if spec == "garbage":
            client.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
            return False
        body = self.bodies.get(path, b"")
        if spec.startswith("chunked:"):
            size = int(spec.split(":", 1)[1])
            client.sendall(b"HTTP/1.1 200 OK\r\n" + ctype + b"Transfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(body), size):
                piece = body[i : i + size]
                client.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            client.sendall(b"0\r\n\r\n")
            return True
        if spec == "raw":
            client.sendall(body)
            return False
        if spec == "close":
            client.sendall(b"HTTP/1.1 200 OK\r\n" + ctype + b"Connection: close\r\n\r\n" + body)
            return False
        if spec == "reset_mid_body":
            head = b"HTTP/1.1 200 OK\r\n" + ctype + b"Content-Length: %d\r\n\r\n" % len(body)
            client.sendall(head + body[: len(body) // 2])
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            return False
        raise ValueError(f"unknown behaviour {spec!r}")
