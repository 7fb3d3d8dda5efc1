"""Throughput and CPU per scrape of ``twistd promgate`` with ``workers: 1`` and
``workers: 2`` side by side, in one run.

wrk scrapes one promgate listener (plain HTTP, a bearer token: no TLS originator in the
way, so that the load side stays small) through one route to nginx serving a 20 KB
Prometheus text file. For each ``--workers`` value the same gateway configuration is
started with that many workers, warmed up, and loaded at each ``--concurrency`` for
``--duration`` seconds; CPU is the utime+stime of the supervisor and every worker (or the
one process) over the load run. A measurement tool, not a test: nothing asserts timings.

    .venv/bin/python bench/workers_bench.py                       # workers 1,2; c=16,64; 10 s
    .venv/bin/python bench/workers_bench.py --quick               # c=16, 3 s
    .venv/bin/python bench/workers_bench.py --workers 1,2,4 --concurrency 64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scrape_bench as sb  # the shared helpers of the scrape benchmark

TOKEN = "workers-bench-token"

CONFIG = """\
workers: {workers}
admin: {{endpoint: "tcp:{admin_port}:interface=127.0.0.1"}}
listeners:
  - {{name: scrape, protocol: http, endpoint: "tcp:{port}:interface=127.0.0.1", tls: false}}
identities:
  prometheus: {{bearer_sha256: "{token_hash}", roles: [scraper]}}
routes:
  small:
    scheme: http
    metrics_path: /small.prom
    allow: ["role:scraper"]
    timeout: 60s
    max_response_size: 64MiB
    targets: {{static: ["127.0.0.1:{backend_port}"]}}
audit:
  path: audit.jsonl
  key_file: {audit_key}
  fsync: {fsync}
  on_failure: deny
"""


def run_one(
    sup: sb.Supervisor,
    tmp: Path,
    backend: sb.Backend,
    workers: int,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Start a gateway with ``workers`` workers; one load run per concurrency."""
    from promgate.testing import GatewayProcess, TestPKI

    where = tmp / f"workers-{workers}"
    pki = TestPKI(where / "pki")
    port, admin_port = sb.free_port(), sb.free_port()
    config = CONFIG.format(
        workers=workers,
        admin_port=admin_port,
        port=port,
        token_hash=hashlib.sha256(TOKEN.encode()).hexdigest(),
        backend_port=backend.port,
        audit_key=pki.audit_key,
        fsync=args.audit_fsync,
    )
    gateway = GatewayProcess(where, config)
    sup.gateways.append(gateway)
    gateway.start()
    assert gateway.process is not None
    pid = gateway.process.pid
    pids = [pid, *sb.children_of(pid)]
    probe = sb.CPUProbe(f"promgate x{workers}", pids)
    url = f"http://127.0.0.1:{port}/scrape?route=small&target=127.0.0.1:{backend.port}"
    extra = [f"Authorization: Bearer {TOKEN}"]
    rows = []
    for conc in args.concurrency:
        warm = subprocess.run(
            sb.wrk_argv(url, conc, args.warmup, None, extra),
            capture_output=True,
            text=True,
            timeout=args.warmup + 60,
        )
        if warm.returncode != 0:
            raise sb.BenchError(f"wrk failed:\n{warm.stderr}")
        before = probe.read()
        out = subprocess.run(
            sb.wrk_argv(url, conc, args.duration, None, extra),
            capture_output=True,
            text=True,
            timeout=args.duration + 60,
        )
        cpu = probe.read() - before
        if out.returncode != 0:
            raise sb.BenchError(f"wrk failed:\n{out.stderr}")
        res = sb.parse_wrk(out.stdout)
        row = {
            "workers": workers,
            "processes": len(pids),
            "concurrency": conc,
            "rps": res["rps"],
            "p50_ms": res.get("p50_ms"),
            "p99_ms": res.get("p99_ms"),
            "non_2xx": res["non_2xx"],
            "socket_errors": sum(res["socket_errors"].values()) if res["socket_errors"] else 0,
            "cpu_s": cpu,
            "cpu_util": cpu / max(res["seconds"], 1e-9),
            "cpu_ms_per_scrape": 1000 * cpu / max(res["requests"], 1),
        }
        sb.log(
            f"workers={workers} c={conc}: {row['rps']:.0f} req/s, "
            f"{row['cpu_ms_per_scrape']:.3f} ms CPU/scrape"
        )
        rows.append(row)
    gateway.stop(timeout=30)
    sup.gateways.remove(gateway)
    return rows


def render(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        "| workers | c | req/s | p50 ms | p99 ms | CPU util | CPU ms/scrape | non-2xx | errors |\n"
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    lines = [
        f"| {r['workers']} | {r['concurrency']} | {r['rps']:.0f} | {sb._f(r['p50_ms'], '.2f')} "
        f"| {sb._f(r['p99_ms'], '.2f')} | {r['cpu_util']:.2f} | {r['cpu_ms_per_scrape']:.3f} "
        f"| {r['non_2xx']} | {r['socket_errors']} |"
        for r in sorted(rows, key=lambda r: (r["concurrency"], r["workers"]))
    ]
    return head + "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    p.add_argument("--concurrency", default="16,64", help="wrk connections (default 16,64)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per run")
    p.add_argument("--quick", action="store_true", help="c=16, 3 s runs")
    p.add_argument("--audit-fsync", default="never", choices=("never", "interval"))
    p.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.duration, args.warmup = "16", 3.0, 1.0
    args.workers = [int(w) for w in str(args.workers).split(",") if w]
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found (apt-get install -y wrk)")
    tmp = Path(tempfile.mkdtemp(prefix="promgate-workers-bench-"))
    sup = sb.Supervisor()
    ok = False
    try:
        www = tmp / "www"
        www.mkdir()
        (www / "small.prom").write_bytes(sb.prometheus_text(20 * 1024))
        for p in (tmp, www, *www.iterdir()):
            p.chmod(0o755 if p.is_dir() else 0o644)
        if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
            backend: sb.Backend = sb.NginxBackend(sup, tmp, www, None)
        else:
            backend = sb.PythonBackend(sup, tmp, www, None)
        rows: list[dict[str, Any]] = []
        for workers in args.workers:
            rows += run_one(sup, tmp, backend, workers, args)
        table = render(rows)
        print(
            f"\nbackend {backend.kind}, 20 KB body, plain HTTP + bearer token, "
            f"audit fsync {args.audit_fsync}, {args.duration:g} s per run\n"
        )
        print(table)
        results = Path(args.results_dir)
        results.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        (results / f"workers-{stamp}.json").write_text(json.dumps(rows, indent=2) + "\n")
        ok = True
    finally:
        sup.stop_all()
        if ok and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
