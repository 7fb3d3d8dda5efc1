#!/usr/bin/env python3
"""Memory per idle keep-alive mutual-TLS connection: promgate vs HAProxy vs the floor.

One command, bounded in time, everything on 127.0.0.1, every subprocess cleaned up::

    .venv/bin/python bench/idle_connections.py                  # K = 100 and 1000
    .venv/bin/python bench/idle_connections.py --compare ../main  # + promgate from ../main

For each server (the real ``twistd promgate``, a mutual-TLS HAProxy and the bare Twisted TLS
relay of ``bench/tls_floor.py``, set up as ``bench/scrape_bench.py`` sets them up) it reads
the server's resident memory with no client connection, then after a client process has
opened K keep-alive mutual-TLS connections that each did one 20 KB scrape and then stay
idle, for each K. The client is a separate Python process (plain sockets and ``ssl``); it
opens connections one after the other and keeps them. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import scrape_bench as sb  # noqa: E402  (the bench's process helpers and configs)

#: Descriptors the client and the servers may need: two per relayed connection, plus slack.
NOFILE_CAP = 8192


# -- the client (a subprocess) ----------------------------------------------------------------


def _read_response(s: ssl.SSLSocket) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked); return its status."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            raise ConnectionError("closed before the response head")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    if b"content-length" in fields:
        left = int(fields[b"content-length"]) - len(body)
        while left > 0:
            data = s.recv(min(left, 65536))
            if not data:
                raise ConnectionError("closed inside the body")
            left -= len(data)
    elif fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        while not body.endswith(b"0\r\n\r\n"):
            data = s.recv(65536)
            if not data:
                raise ConnectionError("closed inside the chunked body")
            body = body[-8:] + data
    return status


def client_main(ca: str, cert: str, key: str) -> int:
    """Commands on stdin, one a line: ``open PORT PATH N`` (open connections until N are
    held, each doing one GET PATH), ``close`` (close them all), ``quit``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=ca)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    held: list[ssl.SSLSocket] = []
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] == "close":
            for s in held:
                with contextlib.suppress(OSError):
                    s.close()
            held.clear()
            print("ok 0", flush=True)
            continue
        port, path, n = int(words[1]), words[2], int(words[3])
        try:
            while len(held) < n:
                raw = socket.create_connection(("127.0.0.1", port), timeout=30)
                s = ctx.wrap_socket(raw, server_hostname="localhost")
                s.sendall(
                    f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n"
                    "User-Agent: idle-connections\r\n\r\n".encode()
                )
                status = _read_response(s)
                if status != 200:
                    raise ConnectionError(f"status {status}")
                held.append(s)
        except (OSError, ValueError) as e:
            print(f"error {len(held)} {e}", flush=True)
            continue
        print(f"ok {len(held)}", flush=True)
    return 0


class Client:
    """The client subprocess, driven line by line."""

    def __init__(self, sup: sb.Supervisor, tmp: Path, ca: Path, cert: Path, key: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--client", str(ca), str(cert), str(key)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(tmp / "client.err").open("ab"),
            start_new_session=True,
            text=True,
        )
        sup.procs.append(("client", self.proc))  # type: ignore[arg-type]

    def ask(self, command: str, timeout: float = 300) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        out: IO[str] = self.proc.stdout
        with selectors.DefaultSelector() as sel:
            sel.register(out, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise sb.BenchError(f"client: no answer to {command!r} in {timeout}s")
        answer = out.readline().split(maxsplit=2)
        if not answer or answer[0] != "ok":
            raise sb.BenchError(f"client: {command!r} -> {' '.join(answer) or 'EOF'}")
        return int(answer[1])


# -- memory -----------------------------------------------------------------------------------


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (status) and Pss (smaps_rollup) of one process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1])
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                out["pss"] = int(line.split()[1])
    return out


def settle(pid: int, seconds: float) -> dict[str, int]:
    """Memory once it stops moving (at most ``seconds``)."""
    last = memory_kib(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = memory_kib(pid)
        if now["rss"] == last["rss"]:
            return now
        last = now
    return last


# -- setup ------------------------------------------------------------------------------------


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_CAP if hard == resource.RLIM_INFINITY else min(NOFILE_CAP, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # children inherit it


def setup(
    sup: sb.Supervisor, tmp: Path, compare: Sequence[Path]
) -> tuple[list[dict[str, Any]], Client]:
    from promgate.testing import GatewayProcess, TestPKI

    www = tmp / "www"
    www.mkdir()
    body = sb.prometheus_text(sb.PAYLOADS["20KB"])
    (www / sb.PAYLOAD_FILES["20KB"]).write_bytes(body)
    idp = sb.BenchIssuer()
    (www / "jwks.json").write_bytes(idp.jwks)
    for p in (tmp, www, *www.iterdir()):
        p.chmod(0o755 if p.is_dir() else 0o644)
    if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
        backend: sb.Backend = sb.NginxBackend(sup, tmp, www, None)
    else:
        backend = sb.PythonBackend(sup, tmp, www, None)
    sb.log(f"backend {backend.kind} on 127.0.0.1:{backend.port}")

    pki = TestPKI(tmp / "pki")
    client_cert, client_key = pki.client(sb.CLIENT)
    gate_pem = tmp / "pki" / "gate-combined.pem"
    gate_pem.write_bytes(pki.gate_cert.read_bytes() + pki.gate_key.read_bytes())
    scrape = f"/scrape?route=small&target=127.0.0.1:{backend.port}"
    servers: list[dict[str, Any]] = []

    cfg = sb.PROMGATE_CFG.format(
        gate_cert=pki.gate_cert,
        gate_key=pki.gate_key,
        ca=pki.ca_cert,
        client=sb.CLIENT,
        backend_port=backend.port,
        audit_key=pki.audit_key,
        fsync="never",
        jwt_issuer=f"http://127.0.0.1:{backend.port}",
        jwt_audience=sb.JWT_AUDIENCE,
        jwt_identity=sb.JWT_IDENTITY,
        jwt_subject=sb.JWT_SUBJECT,
    )
    trees = [("promgate", ROOT)] + [(f"promgate@{p.name}", p) for p in compare]
    for i, (name, tree) in enumerate(trees):
        gw = GatewayProcess(tmp / f"promgate{i}", cfg, env={"PYTHONPATH": str(tree)})
        sup.gateways.append(gw)
        gw.start(timeout=60)
        assert gw.process is not None
        port = int(gw.address("scrape").rpartition(":")[2])
        sb.log(f"{name} ({tree}) pid {gw.process.pid} on 127.0.0.1:{port}")
        servers.append({"name": name, "pid": gw.process.pid, "port": port, "path": scrape})

    peer_port = sb.free_port()
    peer_cfg = sb.PEER_CFG.format(
        tls_in="alpn http/1.1 ssl-min-ver TLSv1.2",
        threads=1,
        defaults=sb.HAPROXY_DEFAULTS,
        port=peer_port,
        gate_pem=gate_pem,
        ca=pki.ca_cert,
        client=sb.CLIENT,
        backend_port=backend.port,
    ).replace("maxconn 4000", "maxconn 6000")
    peer = sb.start_haproxy(sup, "peer", peer_cfg, tmp, None, [peer_port])
    servers.append({"name": "haproxy", "pid": peer.pid, "port": peer_port, "path": scrape})

    floor_port = sb.free_port()
    floor = sup.start(
        "floor",
        [
            sys.executable,
            str(HERE / "tls_floor.py"),
            f"--port={floor_port}",
            f"--cert={pki.gate_cert}",
            f"--key={pki.gate_key}",
            f"--ca={pki.ca_cert}",
            f"--backend-port={backend.port}",
        ],
        log_path=tmp / "floor.out",
    )
    sb.wait_listening(floor_port, floor, "floor relay", tmp / "floor.out")
    servers.append({"name": "floor", "pid": floor.pid, "port": floor_port, "path": "/small.prom"})
    client = Client(sup, tmp, pki.ca_cert, client_cert, client_key)
    return servers, client


def measure(
    server: dict[str, Any], client: Client, counts: Sequence[int], settle_s: float
) -> dict[str, Any]:
    pid, port, path = server["pid"], server["port"], server["path"]
    # One scrape on a connection that is then closed: what is allocated once, on first use
    # (imports, the upstream pool), is in the baseline, not charged to the connections.
    client.ask(f"open {port} {path} 1")
    client.ask("close")
    row: dict[str, Any] = {"name": server["name"], "at": {0: settle(pid, settle_s)}}
    for k in counts:
        started = time.monotonic()
        client.ask(f"open {port} {path} {k}")
        row["at"][k] = settle(pid, settle_s)
        sb.log(
            f"{server['name']}: {k} idle connections, RSS {row['at'][k]['rss']} KiB "
            f"(opened in {time.monotonic() - started:.1f}s)"
        )
    client.ask("close")
    row["after_close"] = settle(pid, settle_s)
    return row


def per_conn(row: dict[str, Any], key: str, lo: int, hi: int) -> float:
    return float(row["at"][hi][key] - row["at"][lo][key]) / (hi - lo)


def render(rows: list[dict[str, Any]], counts: Sequence[int]) -> str:
    lo, hi = (counts[0], counts[-1]) if len(counts) > 1 else (0, counts[0])
    head = (
        f"{'server':<22} {'base RSS':>9} "
        + " ".join(f"{'RSS@' + str(k):>9}" for k in counts)
        + f" {'closed':>9}  {'KiB/conn RSS':>12} {'KiB/conn PSS':>12}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        at = row["at"]
        lines.append(
            f"{row['name']:<22} {at[0]['rss']:>9} "
            + " ".join(f"{at[k]['rss']:>9}" for k in counts)
            + f" {row['after_close']['rss']:>9}  {per_conn(row, 'rss', lo, hi):>12.1f}"
            f" {per_conn(row, 'pss', lo, hi):>12.1f}"
        )
    lines.append(
        f"RSS in KiB (VmRSS). KiB/conn = (memory at {hi} - memory at {lo}) / {hi - lo};"
        " 'closed' = after the client closed them all."
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--counts",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[100, 1000],
        help="idle connection counts, ascending (default 100,1000; at most 3000)",
    )
    ap.add_argument(
        "--compare",
        type=Path,
        action="append",
        default=[],
        help="also run promgate from this checkout (its root), as a row of its own",
    )
    ap.add_argument(
        "--settle", type=float, default=3.0, help="at most this long for RSS to stop moving"
    )
    ap.add_argument("--results-dir", type=Path, default=HERE / "results")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args(argv)
    if args.counts != sorted(args.counts) or not 0 < args.counts[-1] <= 3000:
        ap.error("--counts: ascending, between 1 and 3000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--client"]:
        return client_main(*sys.argv[2:5])
    args = parse_args(argv)
    raise_nofile()

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    tmp = Path(tempfile.mkdtemp(prefix="promgate-idle-"))
    sup = sb.Supervisor()
    keep = args.keep
    try:
        servers, client = setup(sup, tmp, [p.resolve() for p in args.compare])
        rows = [measure(s, client, args.counts, args.settle) for s in servers]
    except sb.BenchError as e:
        keep = True
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    finally:
        sup.stop_all()
        if keep:
            sb.log(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.results_dir / f"{stamp}-idle.json"
    out.write_text(
        json.dumps(
            {"counts": args.counts, "rows": rows, "versions": sb.versions()},
            indent=2,
            default=str,
        )
        + "\n"
    )
    print()
    print(render(rows, args.counts))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
