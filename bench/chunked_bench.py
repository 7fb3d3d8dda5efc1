"""Micro-benchmark: the relay's cost for one chunked upstream body, in memory.

Feeds a chunked body (5 MiB by default) in 64 KiB reads to an UpstreamProtocol whose
handler frames the payload again as the gateway's exchange does for an HTTP/1.1 client,
and reports the best time per body and the throughput. No sockets, no TLS: only the
parsing and framing the gateway adds per body. A measurement tool, not a test.

    python bench/chunked_bench.py [--size 5MiB] [--chunk 4096] [--read 65536] [--repeat 20]
"""

from __future__ import annotations

import argparse
import inspect
import time
from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport

from promgate.http.upstream import UpstreamPool, UpstreamProtocol

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"


class _Relay:
    """Frames what it is handed as the exchange does for an HTTP/1.1 client."""

    def __init__(self) -> None:
        self.out = 0
        self.done = False

    def upstream_head(self, *args: Any) -> None:
        pass

    def upstream_data(self, data: bytes) -> None:  # raw passthrough (older relays)
        self.out += len(data)

    def upstream_chunked(self, pieces: list[memoryview], size: int) -> None:
        self.out += len(b"".join((b"%x\r\n" % size, *pieces, b"\r\n")))

    def upstream_done(self) -> None:
        self.done = True

    def upstream_failed(self, reason: str, detail: str, retryable: bool) -> None:
        raise AssertionError(f"{reason}: {detail}")


def _size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "": 1}
    for unit in ("KiB", "MiB", ""):
        if text.endswith(unit) and text[: len(text) - len(unit)].isdigit():
            return int(text[: len(text) - len(unit)]) * units[unit]
    raise argparse.ArgumentTypeError(f"not a size: {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=_size, default=_size("5MiB"))
    parser.add_argument("--chunk", type=_size, default=4096, help="upstream chunk size")
    parser.add_argument("--read", type=_size, default=65536, help="bytes per upstream read")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    payload = bytes(range(256)) * (args.size // 256)
    body = b"".join(
        b"%x\r\n" % len(payload[i : i + args.chunk]) + payload[i : i + args.chunk] + b"\r\n"
        for i in range(0, len(payload), args.chunk)
    )
    wire = HEAD + body + b"0\r\n\r\n"
    reads = [wire[i : i + args.read] for i in range(0, len(wire), args.read)]
    pool = UpstreamPool(MemoryReactorClock())
    kwargs: dict[str, Any] = {"head_only": False, "max_body": 1 << 30}
    if "raw_chunks" in inspect.signature(UpstreamProtocol.send).parameters:
        kwargs["raw_chunks"] = True  # the relay before bodies were decoded
    best = float("inf")
    for _ in range(args.repeat):
        proto = UpstreamProtocol(pool, ("bench", "127.0.0.1:1"))
        proto.makeConnection(StringTransport())
        relay = _Relay()
        proto.send(relay, b"", **kwargs)
        start = time.perf_counter()
        for data in reads:
            proto.dataReceived(data)
        elapsed = time.perf_counter() - start
        assert relay.done, "the body did not end"
        best = min(best, elapsed)
    print(
        f"{len(payload) / (1 << 20):.1f} MiB payload in {args.chunk}-byte chunks, "
        f"{args.read}-byte reads: best {best * 1000:.2f} ms per body, "
        f"{len(payload) / best / (1 << 30):.2f} GiB/s"
    )


if __name__ == "__main__":
    main()
