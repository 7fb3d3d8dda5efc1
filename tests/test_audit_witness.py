"""The chain head on /metrics, and ``promgate audit verify`` against witnessed heads
(``--expect``, ``--witness``) and over a rotated series found beside the configured path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from promgate.audit import AuditEvent, AuditLog, load_key
from promgate.audit_format import CANONICAL, LINE, mac
from promgate.audit_witness import (
    Expectation,
    Seen,
    WitnessError,
    check,
    parse_expect,
    query_witness,
)
from promgate.metrics import Metrics
from promgate.testing.configs import ConfigTree
from promgate.testing.integration import run_cli


def records(path: Path) -> list[dict[str, Any]]:
    """The records of an audit file, parsed."""
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def fingerprint(record: dict[str, Any]) -> int:
    """What ``promgate_audit_head_fingerprint`` shows for ``record``."""
    return int(record["mac"][:12], 16)


class ExpectationTests(SynchronousTestCase):
    """Parsing ``--expect`` and comparing expectations with the records verified."""

    def test_parse(self) -> None:
        """Decimal integers, also as Prometheus may print a float; anything else refused."""
        self.assertEqual(parse_expect("12:345"), Expectation(12, 345, "--expect"))
        self.assertEqual(parse_expect("12:2.81474976710655e+14").fingerprint, 2**48 - 1)
        for bad in ("12", "x:1", "1:-2", "1:1.5", "1:nan"):
            self.assertRaises(WitnessError, parse_expect, bad)

    def test_check(self) -> None:
        """A cut tail, a rewritten record and records before the files are each named."""
        seen = {3: Seen(30, Path("a"), 1), 4: Seen(40, Path("a"), 2)}
        self.assertEqual(check([Expectation(3, 30, "w"), Expectation(0, 0, "w")], seen, 4, 3), [])
        self.assertEqual(
            check(
                [Expectation(9, 1, "w"), Expectation(4, 41, "w"), Expectation(2, 2, "w")],
                seen,
                4,
                3,
            ),
            [
                "seq 2 fingerprint 2 (witnessed by w): missing: the files given begin at seq 3",
                "seq 4 fingerprint 41 (witnessed by w): differs: a:2 has fingerprint 40: "
                "the record was rewritten",
                "seq 9 fingerprint 1 (witnessed by w): missing: the verified chain ends at "
                "seq 4: its tail was cut",
            ],
        )
        (broken,) = check([Expectation(9, 1, "w")], seen, 4, 3, broken=True)
        self.assertIn("missing: after seq 4, where the chain breaks", broken)


def matrix(*series: tuple[str, dict[str, str], list[tuple[float, str]]]) -> bytes:
    """A Prometheus range-query answer."""
    result = [
        {"metric": {"__name__": name, **labels}, "values": [[t, v] for t, v in values]}
        for name, labels, values in series
    ]
    return json.dumps(
        {"status": "success", "data": {"resultType": "matrix", "result": result}}
    ).encode()


class QueryTests(SynchronousTestCase):
    """Reading the witnessed pairs back from Prometheus's HTTP API."""

    def test_pairs(self) -> None:
        """Samples of the two gauges from the same scrape pair up; repeats count once."""
        asked: list[str] = []
        labels = {"job": "promgate", "instance": "gate:9099"}

        def fetch(url: str) -> bytes:
            asked.append(url)
            if "sequence" in url:
                return matrix(
                    ("promgate_audit_last_sequence", labels, [(10, "1"), (11, "1"), (12, "7")])
                )
            return matrix(
                ("promgate_audit_head_fingerprint", labels, [(10, "99"), (11, "99"), (12, "5")])
            )

        found = query_witness("http://p:9090/", "2h", 'job="promgate"', fetch=fetch)
        self.assertEqual(
            [(e.seq, e.fingerprint) for e in found],
            [(1, 99), (7, 5)],
        )
        self.assertEqual(found[1].source, "http://p:9090/ at 1970-01-01T00:00:12Z")
        self.assertEqual(
            asked[0],
            "http://p:9090/api/v1/query?query=promgate_audit_last_sequence"
            "%7Bjob%3D%22promgate%22%7D%5B2h%5D",
        )

    def test_refusals(self) -> None:
        """Several gateways' series, no samples, and a failed query are each an error."""
        two = matrix(
            ("promgate_audit_last_sequence", {"instance": "a"}, [(1, "1")]),
            ("promgate_audit_last_sequence", {"instance": "b"}, [(1, "1")]),
        )
        error = json.dumps({"status": "error", "error": "parse error"}).encode()
        for answer, message in (
            (two, 'has 2 series ({instance="a"}, {instance="b"}); pick one'),
            (matrix(), "no samples of promgate_audit_last_sequence{} in the last 1d"),
            (error, "failed: parse error"),
            (b"<html>", "not JSON"),
        ):
            with self.assertRaises(WitnessError) as caught:
                query_witness("http://p:9090", "1d", fetch=lambda url, a=answer: a)
            self.assertIn(message, str(caught.exception))


class HeadAndVerifyTests(SynchronousTestCase):
    """The gauges follow the log; verify with --expect catches a cut tail and a rewrite."""

    def setUp(self) -> None:
        self.tree = ConfigTree(Path(self.mktemp())).standard()
        self.config = str(self.tree.path("main.yaml"))
        self.path = self.tree.path("audit.jsonl")
        self.key = load_key(self.tree.pki.audit_key)
        self.reactor = MemoryReactorClock()
        self.metrics = Metrics()
        self.log = AuditLog(
            self.path, self.key, self.reactor, on_head=self.metrics.audit_head.update
        )
        self.log.startService()
        self.addCleanup(lambda: self.log.stopService() if self.log.running else None)
        for n in range(4):
            self.log.record(AuditEvent("request", detail=str(n)))

    def head(self) -> tuple[float | None, float | None]:
        """The two gauges as /metrics shows them."""
        value = self.metrics.registry.get_sample_value
        return value("promgate_audit_last_sequence"), value("promgate_audit_head_fingerprint")

    def test_metrics(self) -> None:
        """Seq and fingerprint of the last record written, exact as float64."""
        last = records(self.path)[-1]
        self.assertEqual(self.head(), (5.0, float(fingerprint(last))))
        self.assertEqual(int(self.head()[1] or 0), int(last["mac"][:12], 16))
        self.log.stopService()
        self.assertEqual(self.head()[0], 6.0)

    def test_cut_tail_caught_by_expect(self) -> None:
        """Two whole records cut from the end verify OK alone; --expect of the witnessed head
        fails and says which record is missing."""
        self.log.stopService()
        witnessed = records(self.path)[-1]
        expect = f"{witnessed['seq']}:{fingerprint(witnessed)}"
        code, out, err = run_cli("audit", "verify", "--config", self.config, "--expect", expect)
        self.assertEqual(code, 0, err)
        self.assertIn("; 1 witnessed record(s) match", out)
        lines = self.path.read_bytes().splitlines(keepends=True)
        self.path.write_bytes(b"".join(lines[:-2]))
        code, out, err = run_cli("audit", "verify", "--config", self.config)
        self.assertEqual(code, 0, err)
        code, out, err = run_cli("audit", "verify", "--config", self.config, "--expect", expect)
        self.assertEqual(code, 1, out)
        self.assertIn(
            f"WITNESS: seq 6 fingerprint {fingerprint(witnessed)} (witnessed by --expect): "
            "missing: the verified chain ends at seq 4: its tail was cut",
            err,
        )
        self.assertIn("FAIL: the chain verifies (4 record(s)), but 1 witnessed record(s)", err)

    def test_rewrite_by_key_holder_caught(self) -> None:
        """A chain rewritten with the key verifies, but not against the witnessed head."""
        self.log.stopService()
        old = records(self.path)
        prev = b"0" * 64
        rewritten = []
        for record in old:
            record = {k: v for k, v in record.items() if k != "mac"}
            if record.get("detail") == "1":
                record["detail"] = "nothing to see"
            record["mac"] = mac(self.key, prev, CANONICAL.encode(record).encode("ascii"))
            prev = record["mac"].encode("ascii")
            rewritten.append(LINE.encode(record) + "\n")
        self.path.write_text("".join(rewritten))
        head = old[-1]
        code, out, err = run_cli(
            "audit",
            "verify",
            "--config",
            self.config,
            "--expect",
            f"{head['seq']}:{fingerprint(head)}",
            "--expect",
            f"{old[2]['seq']}:{fingerprint(old[2])}",
        )
        self.assertEqual(code, 1, out)
        self.assertIn(f"WITNESS: seq 3 fingerprint {fingerprint(old[2])}", err)
        self.assertIn(f"differs: {self.path}:3 has fingerprint", err)
        self.assertIn("seq 6", err)

    def test_rotated_series_beside_the_path(self) -> None:
        """With --config and no files, the rotated siblings are found and ordered by their
        first seq, compressed ones left out with a note; a missing middle one fails."""
        self.path.rename(self.tree.path("audit.jsonl.2"))
        self.log.rotate()
        self.log.record(AuditEvent("request", detail="after"))
        self.path.rename(self.tree.path("audit.jsonl-20261124"))
        self.log.rotate()
        self.log.stopService()
        self.tree.path("audit.jsonl.3.gz").write_bytes(b"\x1f\x8b")
        code, out, err = run_cli("audit", "verify", "--config", self.config)
        self.assertEqual(code, 0, err)
        root = self.tree.root
        self.assertIn(
            f"FILES: {root}/audit.jsonl.2, {root}/audit.jsonl-20261124, {root}/audit.jsonl\n",
            out,
        )
        self.assertIn(f"NOTE: {root}/audit.jsonl.3.gz: compressed, left out", out)
        self.assertIn("OK: 9 record(s) verified; ends with a clean stop", out)
        self.tree.path("audit.jsonl-20261124").unlink()
        code, out, err = run_cli("audit", "verify", "--config", self.config)
        self.assertEqual(code, 1)
        self.assertIn("records missing; this file begins with a rotate record", err)
        self.assertIn(f"now named {root}/audit.jsonl-20261124", err)
        self.tree.path("audit.jsonl.2").unlink()
        code, out, err = run_cli("audit", "verify", "--config", self.config, "--rotated-start")
        self.assertEqual(code, 0, err)
        self.assertIn(f"after a rotation from {root}/audit.jsonl-20261124 (not given)", out)

    def test_usage_errors(self) -> None:
        """A malformed --expect or --since, or an unreachable witness, is exit 2."""
        for extra, message in (
            (["--expect", "3"], "expected SEQ:FINGERPRINT"),
            (["--witness", "http://127.0.0.1:1", "--since", "soon"], "--since: not a duration"),
            (["--witness", "http://127.0.0.1:1"], "witness: http://127.0.0.1:1/api/v1/query"),
        ):
            code, _, err = run_cli("audit", "verify", "--config", self.config, *extra)
            self.assertEqual(code, 2, err)
            self.assertIn(message, err)
