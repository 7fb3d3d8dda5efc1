#!/usr/bin/env python3
"""How long the shared limits stop being shared across a Redis Sentinel failover.

    SharedLimiter --(sentinel: ...)--> redis-server master  <-- replica
                         \\--> redis-sentinel (quorum 1)

A limiter (promgate's own, on the real reactor, as a gateway runs it) admits a request
every ``--every`` seconds on a route with a concurrency cap. After a few seconds of
sharing, the sentinel is told to fail over (``SENTINEL FAILOVER``), in one of two cases:

- ``alive``: the old master runs on (a planned failover). Until a sentinel turns it into
  a replica, up to 10 seconds later, it still takes writes: a client that stays on it
  spends a budget apart from the gateways on the new master.
- ``partitioned``: the old master stops answering (SIGSTOP) as soon as the replica is
  promoted, as across a network partition: the connection to it stays open.

For each run the table gives the time from the promotion (the replica answering ``ROLE``
as a master) to the first admission decided at the new master, how many admissions were
decided at the old master after the promotion, and how many could not be decided by
Redis at all (``on_unavailable`` decided them). ``--watch 1,off`` runs each case with the
link asking the sentinels every second (as promgate does) and without that (asking only
before each connection), side by side. A measurement tool, not a test.

Needs redis-server (Debian: ``apt-get install redis-server``). Everything listens on
127.0.0.1; every server is ended on the way out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet import reactor, task  # noqa: E402
from twisted.internet.defer import Deferred, ensureDeferred  # noqa: E402

from promgate import redis_link  # noqa: E402
from promgate.config.model import Limits, RedisLimits, RedisSentinel  # noqa: E402
from promgate.metrics import Metrics, SharedLimitsMetrics  # noqa: E402
from promgate.ratelimit import Admission, RateLimiter  # noqa: E402
from promgate.redis_link import TxRedisLink  # noqa: E402
from promgate.shared_limits import SharedLimiter  # noqa: E402
from promgate.testing.redis import RedisServer  # noqa: E402

NAME = "bench"
LIMITS = Limits(max_concurrent=1000)


def sleep(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


async def one_run(case: str, watch: str, every: float, directory: Path) -> dict[str, Any]:
    redis_link.MASTER_CHECK_INTERVAL = 3600.0 if watch == "off" else float(watch)
    master = RedisServer(directory / "master").start()
    replica = RedisServer(directory / "replica", replica_of=master).start()
    sentinel = RedisServer(directory / "sentinel", sentinel=(NAME, master)).start()
    servers = [sentinel, replica, master]
    settings = RedisLimits(
        endpoint=None,
        sentinel=RedisSentinel(endpoints=(("127.0.0.1", sentinel.port),), master=NAME),
        on_unavailable="deny",
    )
    limiter = SharedLimiter(
        settings,
        reactor,  # type: ignore[arg-type]
        RateLimiter(reactor),  # type: ignore[arg-type]
        SharedLimitsMetrics(Metrics().registry),
        TxRedisLink(settings, reactor),
    )
    limiter.startService()
    log: list[tuple[float, int | None]] = []  # (time, port of the deciding Redis)
    try:

        async def admit() -> None:
            answer = await limiter.admit("node", LIMITS, "x", "t")
            port = None
            if not isinstance(answer, Admission):
                answer.release("node")
                conn: Any = limiter.link.connection()
                port = conn.proto.transport.getPeer().port if conn is not None else None
            log.append((time.monotonic(), port))

        deadline = time.monotonic() + 10
        while not (log and log[-1][1] == master.port):
            if time.monotonic() > deadline:
                raise RuntimeError("the limiter never shared at the master")
            await admit()
            await sleep(every)
        for _ in range(int(2 / every)):
            await admit()
            await sleep(every)
        for _ in range(100):
            if sentinel.command("SENTINEL", "FAILOVER", NAME) == b"+OK":
                break
            await sleep(0.1)
        else:
            raise RuntimeError("the sentinel would not fail over")
        promoted = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if promoted is None and replica.command("ROLE") == b"*3":
                promoted = time.monotonic()
                if case == "partitioned":
                    master.pause()
            await admit()
            if promoted is not None and log[-1][1] == replica.port:
                break
            await sleep(every)
        if promoted is None or log[-1][1] != replica.port:
            raise RuntimeError("the limiter never shared at the new master")
        after = [port for t, port in log if t >= promoted]
        return {
            "case": case,
            "watch": watch,
            "to_new_master_ms": (log[-1][0] - promoted) * 1000,
            "at_old_master": sum(1 for p in after if p == master.port),
            "undecided": sum(1 for p in after if p is None),
            "admissions_after": len(after),
        }
    finally:
        await limiter.stopService()
        for server in servers:
            server.stop()


async def main(args: argparse.Namespace) -> None:
    rows = []
    for case in args.cases.split(","):
        for watch in args.watch.split(","):
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory(prefix="sentinel-bench-") as tmp:
                    rows.append(await one_run(case, watch, args.every, Path(tmp)))
    print(
        "| case | watch (s) | run | promotion to first admission at the new master (ms) "
        "| admissions at the old master after it | undecided | admissions after it |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    runs: dict[tuple[str, str], int] = {}
    for row in rows:
        key = (row["case"], row["watch"])
        runs[key] = runs.get(key, 0) + 1
        print(
            f"| {row['case']} | {row['watch']} | {runs[key]} | {row['to_new_master_ms']:.0f} "
            f"| {row['at_old_master']} | {row['undecided']} | {row['admissions_after']} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="alive,partitioned")
    parser.add_argument("--watch", default="1,off", help="intervals of the master watch")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--every", type=float, default=0.01, help="seconds between admissions")
    arguments = parser.parse_args()
    outcome: list[Any] = []

    def run() -> Deferred[None]:
        d = ensureDeferred(main(arguments))
        d.addErrback(outcome.append)
        return d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(run)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if outcome:
        outcome[0].printTraceback()
        sys.exit(1)
