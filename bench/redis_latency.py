#!/usr/bin/env python3
"""What ``shared_limits`` costs per request: promgate without it and promgate with it (a
local ``redis-server``), side by side in one run, on the same route limits.

    wrk --http--> twistd promgate (limits per process)  --http--> nginx
    wrk --http--> twistd promgate (limits in Redis)     --http--> nginx
                                      \\--> redis-server (127.0.0.1)

Both gateways have one plain-HTTP listener, one bearer-token identity and one route whose
limits never refuse (a huge rate and burst, a huge ``max_concurrent``), so every request
runs the admission and nothing else differs. For each concurrency, each mode runs for
``--duration`` seconds after a warm-up; the table gives requests per second, wrk's
latency percentiles, and CPU per request of promgate (and, for the Redis mode, of
redis-server too). A measurement tool, not a test: nothing asserts timings.

Needs wrk, nginx and redis-server (Debian: ``apt-get install wrk nginx-light
redis-server``). Everything listens on 127.0.0.1; every subprocess is ended on the way
out.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from promgate.testing.process import GatewayProcess  # noqa: E402
from promgate.testing.redis import RedisServer  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
TOKEN = "bench-token-0c1d"
BODY = b"# TYPE up gauge\nup 1\n" + b"node_cpu_seconds_total 12345.6\n" * 600  # ~20 KB

NGINX_CONF = """\
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    types {{ }}
    default_type "text/plain; version=0.0.4; charset=utf-8";
    sendfile on;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    server {{
        listen 127.0.0.1:{port};
        root {www};
        location / {{ }}
    }}
}}
"""

GATEWAY = """\
admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
listeners:
  - {{name: scrape, protocol: http, endpoint: "tcp:0:interface=127.0.0.1", tls: false}}
identities:
  bench: {{bearer_sha256: "{token_sha256}", roles: [scraper]}}
routes:
  node:
    allow: ["role:scraper"]
    limits: {{rate: 1000000/s, burst: 1000000, per: identity_target, max_concurrent: 100000}}
    targets: {{static: ["127.0.0.1:{backend}"]}}
audit: {{path: audit.jsonl, key_file: audit.key, fsync: never}}
{shared}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def proc_cpu(pid: int) -> float:
    """utime+stime of a process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def metric(gateway: GatewayProcess, name: str) -> float:
    url = f"http://{gateway.address('admin')}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def run_wrk(url: str, concurrency: int, seconds: float) -> dict[str, float]:
    """wrk's requests per second and latency percentiles (ms)."""
    out = subprocess.run(
        [
            "wrk",
            "--latency",
            f"-t{min(concurrency, 2)}",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "-H",
            f"Authorization: Bearer {TOKEN}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))}  # type: ignore[union-attr]
    result["requests"] = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non2xx"] = float(errors.group(1)) if errors else 0.0
    for pct in ("50", "99"):
        found = re.search(rf"^\s+{pct}%\s+([0-9.]+)(us|ms|s)$", out, re.M)
        if found:
            value, unit = float(found.group(1)), found.group(2)
            result[f"p{pct}"] = value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each run")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated wrk -c values")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args()
    for tool in ("wrk", "nginx", "redis-server"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is not installed", file=sys.stderr)
            return 2

    tmp = Path(tempfile.mkdtemp(prefix="promgate-redis-bench-"))
    stack = contextlib.ExitStack()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        with stack:
            www = tmp / "www"
            www.mkdir()
            (www / "metrics").write_bytes(BODY)
            # nginx's worker may run as an unprivileged user: let it read the file.
            for path in (tmp, www):
                path.chmod(0o755)
            (www / "metrics").chmod(0o644)
            (tmp / "nginx-body").mkdir()
            (tmp / "nginx-proxy").mkdir()
            backend = free_port()
            conf = tmp / "nginx.conf"
            conf.write_text(NGINX_CONF.format(tmp=tmp, port=backend, www=www))
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            proc = subprocess.Popen(
                [nginx, "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            stack.callback(proc.wait, 10)
            stack.callback(proc.terminate)
            wait_listening(backend)

            redis = RedisServer(tmp / "redis-server").start()
            stack.callback(redis.stop)
            assert redis.process is not None

            gateways: dict[str, GatewayProcess] = {}
            for mode, shared in (
                ("local", ""),
                ("redis", f'shared_limits: {{redis: {{endpoint: "{redis.endpoint}"}}}}\n'),
            ):
                directory = tmp / mode
                directory.mkdir()
                key = directory / "audit.key"
                key.write_text(os.urandom(32).hex())
                key.chmod(0o600)
                text = GATEWAY.format(
                    token_sha256=hashlib.sha256(TOKEN.encode()).hexdigest(),
                    backend=backend,
                    shared=shared,
                )
                gateway = GatewayProcess(directory, text)
                stack.callback(gateway.stop)
                gateway.start()
                gateways[mode] = gateway
            deadline = time.monotonic() + 15
            while metric(gateways["redis"], "promgate_shared_limits_redis_up") != 1.0:
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis gateway never saw Redis answer")
                time.sleep(0.1)

            rows = []
            for concurrency in [int(c) for c in args.concurrency.split(",")]:
                for mode, gateway in gateways.items():
                    url = (
                        f"http://{gateway.address('scrape')}/scrape?route=node&"
                        f"target=127.0.0.1%3A{backend}"
                    )
                    run_wrk(url, concurrency, args.warmup)
                    assert gateway.process is not None
                    pid = gateway.process.pid
                    before = (proc_cpu(pid), proc_cpu(redis.process.pid))
                    result = run_wrk(url, concurrency, args.duration)
                    after = (proc_cpu(pid), proc_cpu(redis.process.pid))
                    n = max(1.0, result["requests"])
                    result["cpu_us"] = (after[0] - before[0]) / n * 1e6
                    result["redis_cpu_us"] = (
                        (after[1] - before[1]) / n * 1e6 if mode == "redis" else 0.0
                    )
                    rows.append((concurrency, mode, result))
            unavailable = metric(gateways["redis"], "promgate_shared_limits_unavailable_total")

        print(f"\nshared_limits cost per request ({args.duration:g}s per run, 20 KB body)")
        print(
            f"{'c':>3} {'mode':<6} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'promgate CPU µs/req':>20} {'redis CPU µs/req':>17} {'non-2xx':>8}"
        )
        for concurrency, mode, r in rows:
            print(
                f"{concurrency:>3} {mode:<6} {r['rps']:>9.0f} {r.get('p50', 0):>8.2f} "
                f"{r.get('p99', 0):>8.2f} {r['cpu_us']:>20.0f} "
                f"{(r['redis_cpu_us'] if mode == 'redis' else float('nan')):>17.1f} "
                f"{r['non2xx']:>8.0f}"
            )
        print(f"admissions decided without Redis (redis mode): {unavailable:.0f}")
        return 0
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
