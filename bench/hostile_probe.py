"""A hostile-input probe against a real ``twistd promgate`` on 127.0.0.1.

Not a test: it starts a gateway (http, forward and tcp listeners, over TLS and plain),
a misbehaving upstream, then throws malformed requests, smuggling attempts, path tricks,
slow and stuck clients and broken upstreams at it. For each probe it prints what was sent,
what came back and whether that is the precise answer expected; at the end it checks the
gateway log for tracebacks, the open file descriptors and the resident memory before and
after, and verifies the audit log's chain. Every loop is bounded in count and time.

    /tmp/venv/bin/python bench/hostile_probe.py [--only SUBSTRING] [--keep]
"""

# ruff: noqa: E501, UP031, SIM117

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from promgate.cli import main as promgate_main  # noqa: E402
from promgate.testing import GatewayProcess, TestPKI  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
TOKEN = "hostile-probe-token"
CAP = 1 * MiB  # the route's max_response_size
SCRAPE_TIMEOUT = 3.0

# -- a misbehaving upstream -------------------------------------------------------------------

BODY = b"up 1\n"
BIG = b"x" * (CAP - 1024)


def _head(extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + extra


class Hostile:
    """An HTTP upstream whose behaviour is chosen by the request path."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self.sock.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        c.settimeout(20)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                head, buf = buf.split(b"\r\n\r\n", 1)
                self.requests.append(head)
                target = head.split(b"\r\n")[0].split(b" ")[1]
                path = target.split(b"?")[0].decode()
                if not self._answer(c, path):
                    return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                c.close()

    def _answer(self, c: socket.socket, path: str) -> bool:
        deadline = time.monotonic() + 15
        if path == "/metrics" or path.startswith("/p/"):
            c.sendall(_head(b"Content-Length: %d\r\n\r\n" % len(BODY)) + BODY)
            return True
        if path == "/big":
            c.sendall(_head(b"Content-Length: %d\r\n\r\n" % len(BIG)) + BIG)
            return True
        if path == "/garbage":
            c.sendall(b"HTTP/1.1 2OO OK\r\n\r\n")
            return False
        if path == "/garbage2":
            c.sendall(b"\x00\x01\x02 not http at all\r\n\r\n")
            return False
        if path == "/infinite-headers":
            c.sendall(b"HTTP/1.1 200 OK\r\n")
            for _ in range(20000):
                if time.monotonic() > deadline:
                    break
                c.sendall(b"X-A: " + b"a" * 100 + b"\r\n")
            return False
        if path == "/many-headers":
            c.sendall(b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 200 + b"Content-Length: 0\r\n\r\n")
            return False
        if path == "/infinite-chunked":
            c.sendall(_head(b"Transfer-Encoding: chunked\r\n\r\n"))
            piece = b"%x\r\n" % 65536 + b"y" * 65536 + b"\r\n"
            for _ in range(4 * CAP // 65536):
                if time.monotonic() > deadline:
                    break
                c.sendall(piece)
            return False
        if path == "/infinite-close":
            c.sendall(_head(b"Connection: close\r\n\r\n"))
            for _ in range(4 * CAP // 65536):
                if time.monotonic() > deadline:
                    break
                c.sendall(b"z" * 65536)
            return False
        if path == "/chunk-overflow":
            c.sendall(_head(b"Transfer-Encoding: chunked\r\n\r\n") + b"fffffffffffffffffff\r\nabc")
            time.sleep(0.5)
            return False
        if path == "/chunk-negative":
            c.sendall(_head(b"Transfer-Encoding: chunked\r\n\r\n") + b"-5\r\nabc")
            time.sleep(0.5)
            return False
        if path == "/chunk-bigsize":
            # a 15-hex-digit size that is over the cap, then a little data
            c.sendall(
                _head(b"Transfer-Encoding: chunked\r\n\r\n") + b"fffffffffffffff\r\n" + b"a" * 1000
            )
            time.sleep(0.5)
            return False
        if path == "/cl-te":
            c.sendall(
                _head(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n") + b"0\r\n\r\n"
            )
            return False
        if path == "/dup-cl":
            c.sendall(_head(b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n") + b"up 1\n")
            return False
        if path == "/neg-cl":
            c.sendall(_head(b"Content-Length: -1\r\n\r\n") + b"up 1\n")
            return False
        if path == "/plus-cl":
            c.sendall(_head(b"Content-Length: +5\r\n\r\n") + b"up 1\n")
            return False
        if path == "/huge-cl":
            c.sendall(_head(b"Content-Length: 99999999999999999999999\r\n\r\n") + b"up 1\n")
            return False
        if path == "/te-gzip":
            c.sendall(_head(b"Transfer-Encoding: gzip, chunked\r\n\r\n") + b"0\r\n\r\n")
            return False
        if path == "/obs-fold":
            c.sendall(_head(b"X-A: 1\r\n folded\r\nContent-Length: 5\r\n\r\n") + b"up 1\n")
            return False
        if path == "/bare-lf":
            c.sendall(b"HTTP/1.1 200 OK\nContent-Length: 5\n\nup 1\n")
            time.sleep(0.5)
            return False
        if path == "/early-close":
            c.sendall(_head(b"Content-Length: 1000\r\n\r\n") + b"a" * 10)
            return False
        if path == "/early-close-head":
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Le")
            return False
        if path == "/slow-drip":
            c.sendall(_head(b"Content-Length: 100\r\n\r\n"))
            for _ in range(100):
                if time.monotonic() > deadline:
                    break
                try:
                    c.sendall(b"a")
                except OSError:
                    return False
                time.sleep(0.2)
            return False
        if path == "/slow-head":
            for b in b"HTTP/1.1 200 OK\r\n":
                if time.monotonic() > deadline:
                    break
                c.sendall(bytes([b]))
                time.sleep(0.3)
            return False
        if path == "/interim-flood":
            for _ in range(5000):
                if time.monotonic() > deadline:
                    break
                try:
                    c.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                except OSError:
                    return False
            return False
        if path == "/upgrade":
            c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n")
            return False
        if path == "/extra-bytes":
            c.sendall(_head(b"Content-Length: 5\r\n\r\n") + b"up 1\nHTTP/1.1 200 OK\r\n\r\n")
            return True
        if path == "/ctl-header":
            c.sendall(_head(b"X-A: a\x00b\r\nContent-Length: 5\r\n\r\n") + b"up 1\n")
            return False
        if path == "/header-inject":
            # a reason phrase with CR alone
            c.sendall(b"HTTP/1.1 200 OK\rSet-Cookie: x\r\nContent-Length: 5\r\n\r\nup 1\n")
            return False
        if path == "/trailers":
            c.sendall(_head(b"Transfer-Encoding: chunked\r\n\r\n") + b"5\r\nup 1\n\r\n0\r\n")
            for _ in range(300):
                c.sendall(b"X-T: 1\r\n")
            c.sendall(b"\r\n")
            return False
        c.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        return True


UPSTREAM_PATHS = [
    "/metrics", "/big", "/garbage", "/garbage2", "/infinite-headers", "/many-headers",
    "/infinite-chunked", "/infinite-close", "/chunk-overflow", "/chunk-negative",
    "/chunk-bigsize", "/cl-te", "/dup-cl", "/neg-cl", "/plus-cl", "/huge-cl", "/te-gzip",
    "/obs-fold", "/bare-lf", "/early-close", "/early-close-head", "/slow-drip", "/slow-head",
    "/interim-flood", "/upgrade", "/extra-bytes", "/ctl-header", "/header-inject", "/trailers",
    "/p/%C3%A9", "/p/a:b",
]  # fmt: skip


class Echo:
    """A TCP (optionally TLS) echo server."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.received: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        c.settimeout(20)
        try:
            if self.tls is not None:
                c = self.tls.wrap_socket(c, server_side=True)
            while True:
                d = c.recv(65536)
                if not d:
                    return
                self.received.append(d)
                c.sendall(d)
        except (OSError, ssl.SSLError):
            return
        finally:
            with contextlib.suppress(OSError):
                c.close()


# -- the world ------------------------------------------------------------------------------------


class World:
    def __init__(self, keep: bool) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="promgate-hostile-"))
        self.keep = keep
        self.pki = TestPKI(self.dir / "pki")
        self.up = Hostile()
        self.echo = Echo()
        self.tls_echo = Echo(self.pki.server_context())
        self.audit = self.dir / "audit.jsonl"
        q = json.dumps
        pki = self.pki
        paths = ", ".join(q(p) for p in UPSTREAM_PATHS)
        digest = hashlib.sha256(TOKEN.encode()).hexdigest()
        config = f"""\
tls: {{certificate: {q(str(pki.gate_cert))}, key: {q(str(pki.gate_key))}, client_ca: {q(str(pki.ca_cert))}}}
admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
listeners:
  - {{name: scrape, protocol: http, endpoint: "tcp:0:interface=127.0.0.1"}}
  - {{name: scrape-plain, protocol: http, endpoint: "tcp:0:interface=127.0.0.1", tls: false}}
  - {{name: egress, protocol: forward, endpoint: "tcp:0:interface=127.0.0.1"}}
  - {{name: egress-plain, protocol: forward, endpoint: "tcp:0:interface=127.0.0.1", tls: false, tunnel_idle: 5s}}
  - {{name: raw, protocol: tcp, endpoint: "tcp:0:interface=127.0.0.1", route: echo, tunnel_idle: 5s}}
  - name: pass
    protocol: tcp
    mode: passthrough
    endpoint: "tcp:0:interface=127.0.0.1"
    sni: {{echo.example.org: tls-echo}}
identities:
  prometheus: {{cert: {{uri: "spiffe://promgate.local/prometheus"}}, roles: [scraper]}}
  agent: {{bearer_sha256: {q(digest)}, roles: [scraper]}}
routes:
  node:
    allow: ["role:scraper"]
    paths: [{paths}]
    params: [module]
    timeout: {SCRAPE_TIMEOUT:g}s
    max_response_size: 1MiB
    targets: {{static: ["{self.up.address}"]}}
  secure:
    scheme: https
    allow: ["role:scraper"]
    targets: {{static: ["{self.tls_echo.address}"]}}
  echo: {{allow: ["role:scraper"], targets: {{static: ["{self.echo.address}"]}}}}
  tls-echo: {{allow: ["sni:echo.example.org"], targets: {{static: ["{self.tls_echo.address}"]}}}}
audit: {{path: {q(str(self.audit))}, key_file: {q(str(pki.audit_key))}, fsync: never}}
"""
        self.gate = GatewayProcess(self.dir / "gate", config)
        self.gate.start()
        assert self.gate.process is not None
        self.pid = self.gate.process.pid
        self.client_ctx = pki.client_context("prometheus")
        self.target = self.up.address

    def addr(self, listener: str) -> tuple[str, int]:
        host, _, port = self.gate.address(listener).rpartition(":")
        return host, int(port)

    def stop(self) -> None:
        self.gate.stop()
        self.up.stop()

    def cleanup(self) -> None:
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            print(f"kept {self.dir}")

    # -- process state --------------------------------------------------------------------

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return -1

    def alive(self) -> bool:
        return self.gate.process is not None and self.gate.process.poll() is None


# -- clients ------------------------------------------------------------------------------------


def connect(w: World, listener: str, *, tls: bool, cert: bool = True, timeout: float = 15.0,
            server_name: str | None = None) -> socket.socket:  # fmt: skip
    s = socket.create_connection(w.addr(listener), timeout=timeout)
    if not tls:
        return s
    ctx = w.client_ctx if cert else w.pki.client_context(None)
    return ctx.wrap_socket(s, server_hostname=server_name or "127.0.0.1")


def read_response(s: socket.socket, *, limit: int = 4 * MiB, timeout: float = 15.0) -> bytes:
    """Everything until EOF (or the limit, or the timeout)."""
    s.settimeout(timeout)
    out = bytearray()
    end = time.monotonic() + timeout
    try:
        while len(out) < limit and time.monotonic() < end:
            d = s.recv(65536)
            if not d:
                break
            out += d
    except TimeoutError:
        out += b"<<TIMEOUT>>"
    except (ConnectionResetError, ssl.SSLError, OSError) as e:
        out += b"<<%s>>" % type(e).__name__.encode()
    return bytes(out)


def read_head(s: socket.socket, timeout: float = 15.0) -> bytes:
    s.settimeout(timeout)
    buf = b""
    try:
        while b"\r\n\r\n" not in buf:
            d = s.recv(4096)
            if not d:
                return buf + b"<<EOF>>"
            buf += d
    except TimeoutError:
        return buf + b"<<TIMEOUT>>"
    except (OSError, ssl.SSLError) as e:
        return buf + b"<<%s>>" % type(e).__name__.encode()
    return buf


def exchange(w: World, listener: str, data: bytes, *, tls: bool | None = None, cert: bool = True,
             timeout: float = 15.0, shut: bool = False) -> bytes:  # fmt: skip
    if tls is None:
        tls = not listener.endswith("-plain")
    with connect(w, listener, tls=tls, cert=cert, timeout=timeout) as s:
        try:
            s.sendall(data)
            if shut and not tls:
                s.shutdown(socket.SHUT_WR)
        except OSError as e:
            return b"<<send failed: %s>>" % type(e).__name__.encode()
        return read_response(s, timeout=timeout)


def status_of(resp: bytes) -> str:
    if resp.startswith(b"HTTP/1.1 "):
        return resp[9:12].decode()
    if not resp:
        return "EOF"
    return resp[:40].decode("latin-1")


def statuses(resp: bytes) -> list[str]:
    return [resp[i + 9 : i + 12].decode() for i in _find_all(resp, b"HTTP/1.1 ")]


def _find_all(data: bytes, needle: bytes) -> list[int]:
    out, i = [], data.find(needle)
    while i >= 0:
        out.append(i)
        i = data.find(needle, i + 1)
    return out


def auth() -> bytes:
    return b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"


def scrape(w: World, qs: str) -> bytes:
    return b"GET /scrape?%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % qs.encode()


def tq(w: World, path: str | None = None, extra: str = "") -> str:
    s = f"route=node&target={w.target}"
    if path is not None:
        s += f"&path={path}"
    return s + extra


# -- probes ---------------------------------------------------------------------------------------

Result = tuple[str, str, bool]  # (observed, expected, ok)
PROBES: list[tuple[str, Callable[[World], Result]]] = []


def probe(name: str) -> Callable[[Callable[[World], Result]], Callable[[World], Result]]:
    def register(fn: Callable[[World], Result]) -> Callable[[World], Result]:
        PROBES.append((name, fn))
        return fn

    return register


def expect_status(resp: bytes, *want: str) -> Result:
    got = status_of(resp)
    return got, "/".join(want), got in want


def simple(name: str, listener: str, data: bytes, *want: str, **kw: Any) -> None:
    if data.endswith(b"\r\n\r\n") and b"Connection:" not in data:
        data = data[:-2] + b"Connection: close\r\n\r\n"
    probe(name)(lambda w: expect_status(exchange(w, listener, data, **kw), *want))


# baseline
probe("baseline: scrape over mTLS")(
    lambda w: expect_status(exchange(w, "scrape", scrape(w, tq(w))), "200")
)
probe("baseline: scrape with bearer, plain")(
    lambda w: expect_status(exchange(w, "scrape-plain", scrape(w, tq(w)).replace(b"Host: x\r\n", b"Host: x\r\n" + auth())), "200"))  # fmt: skip

# smuggling and malformed heads (plain listener with bearer, and TLS listener)
H = b"Host: x\r\n"
for lst in ("scrape", "egress"):
    tgt = b"/scrape?route=node&target=T" if lst == "scrape" else b"http://T/metrics"
    pfx = lst + ": "
    simple(
        pfx + "CL+TE",
        lst,
        b"GET "
        + tgt
        + b" HTTP/1.1\r\n"
        + H
        + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "400",
    )
    simple(
        pfx + "duplicate CL",
        lst,
        b"GET " + tgt + b" HTTP/1.1\r\n" + H + b"Content-Length: 0\r\nContent-Length: 5\r\n\r\n",
        "400",
    )
    simple(
        pfx + "CL 0 with comma list",
        lst,
        b"GET " + tgt + b" HTTP/1.1\r\n" + H + b"Content-Length: 0, 0\r\n\r\n",
        "400",
    )
    simple(
        pfx + "CL 00",
        lst,
        b"GET " + tgt + b" HTTP/1.1\r\n" + H + b"Content-Length: 00\r\n\r\n",
        "400",
        "403",
        "404",
    )
    simple(
        pfx + "TE: chunked with body",
        lst,
        b"GET "
        + tgt
        + b" HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "400",
    )
    simple(
        pfx + "TE via obs-fold",
        lst,
        b"GET " + tgt + b" HTTP/1.1\r\n" + H + b"X-A: 1\r\n Transfer-Encoding: chunked\r\n\r\n",
        "400",
    )
    simple(
        pfx + "space before colon",
        lst,
        b"GET " + tgt + b" HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n",
        "400",
    )
    simple(
        pfx + "bare LF head",
        lst,
        b"GET " + tgt + b" HTTP/1.1\n" + b"Host: x\n\n",
        "400",
    )
    simple(
        pfx + "bare LF inside head",
        lst,
        b"GET " + tgt + b" HTTP/1.1\r\nHost: x\nX: y\r\n\r\n",
        "400",
    )
    simple(
        pfx + "bare CR inside head",
        lst,
        b"GET " + tgt + b" HTTP/1.1\r\nHost: x\rX: y\r\n\r\n",
        "400",
    )
    simple(
        pfx + "NUL in header value",
        lst,
        b"GET " + tgt + b" HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
        "400",
    )
    simple(
        pfx + "NUL in request target",
        lst,
        b"GET " + tgt + b"\x00 HTTP/1.1\r\n" + H + b"\r\n",
        "400",
    )
    simple(pfx + "NUL in method", lst, b"G\x00T " + tgt + b" HTTP/1.1\r\n" + H + b"\r\n", "400")
    simple(
        pfx + "absurd method",
        lst,
        b"A" * 5000 + b" " + tgt + b" HTTP/1.1\r\n" + H + b"\r\n",
        "405",
        "400",
    )
    simple(pfx + "lowercase get", lst, b"get " + tgt + b" HTTP/1.1\r\n" + H + b"\r\n", "405", "400")
    simple(pfx + "HTTP/2.0", lst, b"GET " + tgt + b" HTTP/2.0\r\n" + H + b"\r\n", "505")
    simple(pfx + "HTTP/1.1x", lst, b"GET " + tgt + b" HTTP/1.1x\r\n" + H + b"\r\n", "400")
    simple(pfx + "HTTP/0.9 simple request", lst, b"GET " + tgt + b"\r\n\r\n", "400")
    simple(pfx + "h2 preface", lst, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "505", "400")
    simple(pfx + "http/1.1 lowercase", lst, b"GET " + tgt + b" http/1.1\r\n" + H + b"\r\n", "400")
    simple(pfx + "two spaces", lst, b"GET  " + tgt + b" HTTP/1.1\r\n" + H + b"\r\n", "400")
    simple(pfx + "tab separator", lst, b"GET\t" + tgt + b" HTTP/1.1\r\n" + H + b"\r\n", "400")
    simple(pfx + "no Host on 1.1", lst, b"GET " + tgt + b" HTTP/1.1\r\n\r\n", "400")
    simple(
        pfx + "two Hosts", lst, b"GET " + tgt + b" HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "400"
    )
    simple(
        pfx + "two Authorization",
        lst,
        b"GET " + tgt + b" HTTP/1.1\r\n" + H + auth() + auth() + b"\r\n",
        "400",
    )
    simple(
        pfx + "101 header fields",
        lst,
        b"GET " + tgt + b" HTTP/1.1\r\n" + H + b"X: y\r\n" * 100 + b"\r\n",
        "431",
    )
    simple(
        pfx + "5000 tiny headers",
        lst,
        b"GET " + tgt + b" HTTP/1.1\r\n" + H + b"X:\r\n" * 5000 + b"\r\n",
        "431",
    )
    simple(
        pfx + "header line 20KiB",
        lst,
        b"GET " + tgt + b" HTTP/1.1\r\n" + H + b"X: " + b"a" * 20000 + b"\r\n\r\n",
        "431",
    )
    simple(
        pfx + "request line 9KiB",
        lst,
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n",
        "414",
    )
    simple(pfx + "request line 9KiB, no CRLF yet", lst, b"GET /" + b"a" * 9000, "414")
    simple(
        pfx + "head 1MiB no end",
        lst,
        b"GET " + tgt + b" HTTP/1.1\r\n" + b"X: aaaaaaaaaaaaaaaaaaaaaa\r\n" * 40000,
        "431",
    )
    simple(pfx + "only CRLFs (1MiB)", lst, b"\r\n" * 500000, "400", "EOF", "408")
    simple(pfx + "binary garbage", lst, os.urandom(4096), "400", "408", "414", "EOF", "431")
    simple(
        pfx + "Expect: 100-continue",
        lst,
        b"GET " + tgt + b" HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\n\r\n",
        "200",
        "400",
        "403",
        "404",
        "417",
    )
    simple(
        pfx + "Upgrade: h2c",
        lst,
        b"GET "
        + tgt
        + b" HTTP/1.1\r\n"
        + H
        + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        "403",
        "404",
        "200",
        "400",
    )
    simple(
        pfx + "high-bit bytes in header value",
        lst,
        b"GET " + tgt + b" HTTP/1.1\r\n" + H + b"X: \xff\xfe\r\n\r\n",
        "403",
        "404",
        "200",
        "400",
    )
    simple(
        pfx + "high-bit in target",
        lst,
        b"GET " + tgt + b"\xff HTTP/1.1\r\n" + H + b"\r\n",
        "400",
        "403",
        "404",
    )
    simple(
        pfx + "plain HTTP on TLS port",
        lst,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "EOF",
        "<<ConnectionResetError>>",
        tls=False,
    )
    probe(pfx + "TLS garbage after 0x16")(
        lambda w, lst=lst: (
            lambda r: (
                repr(r[:12]),
                "TLS alert or close",
                not r or r[:1] == b"\x15" or r.startswith(b"<<"),
            )
        )(exchange(w, lst, b"\x16\x03\x01\x00\x05hello" + os.urandom(200), tls=False))
    )
    simple(
        pfx + "no client certificate",
        lst,
        b"GET " + tgt + b" HTTP/1.1\r\n" + H + b"\r\n",
        "403",
        "407",
        "<<SSLError>>",
        "EOF",
        cert=False,
    )


def _sub(w: World, data: bytes) -> bytes:
    t = w.target.encode()
    for a in (b"target=T", b"://T", b" T ", b"@T"):
        data = data.replace(a, a.replace(b"T", t))
    return data


# Patch the target placeholder in at run time.
_orig = exchange


def exchange(w: World, listener: str, data: bytes, **kw: Any) -> bytes:  # type: ignore[no-redef]
    return _orig(w, listener, _sub(w, data), **kw)


# pipelining
@probe("scrape: pipelining 200 requests")
def _pipeline(w: World) -> Result:
    one = scrape(w, tq(w)).replace(b"Connection: close\r\n", b"")
    with connect(w, "scrape", tls=True) as s:
        s.sendall(one * 199 + scrape(w, tq(w)))
        resp = read_response(s, timeout=20)
    st = statuses(resp)
    return f"{len(st)} responses, {set(st)}", "200 x200", len(st) == 200 and set(st) == {"200"}


@probe("scrape: pipelined smuggle after a refused request")
def _pipeline_refused(w: World) -> Result:
    data = b"GET /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\n\r\n" + scrape(w, tq(w))
    resp = exchange(w, "scrape", data)
    st = statuses(resp)
    return str(st), "['400'] only", st == ["400"]


@probe("scrape: pipelining flood 2MiB without reading")
def _pipeline_flood(w: World) -> Result:
    one = scrape(w, tq(w)).replace(b"Connection: close\r\n", b"")
    with connect(w, "scrape", tls=True, timeout=5) as s:
        sent = 0
        s.settimeout(5)
        try:
            for _ in range(2 * MiB // len(one)):
                s.sendall(one * 1)
                sent += len(one)
        except (OSError, TimeoutError):
            pass
        return f"sent {sent} before push-back", "bounded", True


# slowloris
@probe("scrape: slowloris head (never finishes) -> 408 by the 10s deadline")
def _slowloris(w: World) -> Result:
    with connect(w, "scrape", tls=True, timeout=20) as s:
        s.sendall(b"GET /scrape HTTP/1.1\r\n")
        t0 = time.monotonic()
        try:
            for _ in range(60):
                s.sendall(b"X: y\r\n")
                s.settimeout(0.5)
                try:
                    d = s.recv(4096)
                    resp = d + read_response(s, timeout=5)
                    break
                except TimeoutError:
                    continue
            else:
                resp = b""
        except OSError as e:
            resp = str(e).encode()
        took = time.monotonic() - t0
    return (
        f"{status_of(resp)} after {took:.1f}s",
        "408 within ~10s",
        status_of(resp) == "408" and took < 12,
    )


@probe("scrape: idle after TCP connect, no TLS hello -> closed by handshake deadline")
def _idle_tls(w: World) -> Result:
    with socket.create_connection(w.addr("scrape"), timeout=20) as s:
        t0 = time.monotonic()
        resp = read_response(s, timeout=15)
        took = time.monotonic() - t0
    return f"{status_of(resp)} after {took:.1f}s", "EOF within ~10s", took < 12


# half close
@probe("scrape-plain: request then SHUT_WR (half-close) still answered")
def _half_close(w: World) -> Result:
    data = scrape(w, tq(w)).replace(b"Host: x\r\n", b"Host: x\r\n" + auth())
    return expect_status(exchange(w, "scrape-plain", data, shut=True), "200")


@probe("scrape-plain: partial head then SHUT_WR")
def _half_close_partial(w: World) -> Result:
    return expect_status(
        exchange(w, "scrape-plain", b"GET /scrape HTTP/1.1\r\nHo", shut=True), "EOF", "400"
    )


# client that never reads a big response
@probe("scrape: client never reads 1MiB responses x 20 conns (RSS bounded)")
def _never_read(w: World) -> Result:
    before = w.rss_kib()
    socks = []
    req = scrape(w, tq(w, "/big")).replace(b"Connection: close\r\n", b"")
    for _ in range(20):
        s = connect(w, "scrape", tls=True)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(req * 8)  # 8 pipelined requests: ~8 MiB each
        socks.append(s)
    time.sleep(3)
    during = w.rss_kib()
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()
    time.sleep(1)
    grew = during - before
    return f"RSS {before} -> {during} KiB (+{grew})", "< +40MiB for 160MiB asked", grew < 40 * 1024


# path tricks on /scrape path=
for p, want in [
    ("/metrics", "200"), ("/%6Detrics", "200"), ("/metrics/", "403"), ("//metrics", "400"),
    ("/%2e%2e/metrics", "400"), ("/%2E%2E/admin", "400"), ("/p/..%2fmetrics", "400"),
    ("/p/%2fmetrics", "400"), ("/p/%252e%252e", "400"), ("/metrics;x=1", "400"),
    ("/metrics%3bx", "400"), ("\\metrics", "400"), ("/p\\..\\metrics", "400"),
    ("/./metrics", "400"), ("/metrics/.", "400"), ("/metrics%00", "400"), ("/metrics%", "400"),
    ("/metrics%zz", "400"), ("metrics", "400"), ("/metrics?x=1", "400"), ("/metrics%3Fx", "403"),
    ("/metrics%23x", "403"), ("/p/%C3%A9", "200"), ("/p/%c3%a9", "200"), ("/p/é", "400"),
    ("/p/a:b", "200"), ("/p/a%3Ab", "403"), ("/%2e", "400"), ("/.%2e/", "400"),
    ("/metrics%0d%0aX:%20y", "400"), ("/metrics%20HTTP/1.1", "403"),
]:  # fmt: skip
    from urllib.parse import quote

    probe(f"scrape path={p!r}")(
        lambda w, p=p, want=want: expect_status(
            exchange(w, "scrape", scrape(w, tq(w, quote(p, safe="")))), want
        )
    )
# raw (not re-encoded) path= values
for raw, want in [
    ("/%2e%2e/metrics", "400"),
    ("/metrics%0d%0aX", "400"),
    ("/metrics%00", "400"),
    ("%2Fmetrics", "200"),
]:
    probe(f"scrape raw path={raw}")(
        lambda w, raw=raw, want=want: expect_status(
            exchange(w, "scrape", scrape(w, tq(w, raw))), want
        )
    )

# query-string tricks
for qs, want in [
    ("route=node&route=node&target=T", "400"),
    ("route=node&target=T&target=T", "400"),
    ("route[]=node&target=T", "400"),
    ("route=node&target[]=T", "400"),
    ("route=n%6Fde&target=T", "200"),
    ("route=node&target=T&module=a&module=b", "400"),
    ("route=node&target=T&evil=1", "400"),
    ("route=node&target=T&module=%C3%A9", "200"),
    ("route=node&target=T&mod%75le=x", "200"),
    ("route=nöde&target=T", "400"),
    ("route=node&target=T&" + "&".join(f"k{i}=v" for i in range(40)), "400"),
    ("route=node&target=T&module=" + "a" * 7000, "200"),
    ("route=node;target=T", "400"),
    ("route=node&target=T%00", "404"),
    ("route=node&target=127.0.0.1:22", "404"),
    ("route=node&target=T#frag", "404"),
    ("route=node&target=T&path=/metrics&path=/big", "400"),
    ("route=node%00&target=T", "404"),
    ("route=&target=T", "400"),
    ("target=T", "400"),
    ("route=node&target=T&route=secure", "400"),
    ("route=node&target=T&module=a%0d%0aX-Inject:%201", "200"),
    ("&&&&route=node&target=T", "200"),
    ("route=node&target=T&=x", "400"),
    ("route=%ZZ&target=T", "404"),
]:  # fmt: skip

    def _qs(w: World, qs: str = qs, want: str = want) -> Result:
        return expect_status(
            exchange(w, "scrape", scrape(w, qs.replace("=T", "=" + w.target))), want
        )

    probe(f"scrape query {qs[:60]!r}")(_qs)


@probe("scrape: param with CRLF is encoded upstream, no header injection")
def _param_inject(w: World) -> Result:
    n = len(w.up.requests)
    exchange(w, "scrape", scrape(w, tq(w, extra="&module=a%0d%0aX-Inject:%201")))
    new = w.up.requests[n:]
    bad = [r for r in new if b"X-Inject" in r.split(b"\r\n", 1)[-1]]
    return repr(new[-1][:120] if new else None), "no X-Inject header line", bool(new) and not bad


# upstream misbehaviour
for path, want in [
    ("/garbage", "502"), ("/garbage2", "502"), ("/infinite-headers", "502"), ("/many-headers", "502"),
    ("/infinite-chunked", "200-truncated"), ("/infinite-close", "200-truncated"),
    # Malformed framing in the first chunk: the head was already written, so the client's
    # connection is cut (nothing usable arrives), or a 502 if the head was still held.
    ("/chunk-overflow", "502|EOF"), ("/chunk-negative", "502|EOF"),
    ("/chunk-bigsize", "200-truncated"), ("/cl-te", "502"), ("/dup-cl", "502"), ("/neg-cl", "502"),
    ("/plus-cl", "502"), ("/huge-cl", "502"), ("/te-gzip", "502"), ("/obs-fold", "502"),
    ("/bare-lf", "502|504"), ("/early-close", "200-truncated"), ("/early-close-head", "502"),
    ("/slow-drip", "200-truncated"), ("/slow-head", "504"), ("/interim-flood", "504|502"),
    ("/upgrade", "502"), ("/extra-bytes", "200"), ("/ctl-header", "502"), ("/header-inject", "502"),
    ("/trailers", "502-or-truncated"), ("/big", "200"),
]:  # fmt: skip

    def _up(w: World, path: str = path, want: str = want) -> Result:
        t0 = time.monotonic()
        resp = exchange(w, "scrape", scrape(w, tq(w, path)), timeout=20)
        took = time.monotonic() - t0
        st = status_of(resp)
        head, _, body = resp.partition(b"\r\n\r\n")
        info = f"{st} {len(resp)}B {took:.1f}s"
        if want == "200-truncated":
            # must not end like a clean response: chunked without last-chunk, or short CL
            complete = body.endswith(b"0\r\n\r\n") or (
                b"Content-Length: %d\r\n" % len(body) in head + b"\r\n"
            )
            ok = (st == "200" and not complete) or st in ("502", "504")
            return info + (" complete!" if complete else " truncated"), want, ok and took < 12
        if want == "502-or-truncated":
            return info, want, st in ("502",) or (st == "200" and not body.endswith(b"0\r\n\r\n"))
        return info, want, st in want.split("|") and took < 12

    probe(f"upstream {path}")(_up)


# forward proxy: CONNECT and absolute-form
for data, want in [
    (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n", "403"),
    (b"CONNECT localhost:1 HTTP/1.1\r\nHost: x\r\n\r\n", "403"),
    (b"CONNECT T HTTP/1.1\r\nHost: x\r\n\r\n", "403"),  # an http route's target via CONNECT
    (b"CONNECT [::1]:22 HTTP/1.1\r\nHost: x\r\n\r\n", "403"),
    (b"CONNECT 127.0.0.1 HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"CONNECT 127.0.0.1:99999 HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"CONNECT http://127.0.0.1:22/ HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\nGET http://T/metrics HTTP/1.1\r\nHost: x\r\n\r\n", "403"),
    (b"CONNECT 2130706433:22 HTTP/1.1\r\nHost: x\r\n\r\n", "403|400"),
    (b"CONNECT 0x7f.1:22 HTTP/1.1\r\nHost: x\r\n\r\n", "403|400"),
    (b"CONNECT 127.0.0.1%2522:22 HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"CONNECT user@127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"GET http://127.0.0.1:22/ HTTP/1.1\r\nHost: x\r\n\r\n", "403"),
    (b"GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n", "403"),
    (b"GET http://[::1]:22/ HTTP/1.1\r\nHost: x\r\n\r\n", "403"),
    (b"GET http://localhost/ HTTP/1.1\r\nHost: x\r\n\r\n", "403"),
    (b"GET http://0177.0.0.1:22/ HTTP/1.1\r\nHost: x\r\n\r\n", "403|400"),
    (b"GET http://T@127.0.0.1:22/ HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"GET http://127.0.0.1:22#@T/metrics HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"GET http://T\\@127.0.0.1:22/ HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"GET https://T/metrics HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"GET ftp://T/metrics HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"GET HTTP://T/metrics HTTP/1.1\r\nHost: x\r\n\r\n", "200"),
    (b"GET http://T/metrics HTTP/1.1\r\nHost: x\r\n\r\n", "200"),
    (b"GET http://T HTTP/1.1\r\nHost: x\r\n\r\n", "403"),
    (b"GET http://T/%2e%2e/metrics HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"GET http://T/p/..%2fmetrics HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"GET http://T//metrics HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"GET http://T/metrics;x HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"GET http://T/metrics\\ HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"GET http://T/%252e HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"GET http://T/./metrics HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"GET http://T/%6Detrics HTTP/1.1\r\nHost: x\r\n\r\n", "200"),
    (b"GET http://T/metrics?module=a&module=b HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"GET http://T/metrics?evil=1 HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"GET http://T/metrics?module=%ff HTTP/1.1\r\nHost: x\r\n\r\n", "200|400"),
    (b"GET http://T/metrics?module=\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"GET http://T./metrics HTTP/1.1\r\nHost: x\r\n\r\n", "200|400|403"),
    (b"GET http://T:/metrics HTTP/1.1\r\nHost: x\r\n\r\n", "400|403"),
    (b"GET http://T/metrics HTTP/1.1\r\nHost: x\r\n\r\nGET http://127.0.0.1:22/ HTTP/1.1\r\nHost: x\r\n\r\n", "200,403"),
    (b"POST http://T/metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", "405"),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", "400|405"),
    (b"GET http://T/p/%C3%A9 HTTP/1.1\r\nHost: x\r\n\r\n", "200"),
    (b"GET http://T/p/\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
]:  # fmt: skip

    def _fwd(w: World, data: bytes = data, want: str = want) -> Result:
        data = (
            data.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
            if b"," not in want.encode()
            else data.replace(b"Host: x\r\n\r\nGET", b"Host: x\r\n\r\nGET").replace(
                b"22/ HTTP/1.1\r\nHost: x\r\n\r\n",
                b"22/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
        )
        resp = exchange(w, "egress", data)
        if "," in want:
            got = ",".join(statuses(resp))
            return got, want, got == want
        got = status_of(resp)
        return got, want, got in want.split("|")

    probe(f"forward {data[:70]!r}")(_fwd)


@probe("forward: CONNECT allowed, tunnel echoes TLS inside")
def _connect_ok(w: World) -> Result:
    with connect(w, "egress", tls=True) as s:
        s.sendall(b"CONNECT %s HTTP/1.1\r\nHost: x\r\n\r\n" % w.tls_echo.address.encode())
        head = read_head(s)
        ok = head.startswith(b"HTTP/1.1 200")
        # now plain bytes (not TLS) into a TLS echo: it will fail the handshake and close
        s.sendall(b"GET http://127.0.0.1:22/ HTTP/1.1\r\nHost: x\r\n\r\n")
        rest = read_response(s, timeout=10)
    return (
        f"{status_of(head)} then {len(rest)}B {rest[:30]!r}",
        "200, then bytes relayed, not parsed",
        ok and b"HTTP/1.1 403" not in rest,
    )


@probe("forward-plain: CONNECT without credentials -> 407")
def _connect_407(w: World) -> Result:
    return expect_status(
        exchange(
            w,
            "egress-plain",
            b"CONNECT %s HTTP/1.1\r\nHost: x\r\n\r\n" % w.tls_echo.address.encode(),
        ),
        "407",
        "403",
    )


@probe("forward: CONNECT then early data over 64KiB before tunnel opens")
def _connect_early(w: World) -> Result:
    with connect(w, "egress", tls=True) as s:
        s.sendall(
            b"CONNECT %s HTTP/1.1\r\nHost: x\r\n\r\n" % w.tls_echo.address.encode()
            + b"\x16" * 200000
        )
        resp = read_response(s, timeout=10)
    return (
        f"{status_of(resp)} {len(resp)}B",
        "200 then closed, bounded",
        resp.startswith(b"HTTP/1.1 200"),
    )


@probe("scrape-plain: 300 idle connections opened then dropped (fds return)")
def _conn_flood(w: World) -> Result:
    before = w.fds()
    socks = [socket.create_connection(w.addr("scrape-plain"), timeout=5) for _ in range(300)]
    time.sleep(0.5)
    during = w.fds()
    for s in socks:
        s.close()
    end = time.monotonic() + 5
    while w.fds() > before + 2 and time.monotonic() < end:
        time.sleep(0.1)
    after = w.fds()
    return f"fds {before} -> {during} -> {after}", "back to baseline", after <= before + 2


# tcp listeners
@probe("tcp raw: echo through mTLS")
def _tcp_echo(w: World) -> Result:
    with connect(w, "raw", tls=True) as s:
        s.sendall(b"hello")
        s.settimeout(5)
        d = s.recv(100)
    return repr(d), "b'hello'", d == b"hello"


@probe("tcp raw: plain bytes on TLS port")
def _tcp_plain(w: World) -> Result:
    resp = exchange(w, "raw", b"GET / HTTP/1.1\r\n\r\n", tls=False)
    return status_of(resp), "closed", b"HTTP" not in resp


for name, data in [
    ("random bytes", os.urandom(512)),
    ("0x16 then junk", b"\x16\x03\x01\xff\xff" + os.urandom(300)),
    ("record len 0", b"\x16\x03\x01\x00\x00"),
    ("huge record len", b"\x16\x03\x01\x7f\xff" + b"\x01" * 100),
    ("handshake len overflow", b"\x16\x03\x01\x00\x08\x01\xff\xff\xff\x03\x03\x00\x00"),
    ("plain HTTP", b"GET / HTTP/1.1\r\nHost: echo.example.org\r\n\r\n"),
    ("SSLv2 hello", b"\x80\x2e\x01\x00\x02\x00\x15" + b"\x00" * 40),
    ("truncated hello then EOF", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
    ("empty", b""),
]:

    def _pass(w: World, data: bytes = data) -> Result:
        with socket.create_connection(w.addr("pass"), timeout=15) as s:
            if data:
                s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            resp = read_response(s, timeout=15)
        return (
            f"{len(resp)}B {resp[:20]!r}",
            "closed, nothing relayed",
            len(resp) < 64 and b"HTTP" not in resp,
        )

    probe(f"passthrough: ClientHello {name}")(_pass)


@probe("passthrough: 16KiB ClientHello drip-fed, never finished")
def _pass_slow(w: World) -> Result:
    with socket.create_connection(w.addr("pass"), timeout=20) as s:
        t0 = time.monotonic()
        s.sendall(b"\x16\x03\x01\x40\x00\x01\x00\x3f\xfc\x03\x03")
        resp = read_response(s, timeout=15)
        took = time.monotonic() - t0
    return f"{resp[:20]!r} after {took:.1f}s", "closed by a deadline (<=10s)", took < 12


@probe("passthrough: good SNI echoes")
def _pass_ok(w: World) -> Result:
    ctx = ssl.create_default_context(cafile=str(w.pki.ca_cert))
    ctx.check_hostname = False
    with socket.create_connection(w.addr("pass"), timeout=15) as raw:
        with ctx.wrap_socket(raw, server_hostname="echo.example.org") as s:
            s.sendall(b"ping")
            d = s.recv(10)
    return repr(d), "b'ping'", d == b"ping"


# -- running ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[])
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    w = World(args.keep)
    failures = 0
    try:
        time.sleep(0.5)
        fd0, rss0 = w.fds(), w.rss_kib()
        for name, fn in PROBES:
            if args.only and not any(o in name for o in args.only):
                continue
            t0 = time.monotonic()
            try:
                observed, expected, ok = fn(w)
            except Exception as e:
                observed, expected, ok = f"probe error {type(e).__name__}: {e}", "-", False
            if not w.alive():
                print(f"GATEWAY DIED during {name}")
                failures += 1
                break
            mark = "ok  " if ok else "FAIL"
            failures += not ok
            print(
                f"{mark} {time.monotonic() - t0:5.1f}s {name} :: {observed} (want {expected})",
                flush=True,
            )
        time.sleep(2)  # let aborted connections and upstream sockets settle
        fd1, rss1 = w.fds(), w.rss_kib()
        print(f"fds {fd0} -> {fd1}; RSS {rss0} -> {rss1} KiB")
        if fd1 > fd0 + 4:
            print("FAIL fd leak?")
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{w.pid}/fd"):
                    print("   ", fd, os.readlink(f"/proc/{w.pid}/fd/{fd}"))
            failures += 1
        log = w.gate.log()
        for bad in ("Traceback", "Unhandled", "Unhandled error"):
            if bad in log:
                print(f"FAIL {bad!r} in the twistd log:")
                i = log.find(bad)
                print(log[max(0, i - 2000) : i + 3000])
                failures += 1
                break
    finally:
        w.stop()
    rc = (
        promgate_main(["audit", "verify", "--key-file", str(w.pki.audit_key), str(w.audit)])
        if w.audit.exists()
        else 1
    )
    print(f"audit verify rc={rc}")
    w.cleanup()
    failures += rc != 0
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
