"""Audit records written together, one write per reactor turn, and what a crash leaves."""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from promgate.audit import AuditEvent, AuditLog, record_time, verify_files
from promgate.audit_format import CANONICAL, LINE, TRUNCATION_MARK, RecordEncoder, mac
from promgate.testing.clients import https_get
from promgate.testing.fakes import FakeExporter
from promgate.testing.integration import run_cli
from promgate.testing.monitoring import wait_for
from promgate.testing.pki import TestPKI
from promgate.testing.process import GatewayProcess

KEY = b"batched-audit-key"
NOW = datetime(2026, 11, 24, 6, 11, 15, 123456, tzinfo=timezone.utc).timestamp()
FIELDS = tuple(a.name for a in attrs.fields(AuditEvent) if a.name != "event")


def request(n: int, **overrides: Any) -> AuditEvent:
    fields: dict[str, Any] = {
        "listener": "scrape",
        "peer": f"10.0.0.{n}:4{n:04d}",
        "identity": "prometheus",
        "route": "node",
        "decision": "allow",
        "reason": "ok",
        "status": 200,
        "bytes_in": 0,
        "bytes_out": 1000 + n,
        "duration": 0.0123456789,
    }
    fields.update(overrides)
    return AuditEvent("request", **fields)


def reference(
    key: bytes, prev: bytes, seq: int, time: str, event: AuditEvent, limit: int
) -> tuple[bytes, str]:
    """A record as the json encoders write it: the format encode_record must match."""

    def cap(value: Any) -> Any:
        if isinstance(value, str) and len(value) > limit:
            return value[:limit] + TRUNCATION_MARK
        return round(value, 6) if isinstance(value, float) else value

    record: dict[str, Any] = {"seq": seq, "time": time, "event": cap(event.event)}
    for name in FIELDS:
        value = getattr(event, name)
        if value is not None:
            record[name] = cap(value)
    record_mac = mac(key, prev, CANONICAL.encode(record).encode("ascii"))
    record["mac"] = record_mac
    return (LINE.encode(record) + "\n").encode("ascii"), record_mac


text = st.text(st.characters(codec=None, exclude_categories=()), max_size=30)


class EncodeTests(SynchronousTestCase):
    """Each value is encoded once, and the bytes are what the json encoders would write."""

    @given(
        name=text,
        path=st.none() | text,
        detail=st.none() | text,
        status=st.none() | st.integers(-(2**70), 2**70),
        duration=st.none() | st.floats(allow_nan=False, allow_infinity=False),
        seq=st.integers(1, 2**63),
        limit=st.integers(1, 40),
    )
    def test_same_bytes_as_the_encoders(
        self,
        name: str,
        path: str | None,
        detail: str | None,
        status: int | None,
        duration: float | None,
        seq: int,
        limit: int,
    ) -> None:
        event = AuditEvent(name, path=path, detail=detail, status=status, duration=duration)
        prev = b"ab" * 32
        time = "2026-11-24T06:11:15.123456Z"
        self.assertEqual(
            RecordEncoder(FIELDS, limit).encode(KEY, prev, seq, time, event),
            reference(KEY, prev, seq, time, event, limit),
        )

    @given(seconds=st.floats(0, 2**34))
    def test_time_as_strftime_writes_it(self, seconds: float) -> None:
        when = datetime.fromtimestamp(seconds, timezone.utc)
        self.assertEqual(record_time(seconds), when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))


class BatchTests(SynchronousTestCase):
    """With batching, the records of one turn go out in one write at its end."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.path = Path(self.mktemp())
        self.writes: list[bytes] = []
        self.results: list[bool] = []
        self.failing: int | None = None  # errno of the next write's failure

    def write(self, fd: int, data: bytes) -> int:
        if self.failing is not None:
            raise OSError(self.failing, os.strerror(self.failing))
        self.writes.append(data)
        return os.write(fd, data)

    def open_log(self, **kwargs: Any) -> AuditLog:
        log = AuditLog(
            self.path,
            KEY,
            self.clock,
            fsync=kwargs.pop("fsync", "never"),
            batch=True,
            write=self.write,
            on_result=self.results.append,
            **kwargs,
        )
        log.startService()
        self.addCleanup(lambda: log.stopService() if log.running else None)
        return log

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_bytes().splitlines()]

    def test_one_write_per_turn(self) -> None:
        """Records of one turn are queued, then written in order in one write."""
        log = self.open_log()
        self.assertEqual(len(self.writes), 1)  # start is written at once
        for n in range(5):
            self.assertTrue(log.record(request(n)))
        self.assertEqual(len(self.writes), 1)
        self.assertEqual(len(self.records()), 1)
        self.clock.advance(0)
        self.assertEqual(len(self.writes), 2)
        self.assertEqual([r["seq"] for r in self.records()], [1, 2, 3, 4, 5, 6])
        self.assertEqual(
            [r.get("peer") for r in self.records()[1:]], [f"10.0.0.{n}:4{n:04d}" for n in range(5)]
        )
        self.assertEqual(self.results, [True] * 6)
        log.stopService()
        self.assertEqual(len(self.writes), 3)
        self.assertTrue(verify_files(KEY, [self.path]).ok)

    def test_failed_batch(self) -> None:
        """A batch whose write fails is lost whole: unhealthy, each record counted as
        failed; the next batch continues the chain from the last written record."""
        log = self.open_log()
        log.record(request(1))
        log.record(request(2))
        self.failing = errno.ENOSPC
        self.clock.advance(0)
        self.assertFalse(log.healthy)
        self.assertEqual(self.results, [True, False, False])
        self.failing = None
        log.record(request(3))
        self.assertFalse(log.healthy)  # known only when the batch is written
        self.clock.advance(0)
        self.assertTrue(log.healthy)
        self.assertEqual(self.results, [True, False, False, True])
        log.stopService()
        records = self.records()
        self.assertEqual([r["seq"] for r in records], [1, 2, 3])
        self.assertEqual(records[1]["peer"], "10.0.0.3:40003")
        self.assertTrue(verify_files(KEY, [self.path]).ok)

    def test_partial_batch_is_cut_back(self) -> None:
        """A batch written halfway is cut back to the last complete record."""
        log = self.open_log()
        for n in range(3):
            log.record(request(n))
        real = self.write

        def half(fd: int, data: bytes) -> int:
            self.failing = errno.ENOSPC
            return real(fd, data[: len(data) // 2])

        self.write = half  # type: ignore[method-assign]
        log._write = half  # the log holds the bound method it was given
        self.clock.advance(0)
        self.assertFalse(log.healthy)
        self.assertEqual(len(self.records()), 1)
        self.failing = None
        log._write = real
        log.stopService()
        self.assertEqual([r["seq"] for r in self.records()], [1, 2])
        self.assertTrue(verify_files(KEY, [self.path]).ok)

    def test_fsync_always_is_not_batched(self) -> None:
        """With fsync: always each record is written (and synced) before record() returns."""
        log = self.open_log(fsync="always")
        log.record(request(1))
        log.record(request(2))
        self.assertEqual(len(self.writes), 3)
        self.assertEqual(len(self.records()), 3)

    def test_rotation_flushes_first(self) -> None:
        """Records queued before a rotation go to the file they were recorded for."""
        log = self.open_log()
        log.record(request(1))
        rotated = self.path.with_name("audit.1")
        self.path.rename(rotated)
        log.rotate()
        log.stopService()
        old = [json.loads(line) for line in rotated.read_bytes().splitlines()]
        self.assertEqual([r["seq"] for r in old], [1, 2])
        self.assertEqual(self.records()[0]["event"], "rotate")
        self.assertTrue(verify_files(KEY, [rotated, self.path]).ok)


CONFIG = """\
tls:
  certificate: {cert}
  key: {key}
  client_ca: {ca}
listeners:
  - {{name: scrape, protocol: http, endpoint: "tcp:0:interface=127.0.0.1"}}
identities:
  prometheus:
    cert: {{uri: "spiffe://promgate.local/prometheus"}}
    roles: [scraper]
routes:
  node:
    scheme: http
    metrics_path: /metrics
    allow: ["role:scraper"]
    targets:
      static: ["{exporter}"]
audit:
  path: audit.jsonl
  key_file: {audit_key}
  fsync: never
  on_failure: deny
"""

#: Bounds of the load: scraping threads, and scrapes each at most.
THREADS = 4
SCRAPES = 400


class CrashTests(SynchronousTestCase):
    """kill -9 under load: the audit file still verifies."""

    def test_kill_under_load_then_verify(self) -> None:
        """A gateway killed while scrapes are being answered leaves a file that verifies,
        and its next start continues the chain."""
        directory = Path(self.mktemp()).resolve()
        pki = TestPKI(directory / "pki")
        pki.client("prometheus")
        exporter = FakeExporter({"/metrics": b"up_fake 1\n" * 100})
        self.addCleanup(exporter.stop)
        config = CONFIG.format(
            cert=json.dumps(str(pki.gate_cert)),
            key=json.dumps(str(pki.gate_key)),
            ca=json.dumps(str(pki.ca_cert)),
            audit_key=json.dumps(str(pki.audit_key)),
            exporter=exporter.address,
        )
        gate = GatewayProcess(directory / "gate", config)
        gate.start()
        self.addCleanup(gate.stop)
        audit = gate.directory / "audit.jsonl"
        address = gate.address("scrape")
        target = exporter.address.replace(":", "%3A")
        context = pki.client_context("prometheus")
        stop = threading.Event()
        answered: list[int] = []

        def scrape() -> None:
            for _ in range(SCRAPES):
                if stop.is_set():
                    return
                try:
                    response = https_get(address, f"/scrape?route=node&target={target}", context)
                except OSError:
                    return  # the gateway is gone
                answered.append(response.status)

        threads = [threading.Thread(target=scrape, daemon=True) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        wait_for("scrapes answered", lambda: True if len(answered) >= 100 else None, 60)
        assert gate.process is not None
        received = len(answered)  # responses the clients had in full before the kill
        os.kill(gate.process.pid, signal.SIGKILL)
        gate.process.wait(30)
        stop.set()
        for thread in threads:
            thread.join(60)
        self.assertEqual(set(answered), {200})

        verify = ("audit", "verify", "--key-file", str(pki.audit_key), str(audit))
        code, out, err = run_cli(*verify)
        data = audit.read_bytes()
        if data.endswith(b"\n"):
            self.assertEqual(code, 0, out + err)
        else:  # cut inside a record: verify says so (the next start cuts it off)
            self.assertIn("the last line is incomplete", out + err)
        requests = [
            json.loads(line) for line in data.splitlines(keepends=True) if line.endswith(b"\n")
        ]
        requests = [r for r in requests if r["event"] == "request"]
        # Lost at most: the records of the reactor turn the kill cut short, whose responses
        # may have been sent in that turn (at most one per connection).
        self.assertGreaterEqual(len(requests), received - THREADS)
        self.assertEqual([r["seq"] for r in requests], sorted(r["seq"] for r in requests))

        gate.start()
        gate.stop()
        code, out, err = run_cli(*verify)
        self.assertEqual(code, 0, out + err)
        self.assertIn("previous run ended without a stop record", audit.read_text())
