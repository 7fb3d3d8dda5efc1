"""The audit log over time with the real ``twistd promgate``: logrotate's rename then SIGUSR1,
the chain head on the admin ``/metrics``, and the real Prometheus as the witness that catches
a cut tail.

The Prometheus test is skipped when the Debian package ``prometheus`` is missing, unless
``CI`` is set.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from promgate.testing.integration import metric_samples, run_cli
from promgate.testing.monitoring import (
    PROMETHEUS,
    MonitoredGateway,
    PrometheusProcess,
    executable,
    wait_for,
)


def fingerprint(record: dict[str, Any]) -> int:
    """What ``promgate_audit_head_fingerprint`` shows for ``record``."""
    return int(record["mac"][:12], 16)


class RotationProcessTests(SynchronousTestCase):
    """A running gateway rotates its audit log on SIGUSR1 and publishes its head."""

    def setUp(self) -> None:
        self.monitored = MonitoredGateway(Path(self.mktemp()).resolve())
        self.monitored.start()
        self.addCleanup(self.monitored.stop)
        self.gate = self.monitored.gate
        self.path = self.gate.directory / "audit.jsonl"
        self.key = str(self.monitored.pki.audit_key)

    def head(self) -> tuple[float, float]:
        """(last sequence, head fingerprint) as the admin listener's /metrics shows them."""
        text = self.monitored.metrics_text().decode()
        ((_, seq),) = metric_samples(text, "promgate_audit_last_sequence")
        ((_, print_),) = metric_samples(text, "promgate_audit_head_fingerprint")
        return seq, print_

    def test_logrotate_then_verify(self) -> None:
        """Rename, SIGUSR1: the new file starts with a rotate record naming the old one; the
        metrics show the head; the two files verify together, and not reordered."""
        self.monitored.traffic()
        rotated = self.gate.directory / "audit.jsonl.1"
        self.path.rename(rotated)
        assert self.gate.process is not None
        os.kill(self.gate.process.pid, signal.SIGUSR1)
        first = self.gate.wait_for_audit_record(self.path, lambda r: r["event"] == "rotate")
        last_old = self.gate.audit_records(rotated)[-1]
        self.assertEqual(first["seq"], last_old["seq"] + 1)
        self.assertIn(f'now named "{rotated}"', first["detail"])
        self.assertIn(f"ends at seq {last_old['seq']} with mac {last_old['mac']}", first["detail"])
        head = self.gate.audit_records(self.path)[-1]
        self.assertEqual(self.head(), (float(head["seq"]), float(fingerprint(head))))
        self.assertIsNotNone(self.gate.stop())  # exited, its stop record written
        code, out, err = run_cli(
            "audit", "verify", "--key-file", self.key, str(rotated), str(self.path)
        )
        self.assertEqual(code, 0, err)
        self.assertIn("ends with a clean stop", out)
        code, out, err = run_cli("audit", "verify", "--config", str(self.gate.config_path))
        self.assertEqual(code, 0, err)
        self.assertIn(f"FILES: {rotated}, {self.path}", out)
        code, _, err = run_cli(
            "audit", "verify", "--key-file", self.key, str(self.path), str(rotated)
        )
        self.assertEqual(code, 1)
        self.assertIn("begins with a rotate record", err)


class PrometheusWitnessTests(SynchronousTestCase):
    """The Prometheus that scrapes the admin listener witnesses the chain head."""

    def setUp(self) -> None:
        if not executable(PROMETHEUS):
            message = f"{PROMETHEUS} not found (Debian package prometheus)"
            if os.environ.get("CI"):
                self.fail(f"{message}; CI is set, so the e2e prerequisites must be present")
            raise SkipTest(message)
        directory = Path(self.mktemp()).resolve()
        self.monitored = MonitoredGateway(directory / "gate")
        self.monitored.start()
        self.addCleanup(self.monitored.stop)
        self.prometheus = PrometheusProcess(directory / "prometheus", [self.monitored.admin])
        self.prometheus.start()
        self.addCleanup(self.prometheus.stop)

    def test_cut_tail_caught(self) -> None:
        """Once Prometheus has scraped a head, cutting the records up to it from the file is
        reported by --witness as that record missing; before the cut, all match."""
        gate = self.monitored.gate
        path = gate.directory / "audit.jsonl"
        self.monitored.traffic()
        written = gate.last_audit_seq(path)

        def scraped() -> bool | None:
            status, data = self.prometheus.query("promgate_audit_last_sequence")
            if status == "success" and data["result"]:
                return True if float(data["result"][0]["value"][1]) >= written else None
            return None

        wait_for("Prometheus to scrape the audit head", scraped, 30.0, every=0.25)
        self.assertIsNotNone(gate.stop())  # exited, its stop record written
        witness = f"http://{self.prometheus.address}"
        argv = ["audit", "verify", "--key-file", str(self.monitored.pki.audit_key)]
        code, out, err = run_cli(*argv, "--witness", witness, "--since", "5m", str(path))
        self.assertEqual(code, 0, err)
        self.assertIn("witnessed record(s) match", out)
        lines = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(b"".join(lines[: written - 1]))  # records 1 .. written-1 remain
        code, out, err = run_cli(*argv, "--witness", witness, "--since", "5m", str(path))
        self.assertEqual(code, 1, out)
        # Every head Prometheus saw from ``written`` on (later records included) is missing.
        missing = re.findall(r"WITNESS: seq (\d+) fingerprint \d+ \(witnessed by http", err)
        self.assertTrue(missing and all(int(seq) >= written for seq in missing), err)
        self.assertIn(
            f"missing: the verified chain ends at seq {written - 1}: its tail was cut", err
        )
