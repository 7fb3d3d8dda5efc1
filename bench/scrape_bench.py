#!/usr/bin/env python3
"""Scrape throughput, latency and CPU per scrape: direct vs promgate vs a peer HAProxy.

One command, bounded in time, everything on 127.0.0.1, every subprocess cleaned up::

    .venv/bin/python bench/scrape_bench.py            # full matrix, 10 s per run
    .venv/bin/python bench/scrape_bench.py --quick    # smoke run, ~1 minute

Topology (see bench/README.md for how to read the results)::

    direct : wrk --http--> backend (nginx, static files)
    gateway: wrk --http--> haproxy "originator" --mTLS--> twistd promgate --http--> backend
    jwt    : wrk --http--> haproxy "originator" --mTLS + Bearer JWT--> twistd promgate --> backend
    peer   : wrk --http--> haproxy "originator" --mTLS--> haproxy "peer"  --http--> backend
    floor  : wrk --http--> haproxy "originator" --mTLS--> bench/tls_floor.py --tcp--> backend

The floor is a bare Twisted TLS-terminating TCP relay (no HTTP, no policy, no audit): the part
of promgate's cost that is Twisted's reactor and TLS.

wrk cannot present a client certificate, so a local HAProxy (the originator) turns wrk's
plain keep-alive requests into mutual-TLS requests, exactly like Prometheus would send
them. The same originator process serves both the gateway and the peer path, so its cost
is the same on both sides of the comparison; its CPU is reported so you can see it is not
the bottleneck.

The jwt path is the same gateway process and listener; its connections present a client
certificate that names no identity, and every request carries ``Authorization: Bearer JWT``
(one RS256 token minted at start with a key made here, its JWKS served by the backend), so
the JWT alone names the caller. Its row next to the mTLS row is the cost of a JWT scrape.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAYLOADS = {"20KB": 20 * 1024, "5MB": 5 * 1024 * 1024}
PAYLOAD_FILES = {"20KB": "small.prom", "5MB": "large.prom"}
ROUTES = {"20KB": "small", "5MB": "large"}
MODES = ("direct", "gateway", "gateway_jwt", "peer", "floor")
#: How each mode is named in the table.
MODE_NAMES = {
    "gateway": "promgate",
    "gateway_jwt": "promgate-jwt",
    "peer": "haproxy",
    "floor": "floor",
}
#: Whose CPU is "gw" for each mode: promgate serves both its modes in one process.
SUBJECTS = {
    "direct": "backend",
    "gateway": "gateway",
    "gateway_jwt": "gateway",
    "peer": "peer",
    "floor": "floor",
}
GATEWAY_MODES = ("gateway", "gateway_jwt")
CLIENT = "prometheus"
#: The client certificate of the jwt path: it names no identity, so the token decides.
JWT_CLIENT = "jwt-scraper"
#: The token's subject, and the identity its jwt rule names.
JWT_SUBJECT = "prometheus-client"
JWT_IDENTITY = "prometheus-jwt"
JWT_AUDIENCE = "promgate"
#: Long enough for any run; the gateway checks exp on every cached use.
JWT_LIFETIME = 24 * 3600
# What Prometheus 2.x sends (minus Accept-Encoding: gzip, so every path moves the same bytes).
WRK_HEADERS = (
    "Accept: application/openmetrics-text;version=1.0.0;q=0.5,"
    "text/plain;version=0.0.4;q=0.4,*/*;q=0.1",
    "User-Agent: Prometheus/2.53.0",
    "X-Prometheus-Scrape-Timeout-Seconds: 30",
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# -- processes -------------------------------------------------------------------------------


class Supervisor:
    """Every subprocess we start, so that all of them are ended on the way out."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.gateways: list[Any] = []

    def start(
        self, name: str, argv: Sequence[str], *, log_path: Path, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: workers die with it
            )
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for gw in reversed(self.gateways):
            with contextlib.suppress(Exception):
                gw.stop(timeout=10)
        for _name, proc in reversed(self.procs):
            _terminate(proc)
        self.procs.clear()
        self.gateways.clear()


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    # The group is the one start_new_session gave this child (its pid): only our processes.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(
    port: int, proc: subprocess.Popen[bytes] | None, what: str, logf: Path, timeout: float = 15
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited {proc.returncode}:\n{_tail(logf)}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise BenchError(f"{what} not listening on {port} after {timeout}s:\n{_tail(logf)}")
        time.sleep(0.05)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def taskset(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


def pin_all_threads(pid: int, cpus: str | None) -> None:
    """Pin every thread of a running process (new threads inherit the mask)."""
    if not cpus:
        return
    mask = _parse_cpus(cpus)
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), mask)


def _parse_cpus(spec: str) -> set[int]:
    out: set[int] = set()
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.update(range(int(a), int(b) + 1))
        elif part:
            out.add(int(part))
    return out


# -- CPU accounting --------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """utime+stime of a whole process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(b")") + 2 :].split()
        if int(rest[1]) == pid:
            out.append(int(entry))
    return out


class CPUProbe:
    """Sum of utime+stime over a fixed set of pids."""

    def __init__(self, name: str, pids: Sequence[int]) -> None:
        self.name = name
        self.pids = list(pids)

    def read(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total += proc_cpu(pid)
        return total


# -- payloads --------------------------------------------------------------------------------


def prometheus_text(size: int) -> bytes:
    """Deterministic Prometheus text exposition of about ``size`` bytes."""
    out: list[bytes] = []
    total = 0
    family = 0
    while total < size:
        name = f"bench_http_requests_{family}_total"
        block = [
            f"# HELP {name} Requests handled, by handler and code (family {family}).\n",
            f"# TYPE {name} counter\n",
        ]
        for i in range(24):
            block.append(
                f'{name}{{code="{200 + (i % 5)}",handler="/api/v1/endpoint_{i}",'
                f'instance="10.{family % 256}.{i}.7:9100",job="node"}} '
                f"{(family * 7919 + i * 104729) % 10_000_000}.0\n"
            )
        data = "".join(block).encode()
        out.append(data)
        total += len(data)
        family += 1
    return b"".join(out)


# -- backend ---------------------------------------------------------------------------------

NGINX_CONF = """\
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    types {{ }}
    default_type "text/plain; version=0.0.4; charset=utf-8";
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    etag off;
    server_tokens off;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        root {www};
        location / {{ }}
    }}
}}
"""


class Backend:
    kind = ""
    port = 0
    pids: list[int] = []

    def cpu_probe(self) -> CPUProbe:
        return CPUProbe(f"backend({self.kind})", self.pids)


class NginxBackend(Backend):
    kind = "nginx"

    def __init__(self, sup: Supervisor, tmp: Path, www: Path, cpus: str | None) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.port = free_port()
        conf = tmp / "nginx.conf"
        (tmp / "nginx-body").mkdir(exist_ok=True)
        (tmp / "nginx-proxy").mkdir(exist_ok=True)
        conf.write_text(NGINX_CONF.format(tmp=tmp, www=www, port=self.port))
        logf = tmp / "nginx.out"
        base = [nginx, "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c", str(conf)]
        check = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            # nginx before 1.19.5 has no -e; try without it.
            base = [nginx, "-p", str(tmp), "-c", str(conf)]
            check = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=30)
            if check.returncode != 0:
                raise BenchError(f"nginx -t failed:\n{check.stderr}")
        self.proc = sup.start("nginx", taskset(cpus) + base + ["-g", "daemon off;"], log_path=logf)
        wait_listening(self.port, self.proc, "nginx", tmp / "nginx-error.log")
        self.pids = [self.proc.pid, *children_of(self.proc.pid)]


class PythonBackend(Backend):
    """Fallback when nginx is not installed: a threaded Python server (clearly slower)."""

    kind = "python-threaded (fallback: direct numbers are bounded by Python)"

    def __init__(self, sup: Supervisor, tmp: Path, www: Path, cpus: str | None) -> None:
        self.port = free_port()
        script = tmp / "pybackend.py"
        script.write_text(_PY_BACKEND)
        logf = tmp / "pybackend.out"
        self.proc = sup.start(
            "pybackend",
            [*taskset(cpus), sys.executable, str(script), str(self.port), str(www)],
            log_path=logf,
        )
        wait_listening(self.port, self.proc, "python backend", logf)
        self.pids = [self.proc.pid]


_PY_BACKEND = r"""
import sys, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, www = int(sys.argv[1]), sys.argv[2]
files = {"/" + n: open(os.path.join(www, n), "rb").read() for n in os.listdir(www)}
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are separate writes
    def do_GET(self):
        body = files.get(self.path.split("?", 1)[0])
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer.request_queue_size = 1024
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


# -- haproxy ---------------------------------------------------------------------------------

HAPROXY_DEFAULTS = """\
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
    timeout http-request 30s
"""

ORIGINATOR_CFG = """\
global
    nbthread {threads}
    maxconn 4000
    stats socket {sock} mode 600 level user
    ssl-server-verify required
    tune.ssl.cachesize 1000
{defaults}
frontend to_gateway
    bind 127.0.0.1:{p_gateway}
    default_backend gateway
frontend to_gateway_jwt
    bind 127.0.0.1:{p_gateway_jwt}
    default_backend gateway_jwt
frontend to_peer
    bind 127.0.0.1:{p_peer}
    default_backend peer
frontend to_floor
    bind 127.0.0.1:{p_floor}
    default_backend floor
backend gateway
    server gate 127.0.0.1:{gate_port} {tls_out}
backend gateway_jwt
    server gate 127.0.0.1:{gate_port} {tls_out_jwt}
backend peer
    server peer 127.0.0.1:{peer_port} {tls_out}
backend floor
    server floor 127.0.0.1:{floor_port} {tls_out}
"""

PEER_CFG = """\
global
    nbthread {threads}
    maxconn 4000
{defaults}
frontend gate
    bind 127.0.0.1:{port} ssl crt {gate_pem} ca-file {ca} verify required {tls_in}
    # The same per-request work, in spirit, as promgate: identity check and route -> path.
    http-request deny deny_status 403 unless {{ ssl_c_s_dn(CN) -m str {client} }}
    http-request deny deny_status 404 unless {{ path /scrape }}
    http-request set-path /small.prom if {{ urlp(route) -m str small }}
    http-request set-path /large.prom if {{ urlp(route) -m str large }}
    default_backend exporter
backend exporter
    server exporter 127.0.0.1:{backend_port}
"""


def start_haproxy(
    sup: Supervisor, name: str, cfg_text: str, tmp: Path, cpus: str | None, ports: Sequence[int]
) -> subprocess.Popen[bytes]:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    cfg = tmp / f"{name}.cfg"
    cfg.write_text(cfg_text)
    check = subprocess.run(
        [haproxy, "-c", "-q", "-f", str(cfg)], capture_output=True, text=True, timeout=30
    )
    if check.returncode != 0:
        raise BenchError(f"haproxy -c {cfg} failed:\n{check.stdout}{check.stderr}")
    logf = tmp / f"{name}.out"
    proc = sup.start(name, [*taskset(cpus), haproxy, "-db", "-f", str(cfg)], log_path=logf)
    for p in ports:
        wait_listening(p, proc, f"haproxy {name}", logf)
    return proc


def haproxy_stat(sock: Path) -> dict[str, dict[str, str]]:
    """``show stat`` over the stats socket: {"backend/svname": row}."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    lines = b"".join(chunks).decode(errors="replace").splitlines()
    header = lines[0].lstrip("# ").split(",")
    out = {}
    for line in lines[1:]:
        if not line.strip():
            continue
        row = dict(zip(header, line.split(","), strict=False))
        out[f"{row['pxname']}/{row['svname']}"] = row
    return out


def backend_2xx(sock: Path, backend: str) -> int:
    row = haproxy_stat(sock)[f"{backend}/BACKEND"]
    return int(row.get("hrsp_2xx") or 0)


# -- promgate --------------------------------------------------------------------------------

PROMGATE_CFG = """\
tls:
  certificate: {gate_cert}
  key: {gate_key}
  client_ca: {ca}
admin:
  endpoint: "tcp:0:interface=127.0.0.1"
listeners:
  - name: scrape
    protocol: http
    endpoint: "tcp:0:interface=127.0.0.1"
identity_providers:
  bench:
    issuer: "{jwt_issuer}"
    jwks_uri: "{jwt_issuer}/jwks.json"
    audiences: [{jwt_audience}]
    algorithms: [RS256]
identities:
  {client}:
    cert: {{uri: "spiffe://promgate.local/{client}"}}
    roles: [scraper]
  {jwt_identity}:
    jwt: {{provider: bench, subject: {jwt_subject}}}
    roles: [scraper]
routes:
  small:
    scheme: http
    metrics_path: /small.prom
    allow: ["role:scraper"]
    timeout: 60s
    max_response_size: 64MiB
    targets:
      static: ["127.0.0.1:{backend_port}"]
  large:
    scheme: http
    metrics_path: /large.prom
    allow: ["role:scraper"]
    timeout: 60s
    max_response_size: 64MiB
    targets:
      static: ["127.0.0.1:{backend_port}"]
audit:
  path: audit.jsonl
  key_file: {audit_key}
  fsync: {fsync}
  on_failure: deny
"""


class BenchIssuer:
    """An RSA signing key made for this run, its JWKS document, and tokens it signs.

    The JWKS is a static file the backend serves at ``{issuer}/jwks.json`` (the
    provider's fixed ``jwks_uri``, the issuer being the backend's URL); one token is
    minted at start, as Prometheus's ``oauth2`` reuses one token for many scrapes.
    """

    KID = "bench-1"

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa
        from jwt.algorithms import RSAAlgorithm

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        self.jwks = json.dumps(
            {"keys": [{**jwk, "kid": self.KID, "use": "sig", "alg": "RS256"}]}
        ).encode()

    def mint(self, issuer: str) -> str:
        import jwt

        now = int(time.time())
        claims = {
            "iss": issuer,
            "sub": JWT_SUBJECT,
            "aud": JWT_AUDIENCE,
            "iat": now,
            "exp": now + JWT_LIFETIME,
            "jti": f"bench-{now}",
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.KID})


def admin_counter(admin: str, metric: str) -> dict[str, float]:
    """Samples of one metric from promgate's admin /metrics (plain HTTP on loopback)."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(metric):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# -- wrk -------------------------------------------------------------------------------------

_UNITS_T = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_UNITS_B = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS_T[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    m = re.search(r"(\d+) requests in ([0-9.]+)(us|ms|s|m|h), ([0-9.]+)(B|KB|MB|GB|TB) read", out)
    if not m:
        raise BenchError(f"cannot parse wrk output:\n{out}")
    res["requests"] = int(m.group(1))
    res["seconds"] = _ms(m.group(2) + m.group(3)) / 1000
    res["bytes_read"] = float(m.group(4)) * _UNITS_B[m.group(5)]
    m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    res["rps"] = float(m.group(1)) if m else res["requests"] / max(res["seconds"], 1e-9)
    lat = {}
    for pct, val in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M):
        lat[f"p{pct}_ms"] = _ms(val)
    res.update(lat)
    m = re.search(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
    if m:
        res["mean_ms"], res["stdev_ms"], res["max_ms"] = (_ms(m.group(i)) for i in (1, 2, 3))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True))
        if m
        else {}
    )
    return res


def wrk_argv(
    url: str, conc: int, duration: float, cpus: str | None, extra: Sequence[str] = ()
) -> list[str]:
    threads = 1 if conc < 8 else 2
    argv = [
        *taskset(cpus),
        shutil.which("wrk") or "/usr/bin/wrk",
        f"-t{threads}",
        f"-c{conc}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "30s",
        "--latency",
    ]
    for h in (*WRK_HEADERS, *extra):
        argv += ["-H", h]
    return [*argv, url]


# -- the benchmark ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, sup: Supervisor, tmp: Path) -> None:
        self.args = args
        self.sup = sup
        self.tmp = tmp
        self.load_cpus: str | None = None
        self.gate_cpus: str | None = None
        if args.pin:
            ncpu = os.cpu_count() or 1
            if not shutil.which("taskset"):
                raise BenchError("--pin needs taskset (util-linux)")
            if ncpu < 2:
                log("--pin needs at least 2 CPUs; not pinning")
            else:
                self.gate_cpus = args.gateway_cpus or "1"
                self.load_cpus = args.load_cpus or ",".join(
                    str(c) for c in range(ncpu) if c not in _parse_cpus(self.gate_cpus)
                )
                log(
                    f"pinning: gateway/peer on CPU {self.gate_cpus}; "
                    f"wrk, originator, backend on {self.load_cpus}"
                )

    # setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        from promgate.testing import GatewayProcess, TestPKI

        tmp = self.tmp
        www = tmp / "www"
        www.mkdir()
        self.sizes: dict[str, int] = {}
        for label, size in PAYLOADS.items():
            body = prometheus_text(size)
            (www / PAYLOAD_FILES[label]).write_bytes(body)
            self.sizes[label] = len(body)
        idp = BenchIssuer()
        (www / "jwks.json").write_bytes(idp.jwks)
        # nginx workers may run as an unprivileged user: let them read the files.
        for p in (tmp, www, *www.iterdir()):
            p.chmod(0o755 if p.is_dir() else 0o644)

        if self.args.backend in ("auto", "nginx") and (
            shutil.which("nginx") or Path("/usr/sbin/nginx").exists()
        ):
            self.backend: Backend = NginxBackend(self.sup, tmp, www, self.load_cpus)
        elif self.args.backend == "nginx":
            raise BenchError("nginx not found (apt-get install -y nginx-light)")
        else:
            log(
                "nginx not found: falling back to a threaded Python backend "
                "(apt-get install -y nginx-light)"
            )
            self.backend = PythonBackend(self.sup, tmp, www, self.load_cpus)
        log(f"backend {self.backend.kind} on 127.0.0.1:{self.backend.port}")
        self.jwt_issuer = f"http://127.0.0.1:{self.backend.port}"
        self.jwt_token = idp.mint(self.jwt_issuer)

        pki = TestPKI(tmp / "pki")
        cert, key = pki.client(CLIENT)
        client_pem = tmp / "pki" / "client-combined.pem"
        client_pem.write_bytes(cert.read_bytes() + key.read_bytes())
        cert, key = pki.client(JWT_CLIENT)
        jwt_client_pem = tmp / "pki" / "jwt-client-combined.pem"
        jwt_client_pem.write_bytes(cert.read_bytes() + key.read_bytes())
        gate_pem = tmp / "pki" / "gate-combined.pem"
        gate_pem.write_bytes(pki.gate_cert.read_bytes() + pki.gate_key.read_bytes())

        # promgate
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        cfg = PROMGATE_CFG.format(
            gate_cert=pki.gate_cert,
            gate_key=pki.gate_key,
            ca=pki.ca_cert,
            client=CLIENT,
            backend_port=self.backend.port,
            audit_key=pki.audit_key,
            fsync=self.args.audit_fsync,
            jwt_issuer=self.jwt_issuer,
            jwt_audience=JWT_AUDIENCE,
            jwt_identity=JWT_IDENTITY,
            jwt_subject=JWT_SUBJECT,
        )
        self.gateway = GatewayProcess(tmp / "promgate", cfg)
        self.sup.gateways.append(self.gateway)
        self.gateway.start(timeout=60)
        assert self.gateway.process is not None
        self.gate_pid = self.gateway.process.pid
        pin_all_threads(self.gate_pid, self.gate_cpus)
        gate_addr = self.gateway.address("scrape")
        self.gate_port = int(gate_addr.rpartition(":")[2])
        self.admin = self.gateway.address("admin")
        log(f"promgate pid {self.gate_pid} on {gate_addr} (admin {self.admin})")
        self.wait_for_keys()

        # peer haproxy (mTLS-terminating gateway)
        self.peer_port = free_port()
        peer_cfg = PEER_CFG.format(
            tls_in="alpn http/1.1 ssl-min-ver TLSv1.2",
            threads=self.args.peer_threads,
            defaults=HAPROXY_DEFAULTS,
            port=self.peer_port,
            gate_pem=gate_pem,
            ca=pki.ca_cert,
            client=CLIENT,
            backend_port=self.backend.port,
        )
        self.peer = start_haproxy(self.sup, "peer", peer_cfg, tmp, self.gate_cpus, [self.peer_port])
        log(f"peer haproxy pid {self.peer.pid} on 127.0.0.1:{self.peer_port}")

        # the floor: a bare Twisted TLS relay to the backend, on the gateway's CPU
        self.floor_port = free_port()
        self.floor = self.sup.start(
            "floor",
            [
                *taskset(self.gate_cpus),
                sys.executable,
                str(HERE / "tls_floor.py"),
                f"--port={self.floor_port}",
                f"--cert={pki.gate_cert}",
                f"--key={pki.gate_key}",
                f"--ca={pki.ca_cert}",
                f"--backend-port={self.backend.port}",
            ],
            log_path=tmp / "floor.out",
        )
        wait_listening(self.floor_port, self.floor, "floor relay", tmp / "floor.out")
        log(f"floor relay pid {self.floor.pid} on 127.0.0.1:{self.floor_port}")

        # originator haproxy (plain HTTP in, mTLS out)
        self.orig_sock = tmp / "originator.sock"
        self.p_to_gateway, self.p_to_peer = free_port(), free_port()
        self.p_to_gateway_jwt = free_port()
        self.p_to_floor = free_port()
        tls_common = (
            f"ca-file {pki.ca_cert} verify required"
            " sni str(localhost) verifyhost localhost alpn http/1.1"
        )
        tls_out = f"ssl crt {client_pem} {tls_common}"
        tls_out_jwt = f"ssl crt {jwt_client_pem} {tls_common}"
        orig_cfg = ORIGINATOR_CFG.format(
            tls_out=tls_out,
            tls_out_jwt=tls_out_jwt,
            p_gateway_jwt=self.p_to_gateway_jwt,
            threads=self.args.originator_threads,
            sock=self.orig_sock,
            defaults=HAPROXY_DEFAULTS,
            p_gateway=self.p_to_gateway,
            p_peer=self.p_to_peer,
            p_floor=self.p_to_floor,
            floor_port=self.floor_port,
            gate_port=self.gate_port,
            peer_port=self.peer_port,
        )
        self.orig = start_haproxy(
            self.sup,
            "originator",
            orig_cfg,
            tmp,
            self.load_cpus,
            [self.p_to_gateway, self.p_to_gateway_jwt, self.p_to_peer, self.p_to_floor],
        )
        log(f"originator haproxy pid {self.orig.pid}")

        self.probes = {
            "gateway": CPUProbe("promgate", [self.gate_pid]),
            "peer": CPUProbe("haproxy-peer", [self.peer.pid]),
            "floor": CPUProbe("floor", [self.floor.pid]),
            "originator": CPUProbe("haproxy-originator", [self.orig.pid]),
            "backend": self.backend.cpu_probe(),
        }
        self.tls_probe = {
            "gateway": self._tls_probe(self.gate_port, pki),
            "peer": self._tls_probe(self.peer_port, pki),
            "floor": self._tls_probe(self.floor_port, pki),
        }
        log(f"TLS negotiated: {self.tls_probe}")
        self.sanity()

    def _tls_probe(self, port: int, pki: Any) -> dict[str, Any]:
        ctx = pki.client_context(CLIENT)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            cipher = s.cipher()
            return {"version": s.version(), "cipher": cipher[0] if cipher else None}

    def wait_for_keys(self, timeout: float = 30) -> None:
        """Until promgate holds the bench issuer's key (fetched from the backend at start),
        so that no measured request waits for a fetch."""
        deadline = time.monotonic() + timeout
        while True:
            held = admin_counter(self.admin, "promgate_identity_provider_keys{")
            if any(v >= 1 for v in held.values()):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"promgate fetched no JWKS in {timeout}s:\n{self.logs()}")
            time.sleep(0.1)

    def headers(self, mode: str) -> tuple[str, ...]:
        """What a mode's requests carry besides Prometheus's own headers."""
        if mode == "gateway_jwt":
            return (f"Authorization: Bearer {self.jwt_token}",)
        return ()

    def url(self, mode: str, payload: str) -> str:
        if mode == "direct":
            return f"http://127.0.0.1:{self.backend.port}/{PAYLOAD_FILES[payload]}"
        if mode == "floor":  # a byte relay: the backend's own path
            return f"http://127.0.0.1:{self.p_to_floor}/{PAYLOAD_FILES[payload]}"
        port = {
            "gateway": self.p_to_gateway,
            "gateway_jwt": self.p_to_gateway_jwt,
            "peer": self.p_to_peer,
        }[mode]
        return (
            f"http://127.0.0.1:{port}/scrape?route={ROUTES[payload]}"
            f"&target=127.0.0.1:{self.backend.port}"
        )

    def sanity(self) -> None:
        """One request on every path: 200 and the exact payload, or stop here."""
        for payload in self.payloads():
            for mode in MODES:
                url = self.url(mode, payload)
                headers = dict(h.split(": ", 1) for h in self.headers(mode))
                try:
                    request = urllib.request.Request(url, headers=headers)
                    with urllib.request.urlopen(request, timeout=30) as r:
                        body = r.read()
                        status = r.status
                except Exception as e:
                    raise BenchError(
                        f"sanity check {mode} {payload} {url}: {e}\n{self.logs()}"
                    ) from e
                if status != 200 or len(body) != self.sizes[payload]:
                    raise BenchError(
                        f"sanity check {mode} {payload}: status {status}, {len(body)} bytes "
                        f"(expected {self.sizes[payload]})\n{self.logs()}"
                    )
        # The jwt path must be the token's identity, not the certificate's.
        served = admin_counter(self.admin, "promgate_requests_total{")
        if not any(f'identity="{JWT_IDENTITY}"' in k and v for k, v in served.items()):
            raise BenchError(f"no request served as {JWT_IDENTITY}: {served}\n{self.logs()}")
        log("sanity: every path answers 200 with the full payload")

    def logs(self) -> str:
        parts = [f"--- promgate log ---\n{_tail(self.gateway.log_path)}"]
        for name in ("peer.out", "floor.out", "originator.out", "nginx-error.log"):
            parts.append(f"--- {name} ---\n{_tail(self.tmp / name)}")
        return "\n".join(parts)

    def payloads(self) -> list[str]:
        return [p for p in PAYLOADS if p in self.args.payloads]

    # runs -----------------------------------------------------------------------------------

    def run_wrk(
        self, url: str, conc: int, duration: float, window: bool, mode: str
    ) -> dict[str, Any]:
        """One bounded wrk run; CPU of every process sampled around it (and in a window)."""
        argv = wrk_argv(url, conc, duration, self.load_cpus, self.headers(mode))
        before = {k: p.read() for k, p in self.probes.items()}
        t0 = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.sup.procs.append(("wrk", proc))
        out_chunks: list[bytes] = []
        stdout = proc.stdout
        assert stdout is not None
        reader = threading.Thread(target=lambda: out_chunks.append(stdout.read()), daemon=True)
        reader.start()
        # wrk stops by itself after -d; this is only a backstop against a wedged wrk.
        watchdog = threading.Timer(duration + 60, lambda: _terminate(proc, 2.0))
        watchdog.daemon = True
        watchdog.start()
        win: dict[str, Any] | None = None
        if window and mode != "direct":
            # Steady-state window: skip the ramp-up and the last second (in-flight requests
            # cut off by wrk's deadline would otherwise cost CPU without being counted).
            lead = min(1.0, 0.15 * duration)
            tail = min(1.0, 0.10 * duration)
            backend_name = mode  # the originator's backend for this mode
            time.sleep(max(0.0, t0 + lead - time.monotonic()))
            w0 = {k: p.read() for k, p in self.probes.items()}
            n0, tw0 = backend_2xx(self.orig_sock, backend_name), time.monotonic()
            time.sleep(max(0.0, t0 + duration - tail - time.monotonic()))
            w1 = {k: p.read() for k, p in self.probes.items()}
            n1, tw1 = backend_2xx(self.orig_sock, backend_name), time.monotonic()
            win = {
                "seconds": tw1 - tw0,
                "responses": n1 - n0,
                "cpu": {k: w1[k] - w0[k] for k in w0},
            }
        try:
            _, status, rusage = os.wait4(proc.pid, 0)
        except ChildProcessError:
            status, rusage = 0, None
        watchdog.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        reader.join(10)
        wall = time.monotonic() - t0
        after = {k: p.read() for k, p in self.probes.items()}
        self.sup.procs.remove(("wrk", proc))
        out = b"".join(out_chunks).decode(errors="replace")
        if proc.returncode != 0:
            raise BenchError(f"wrk exited {proc.returncode}: {' '.join(argv)}\n{out}")
        res = parse_wrk(out)
        res["wall_seconds"] = wall
        res["cpu"] = {k: after[k] - before[k] for k in before}
        if rusage is not None:
            res["cpu"]["wrk"] = rusage.ru_utime + rusage.ru_stime
        res["window"] = win
        # The token is a credential of this run only, but keep it out of the results.
        res["wrk_argv"] = [a.replace(self.jwt_token, "JWT") for a in argv]
        return res

    def cell(self, payload: str, conc: int, mode: str) -> dict[str, Any]:
        url = self.url(mode, payload)
        up0 = self.gateway_counters(mode)
        if self.args.warmup > 0:
            self.run_wrk(url, conc, self.args.warmup, False, mode)
        up1 = self.gateway_counters(mode)
        res = self.run_wrk(url, conc, self.args.duration, True, mode)
        up2 = self.gateway_counters(mode)
        subject = SUBJECTS[mode]
        n = res["requests"]
        ok = n - res["non_2xx"]
        cell: dict[str, Any] = {
            "payload": payload,
            "payload_bytes": self.sizes[payload],
            "concurrency": conc,
            "mode": mode,
            "url": url,
            **{k: v for k, v in res.items() if k not in ("cpu", "window")},
            "cpu_seconds": res["cpu"],
            "window": res["window"],
            "bytes_per_response": res["bytes_read"] / n if n else 0,
        }
        # CPU-seconds per 1000 scrapes. Gateway/peer: steady-state window measured against
        # responses the originator saw complete; otherwise whole run / wrk's count.
        per1k: dict[str, float | None] = {}
        util: dict[str, float] = {}
        win = res["window"]
        for k in res["cpu"]:
            if win and win["responses"] > 0 and k in win["cpu"]:
                per1k[k] = win["cpu"][k] / win["responses"] * 1000
                util[k] = win["cpu"][k] / win["seconds"]
            else:
                per1k[k] = res["cpu"][k] / ok * 1000 if ok else None
                util[k] = res["cpu"][k] / res["wall_seconds"]
        cell["cpu_s_per_1k"] = per1k
        cell["cpu_util"] = util  # CPU-seconds per wall second (1.0 = one core busy)
        # Everything measured (wrk included) over the whole run: near os.cpu_count() means
        # the machine, not the subject, was the limit for req/s.
        cell["all_util"] = sum(res["cpu"].values()) / res["wall_seconds"]
        cell["subject"] = subject
        if mode in GATEWAY_MODES:
            opened = "promgate_upstream_connections_total"
            checks = "promgate_identity_provider_token_verifications_total"
            cell["upstream_connections_opened"] = {
                "warmup": _delta(_only(up0, opened), _only(up1, opened)),
                "measured": _delta(_only(up1, opened), _only(up2, opened)),
            }
            # Signature checks the JWTs cost (the cache answers the rest): about 0.
            cell["jwt_signature_checks"] = {
                "warmup": sum(_delta(_only(up0, checks), _only(up1, checks)).values()),
                "measured": sum(_delta(_only(up1, checks), _only(up2, checks)).values()),
            }
        errs = res["non_2xx"] + sum(res["socket_errors"].values())
        cell["errors"] = errs
        # wrk counts the bytes of responses cut off at its deadline too (up to one per
        # connection), so allow for those before calling the payload size suspicious.
        slack = 0.02 * self.sizes[payload] + 2048 + (conc * self.sizes[payload] / n if n else 0)
        if n and abs(cell["bytes_per_response"] - self.sizes[payload]) > slack:
            cell.setdefault("warnings", []).append(
                f"mean bytes per response {cell['bytes_per_response']:.0f} "
                f"far from payload {self.sizes[payload]}"
            )
        return cell

    def gateway_counters(self, mode: str) -> dict[str, float]:
        """promgate's upstream connections and JWT signature checks so far."""
        if mode not in GATEWAY_MODES:
            return {}
        return {
            **admin_counter(self.admin, "promgate_upstream_connections_total"),
            **admin_counter(self.admin, "promgate_identity_provider_token_verifications_total"),
        }

    def profile(self, payload: str, conc: int) -> dict[str, Any]:
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(pyspy).exists():
            return {"error": "py-spy not found (pip install py-spy)"}
        out = self.tmp / f"profile-{payload}-c{conc}.speedscope.json"
        dur = max(3, int(self.args.profile_duration))
        url = self.url("gateway", payload)
        rate = 200
        argv = [
            pyspy,
            "record",
            "-p",
            str(self.gate_pid),
            "-d",
            str(dur),
            "-r",
            str(rate),
            "-f",
            "speedscope",
            "-o",
            str(out),
        ]
        logf = self.tmp / "py-spy.out"
        spy = self.sup.start("py-spy", argv, log_path=logf)
        time.sleep(0.5)
        res = self.run_wrk(url, conc, dur + 1, False, "gateway")
        try:
            spy.wait(dur + 30)
        except subprocess.TimeoutExpired:
            _terminate(spy)
        self.sup.procs.remove(("py-spy", spy))
        if not out.exists():
            return {"error": f"py-spy wrote nothing:\n{_tail(logf)}"}
        summary = summarize_speedscope(out, rate * dur)
        summary["rps_under_profiler"] = res["rps"]
        summary["file"] = str(out)
        return summary

    def run(self) -> dict[str, Any]:
        self.setup()
        cells = []
        if self.args.profile_only:
            self.args.concurrency = []
        total = len(self.payloads()) * len(self.args.concurrency) * len(MODES)
        i = 0
        for payload in self.payloads():
            for conc in self.args.concurrency:
                for mode in MODES:
                    i += 1
                    log(f"[{i}/{total}] {payload} c={conc} {mode} ({self.args.duration:g}s)")
                    cells.append(self.cell(payload, conc, mode))
        profiles = {}
        for spec in self.args.profile:
            payload, _, conc = spec.partition(":")
            log(f"profiling promgate: {payload} c={conc}")
            profiles[spec] = self.profile(payload, int(conc or 16))
        return {"cells": cells, "profiles": profiles}


def _only(samples: dict[str, float], metric: str) -> dict[str, float]:
    return {k: v for k, v in samples.items() if k.startswith(metric)}


def _delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {
        k.split("{", 1)[-1].rstrip("}"): b[k] - a.get(k, 0.0) for k in b if b[k] - a.get(k, 0.0)
    }


#: twistd start-up and reactor dispatch frames, on (nearly) every stack: left out of the
#: inclusive ranking so that it shows where the time goes.
_DISPATCH_FRAMES = (
    "<module> ",
    "run ",
    "runApp ",
    "ApplicationRunner.",
    "UnixApplicationRunner.",
    "runReactorWithLogging ",
    "ReactorBase.run ",
    "ReactorBase.mainLoop ",
    "EPollReactor.doPoll ",
    "callWithLogger ",
    "callWithContext ",
    "ContextTracker.callWithContext ",
    "ThreadedContextTracker.callWithContext ",
    "_PollLikeMixin._doReadOrWrite ",
)


def summarize_speedscope(path: Path, expected_samples: int, top: int = 20) -> dict[str, Any]:
    """Self and inclusive time per function (lines merged) from a py-spy speedscope file.

    py-spy leaves out idle samples (the reactor waiting in epoll), so the sample count
    against rate x duration is how busy the thread was.
    """
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]

    def key(i: int) -> str:
        f = frames[i]
        file = f.get("file") or ""
        for marker in ("site-packages/", "/work/main/", "lib/python3.11/", "lib/python3"):
            if marker in file:
                file = file.split(marker, 1)[1]
                break
        return f"{f['name']} ({file})"

    keys = [key(i) for i in range(len(frames))]
    self_w: dict[str, int] = {}
    incl_w: dict[str, int] = {}
    total = 0
    threads = {}
    sampled = [p for p in data["profiles"] if p.get("type") == "sampled"]
    for prof in sampled:
        threads[prof.get("name", "?")] = len(prof["samples"])
    # Rank the reactor thread only: Twisted's resolver pool threads park in Condition.wait,
    # which py-spy does not always recognise as idle.
    reactor = [p for p in sampled if "MainThread" in p.get("name", "")] or sampled[:1]
    for prof in reactor:
        for stack in prof["samples"]:
            if not stack:
                continue
            total += 1
            k = keys[stack[-1]]
            self_w[k] = self_w.get(k, 0) + 1
            for k in {keys[f] for f in stack}:
                incl_w[k] = incl_w.get(k, 0) + 1

    def ranked(d: dict[str, int], skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        items = [(k, w) for k, w in d.items() if not k.startswith(skip)]
        return [
            {"function": k, "pct": 100 * w / total if total else 0.0}
            for k, w in sorted(items, key=lambda kv: -kv[1])[:top]
        ]

    main = total
    return {
        "samples": total,
        "samples_per_thread": threads,
        "ranked_thread": [p.get("name") for p in reactor],
        "expected_samples_if_always_busy": expected_samples,
        "busy_fraction": main / expected_samples if expected_samples else None,
        "self": ranked(self_w),
        "inclusive": ranked(incl_w, _DISPATCH_FRAMES),
    }


# -- reporting -------------------------------------------------------------------------------


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _lat(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms < 1:
        return f"{ms * 1000:.0f}us"
    if ms < 100:
        return f"{ms:.2f}ms"
    return f"{ms:.0f}ms"


def render(results: dict[str, Any]) -> str:
    cells = results["cells"]
    lines = []
    hdr = (
        f"{'payload':<7} {'conc':>4} {'mode':<12} {'req/s':>9} {'p50':>8} {'p99':>8} {'err':>5} "
        f"{'gw cpu-s/1k':>11} {'gw util':>7} {'orig cpu-s/1k':>13} {'orig util':>9} "
        f"{'backend cpu-s/1k':>16} {'all util':>8} {'vs direct':>9}"
    )
    lines.append(hdr)
    lines.append("-" * len(hdr))
    by = {(c["payload"], c["concurrency"], c["mode"]): c for c in cells}
    last = None
    for c in cells:
        key = (c["payload"], c["concurrency"])
        if last is not None and key != last:
            lines.append("")
        last = key
        direct = by.get((*key, "direct"))
        subj = SUBJECTS[c["mode"]] if c["mode"] != "direct" else None
        gw_cpu = c["cpu_s_per_1k"].get(subj) if subj else None
        gw_util = c["cpu_util"].get(subj) if subj else None
        orig_cpu = c["cpu_s_per_1k"].get("originator") if subj else None
        orig_util = c["cpu_util"].get("originator") if subj else None
        vs = c["rps"] / direct["rps"] if direct and direct["rps"] else None
        mode = MODE_NAMES.get(c["mode"], c["mode"])
        lines.append(
            f"{c['payload']:<7} {c['concurrency']:>4} {mode:<12} {c['rps']:>9.1f} "
            f"{_lat(c.get('p50_ms')):>8} {_lat(c.get('p99_ms')):>8} {c['errors']:>5} "
            f"{_f(gw_cpu, '.3f'):>11} {_f(gw_util, '.2f'):>7} {_f(orig_cpu, '.3f'):>13} "
            f"{_f(orig_util, '.2f'):>9} {_f(c['cpu_s_per_1k'].get('backend'), '.3f'):>16} "
            f"{_f(c.get('all_util'), '.2f'):>8} {_f(vs, '.2f'):>9}"
        )
    lines.append("")
    lines.append(
        "promgate vs haproxy peer and vs the floor (same run); "
        "promgate-jwt vs promgate (same process):"
    )
    sh = (
        f"{'payload':<7} {'conc':>4} {'rps ratio':>9} {'p50 ratio':>9} {'p99 ratio':>9} "
        f"{'CPU/scrape ratio':>16} {'floor CPU/scrape ratio':>22} {'upstream conns opened':>22} "
        f"{'jwt/mTLS CPU/scrape':>19} {'jwt sig checks':>14}"
    )
    lines.append(sh)
    lines.append("-" * len(sh))
    for (payload, conc, mode), g in by.items():
        if mode != "gateway":
            continue
        p = by.get((payload, conc, "peer"), {})
        j = by.get((payload, conc, "gateway_jwt"), {})

        def ratio(a: float | None, b: float | None) -> float | None:
            return a / b if a is not None and b else None

        gw_cpu = g["cpu_s_per_1k"].get("gateway")
        up = sum(g.get("upstream_connections_opened", {}).get("measured", {}).values())
        cpu_ratio = ratio(gw_cpu, p.get("cpu_s_per_1k", {}).get("peer"))
        fl = by.get((payload, conc, "floor"), {})
        floor_ratio = ratio(gw_cpu, fl.get("cpu_s_per_1k", {}).get("floor"))
        jwt_ratio = ratio(j.get("cpu_s_per_1k", {}).get("gateway"), gw_cpu)
        checks = j.get("jwt_signature_checks", {}).get("measured")
        lines.append(
            f"{payload:<7} {conc:>4} {_f(ratio(g['rps'], p.get('rps')), '.2f'):>9} "
            f"{_f(ratio(g.get('p50_ms'), p.get('p50_ms')), '.2f'):>9} "
            f"{_f(ratio(g.get('p99_ms'), p.get('p99_ms')), '.2f'):>9} "
            f"{_f(cpu_ratio, '.2f'):>16} {_f(floor_ratio, '.2f'):>22} {up:>22.0f} "
            f"{_f(jwt_ratio, '.2f'):>19} {_f(checks, '.0f'):>14}"
        )
    warns = [
        f"{c['payload']} c={c['concurrency']} {c['mode']}: {w}"
        for c in cells
        for w in c.get("warnings", [])
    ]
    errs = [
        f"{c['payload']} c={c['concurrency']} {c['mode']}: {c['non_2xx']} non-2xx, "
        f"socket errors {c['socket_errors']}"
        for c in cells
        if c["errors"]
    ]
    if warns or errs:
        lines.append("")
        lines.append("WARNINGS:")
        lines.extend("  " + w for w in warns + errs)
    for spec, prof in results.get("profiles", {}).items():
        lines.append("")
        if "error" in prof:
            lines.append(f"profile {spec}: {prof['error']}")
            continue
        lines.append(
            f"py-spy profile of promgate's reactor thread, {spec} "
            f"({prof['rps_under_profiler']:.0f} req/s under the profiler, "
            f"busy {100 * (prof['busy_fraction'] or 0):.0f}% of samples) - top by self time:"
        )
        for row in prof["self"][:15]:
            lines.append(f"  {row['pct']:5.1f}%  {row['function']}")
        lines.append("  top inclusive:")
        for row in prof["inclusive"][:12]:
            lines.append(f"  {row['pct']:5.1f}%  {row['function']}")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except Exception:
            return "unavailable"

    out = {
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "haproxy": first_line([shutil.which("haproxy") or "/usr/sbin/haproxy", "-v"]),
        "wrk": first_line([shutil.which("wrk") or "/usr/bin/wrk", "--version"]),
        "nginx": first_line([shutil.which("nginx") or "/usr/sbin/nginx", "-v"]),
    }
    with contextlib.suppress(Exception):
        import twisted

        out["twisted"] = twisted.__version__
    with contextlib.suppress(Exception):
        r = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        out["promgate_commit"] = r.stdout.strip()
        # Read-only: "git diff --quiet" writes nothing (unlike "git status", which may
        # refresh the index of a tree other people are working in).
        r = subprocess.run(
            ["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "promgate"],
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
        out["promgate_modified"] = "yes" if r.returncode == 1 else "no"
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds per measured run (default 10; 3 with --quick)",
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="unmeasured seconds before each run (default 2; 1 with --quick)",
    )
    ap.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="comma-separated wrk connection counts (default 1,16,64; 1,16 with --quick)",
    )
    ap.add_argument(
        "--payloads", type=lambda s: s.split(","), default=list(PAYLOADS), help="subset of 20KB,5MB"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: short runs, fewer cells")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="pin promgate and the peer haproxy to one CPU and the load side to the others",
    )
    ap.add_argument(
        "--gateway-cpus",
        default=None,
        help="with --pin: CPUs for promgate / peer haproxy (default 1)",
    )
    ap.add_argument(
        "--load-cpus",
        default=None,
        help="with --pin: CPUs for wrk, originator, backend (default: the rest)",
    )
    ap.add_argument("--originator-threads", type=int, default=1)
    ap.add_argument(
        "--peer-threads",
        type=int,
        default=1,
        help="peer haproxy nbthread (1 = a fair match for single-threaded promgate)",
    )
    ap.add_argument("--backend", choices=("auto", "nginx", "python"), default="auto")
    ap.add_argument("--audit-fsync", choices=("never", "interval"), default="never")
    ap.add_argument(
        "--profile",
        action="append",
        default=None,
        metavar="PAYLOAD:CONC",
        help="after the matrix, profile promgate with py-spy during one extra run "
        "(repeatable), e.g. 20KB:16",
    )
    ap.add_argument("--profile-duration", type=float, default=10)
    ap.add_argument(
        "--profile-only", action="store_true", help="skip the matrix; only the --profile runs"
    )
    ap.add_argument("--results-dir", type=Path, default=HERE / "results")
    ap.add_argument(
        "--keep", action="store_true", help="keep the temp dir (configs, logs, audit log)"
    )
    args = ap.parse_args(argv)
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    if args.concurrency is None:
        args.concurrency = [1, 16] if args.quick else [1, 16, 64]
    args.profile = args.profile or []
    if args.profile_only and not args.profile:
        args.profile = ["20KB:16", "5MB:16"]
    bad = [p for p in args.payloads if p not in PAYLOADS]
    bad += [s.partition(":")[0] for s in args.profile if s.partition(":")[0] not in PAYLOADS]
    if bad:
        ap.error(f"unknown payload(s) {bad}; choose from {list(PAYLOADS)}")
    if args.duration < 2:
        ap.error("--duration must be at least 2 seconds")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("haproxy", "wrk"):
        if not (
            shutil.which(tool)
            or Path(f"/usr/sbin/{tool}").exists()
            or Path(f"/usr/bin/{tool}").exists()
        ):
            print(f"{tool} is required (apt-get install -y {tool})", file=sys.stderr)
            return 2
    try:
        import promgate.testing  # noqa: F401
    except ImportError as e:
        print(
            f"cannot import promgate ({e}); run with the project's virtualenv python",
            file=sys.stderr,
        )
        return 2

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    tmp = Path(tempfile.mkdtemp(prefix="promgate-bench-"))
    sup = Supervisor()
    started = _dt.datetime.now(_dt.timezone.utc)
    keep = args.keep  # and on failure, for its logs; not when interrupted
    try:
        bench = Bench(args, sup, tmp)
        results = bench.run()
    except BenchError as e:
        keep = True
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit):
        log("interrupted; stopping everything")
        raise
    except BaseException:
        keep = True
        raise
    finally:
        sup.stop_all()
        if keep:
            log(f"temp dir kept (configs, logs, audit log): {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    doc = {
        "started": started.isoformat(),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_at_end": os.getloadavg(),
        },
        "versions": versions(),
        "settings": {
            "duration": args.duration,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
            "payloads": bench.payloads(),
            "payload_bytes": bench.sizes,
            "pin": {"gateway": bench.gate_cpus, "load": bench.load_cpus},
            "originator_threads": args.originator_threads,
            "peer_threads": args.peer_threads,
            "backend": bench.backend.kind,
            "audit_fsync": args.audit_fsync,
            "quick": args.quick,
            "tls": bench.tls_probe,
        },
        **results,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = (
        args.results_dir
        / f"{started.strftime('%Y%m%dT%H%M%SZ')}{'-quick' if args.quick else ''}.json"
    )
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    pinning = (
        f"gateway CPU {bench.gate_cpus} / load CPU {bench.load_cpus}" if bench.gate_cpus else "off"
    )
    tls = bench.tls_probe["gateway"]
    print()
    print(
        f"promgate scrape benchmark - {bench.backend.kind} backend, {args.duration:g}s per run, "
        f"pinning {pinning}, TLS {tls.get('version')} {tls.get('cipher')}"
    )
    print(
        "cpu-s/1k = CPU-seconds per 1000 scrapes; "
        "util = CPU-seconds per wall second (1.00 = one core)"
    )
    print()
    print(render(doc))
    print()
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
