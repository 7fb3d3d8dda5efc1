"""How many audit records a second one AuditLog writer sustains, and N writers side by side.

Each writer is the gateway's own AuditLog (batched, as the gateway runs it) on a
``twisted.internet.task.Clock`` driven in a tight loop: every turn records ``--batch``
request records (a typical relayed scrape's fields) and ends the turn, which writes them
with one ``write(2)``. The clock follows real time, so ``fsync: interval`` syncs every
``fsync_interval`` seconds as in the gateway. With ``--processes N``, N processes each write
their own chain (as N workers do, ``audit.wK.jsonl``) at once and the rates are added.

This measures the writer alone (chaining, encoding, HMAC, write), not the gateway: it says
how far one chain is from being what limits a gateway. It asserts nothing, and the test suite
never runs it. Files go to a temp dir that is removed afterwards.

    python bench/audit_throughput.py [--seconds 3] [--batch 1,16,64]
        [--fsync never,interval,always] [--processes 1,2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path

from twisted.internet.task import Clock

from promgate.audit import AuditEvent, AuditLog, verify_files
from promgate.audit_chains import worker_file

KEY = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

REQUEST = AuditEvent(
    "request",
    listener="scrape",
    peer="192.0.2.10:51234",
    tls_version="TLSv1.3",
    tls_cipher="TLS_AES_256_GCM_SHA384",
    cert_sha256="ab" * 32,
    cert_subject="CN=prometheus",
    identity="prometheus",
    route="node",
    target="10.0.0.5:9100",
    method="GET",
    path="/metrics",
    decision="allow",
    reason="ok",
    status=200,
    bytes_in=161,
    bytes_out=48213,
    duration=0.012345,
)


def write_for(path: Path, fsync: str, batch: int, seconds: float) -> tuple[int, float]:
    """Write batches of records to ``path`` for about ``seconds``; (records, elapsed)."""
    clock = Clock()
    clock.advance(time.time())
    log = AuditLog(path, KEY, clock, fsync=fsync, fsync_interval=1.0, batch=True)
    log.startService()
    count = 0
    began = last = time.monotonic()
    deadline = began + seconds
    while last < deadline:
        for _ in range(batch):
            log.record(REQUEST)
        count += batch
        now = time.monotonic()
        clock.advance(now - last)  # ends the turn: one write(2); the fsync timer follows
        last = now
    log.stopService()
    elapsed = time.monotonic() - began
    result = verify_files(KEY, [path])
    if not result.ok or result.count != count + 2:
        raise SystemExit(f"{path}: the chain does not verify: {result.message}")
    return count, elapsed


def _worker(args: tuple[Path, str, int, float]) -> tuple[int, float]:
    return write_for(*args)


def run(folder: Path, fsync: str, batch: int, seconds: float, processes: int) -> float:
    """Records a second, summed over ``processes`` writers of their own chains."""
    base = folder / f"audit-{fsync}-{batch}-{processes}.jsonl"
    jobs = [(worker_file(base, k), fsync, batch, seconds) for k in range(processes)]
    if processes == 1:
        results = [_worker(jobs[0])]
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            results = pool.map(_worker, jobs, chunksize=1)
    return sum(count / elapsed for count, elapsed in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--batch", default="1,16,64", help="records per reactor turn")
    parser.add_argument("--fsync", default="never,interval", help="fsync policies")
    parser.add_argument("--processes", default="1,2", help="writers side by side")
    parser.add_argument("--dir", help="where to write (default: a temp dir, removed)")
    args = parser.parse_args()
    seconds = min(max(args.seconds, 0.1), 60.0)
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="promgate-audit-"))
    try:
        print(f"{'fsync':<9} {'batch':>5} {'writers':>7} {'records/s':>11} {'per writer':>11}")
        for fsync in args.fsync.split(","):
            for batch in (int(b) for b in args.batch.split(",")):
                for processes in (int(p) for p in args.processes.split(",")):
                    rate = run(folder, fsync, batch, seconds, processes)
                    print(
                        f"{fsync:<9} {batch:>5} {processes:>7} {rate:>11,.0f} "
                        f"{rate / processes:>11,.0f}",
                        flush=True,
                    )
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
