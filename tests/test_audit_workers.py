"""With worker processes, one audit chain per worker slot: its own file beside ``audit.path``,
continued by the worker that replaces one that died, rotated on its own, and checked with
the others by ``promgate audit verify --config``."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from promgate.audit import AuditEvent, AuditLog, load_key
from promgate.audit_chains import (
    Chain,
    chain_path,
    configured_chains,
    found_chains,
    is_chain_name,
    worker_file,
    worker_note,
)
from promgate.audit_rotate import rotated_series
from promgate.audit_verify import verify_chains
from promgate.config.loader import load_config
from promgate.config.model import Config, worker_count
from promgate.reactors import IGatewayReactor
from promgate.service import GatewayService
from promgate.testing.configs import ConfigTree
from promgate.testing.integration import run_cli
from promgate.worker_slot import WorkerSlot


def records(path: Path) -> list[dict[str, Any]]:
    """The records of an audit file, parsed."""
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def run_now(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """bcrypt checks at once (a memory reactor has no threads)."""
    return maybeDeferred(f, *args)


class PathTests(SynchronousTestCase):
    """Each worker slot's file, and names that stay apart from rotated files."""

    def test_worker_files(self) -> None:
        """``.wK`` goes before the last suffix, or at the end of a name without one; a
        single process writes the configured path itself."""
        path = Path("/var/log/promgate/audit.jsonl")
        self.assertEqual(worker_file(path, 0), Path("/var/log/promgate/audit.w0.jsonl"))
        self.assertEqual(worker_file(path, 12), Path("/var/log/promgate/audit.w12.jsonl"))
        self.assertEqual(worker_file(Path("/x/audit"), 1), Path("/x/audit.w1"))
        self.assertEqual(worker_file(Path("/x/a.log.jsonl"), 1), Path("/x/a.log.w1.jsonl"))
        self.assertEqual(worker_file(Path("/x/.audit"), 1), Path("/x/.audit.w1"))
        self.assertEqual(chain_path(path, None), path)
        self.assertEqual(chain_path(path, WorkerSlot(0, 1)), path)
        self.assertEqual(chain_path(path, WorkerSlot(1, 2)), worker_file(path, 1))
        self.assertIsNone(worker_note(WorkerSlot(0, 1)))
        self.assertEqual(worker_note(WorkerSlot(1, 3)), "worker 1 of 3")

    def test_chain_names(self) -> None:
        """Chain files and their rotated files are told from other names."""
        path = Path("/x/audit")
        for name in ("audit.w0", "audit.w3.1", "audit.w10-20261205"):
            self.assertTrue(is_chain_name(path, name), name)
        for name in ("audit.1", "audit.w", "audit.w01", "audit.wx", "audit.w1x", "audit-w1"):
            self.assertFalse(is_chain_name(path, name), name)

    def test_rotated_series_leaves_chains_out(self) -> None:
        """A path without a suffix: its workers' files and theirs are not its rotated
        files; found_chains finds the workers' current files only."""
        folder = Path(self.mktemp())
        folder.mkdir()
        path = folder / "audit"
        for name in ("audit", "audit.w0", "audit.w0.1", "audit.w1"):
            (folder / name).write_bytes(b"")
        self.assertEqual(rotated_series(path)[0], [path])
        self.assertEqual(found_chains(path), {0: folder / "audit.w0", 1: folder / "audit.w1"})

    def test_auto(self) -> None:
        """``auto`` is one worker per CPU this process may use, as the supervisor and
        ``audit verify`` both count them."""
        self.assertEqual(worker_count("auto"), min(64, len(os.sched_getaffinity(0))))
        self.assertEqual(worker_count(3), 3)

    def test_configured_chains(self) -> None:
        """The configured workers' chains are required; others found are reported too."""
        folder = Path(self.mktemp())
        folder.mkdir()
        path = folder / "audit.jsonl"
        self.assertEqual(configured_chains(path, 1), [Chain("chain", path, True)])
        for k in (0, 2):
            worker_file(path, k).write_bytes(b"")
        path.write_bytes(b"")
        self.assertEqual(
            configured_chains(path, 2),
            [
                Chain("chain 0 of 2", worker_file(path, 0), True),
                Chain("chain 1 of 2", worker_file(path, 1), True),
                Chain("single-process chain (not configured: workers is 2)", path, False),
                Chain("chain 2 (not configured: workers is 2)", worker_file(path, 2), False),
            ],
        )


class WorkerChainsTests(SynchronousTestCase):
    """Two gateways as workers 0 and 1 of 2, each writing its own chain."""

    def setUp(self) -> None:
        self.tree = ConfigTree(Path(self.mktemp())).standard()
        config = load_config(self.tree.path("main.yaml"))
        self.config: Config = attrs.evolve(config, workers=2)
        self.path = self.config.audit.path
        self.key = load_key(self.config.audit.key_file)
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_700_000_000)
        self.gateways = [self.gateway(k) for k in range(2)]

    def gateway(self, index: int) -> GatewayService:
        """The gateway worker ``index`` of 2 runs, started."""
        service = GatewayService(
            self.config,
            cast(IGatewayReactor, self.reactor),
            run_in_thread=run_now,
            install_signal_handlers=False,
            worker=WorkerSlot(index, 2),
        )
        service.privilegedStartService()
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    def record(self, service: GatewayService, detail: str) -> None:
        """One record through the gateway's own sink, written at the end of the turn."""
        self.assertTrue(service.audit.record(AuditEvent("request", detail=detail)))
        self.reactor.advance(0)

    def stop(self, service: GatewayService) -> None:
        """Stop ``service``, letting its drain and audit log finish."""
        d = service.stopService()
        self.reactor.advance(0)
        self.successResultOf(d)

    def verify(self, workers: int = 2) -> tuple[int, str, str]:
        """``audit verify --config`` over this gateway's chains: exit status, out, err."""
        out, err = io.StringIO(), io.StringIO()
        code = verify_chains(self.key, configured_chains(self.path, workers), out, err)
        return code, out.getvalue(), err.getvalue()

    def test_one_chain_per_worker(self) -> None:
        """Each worker writes its own file, whose start record says which worker of how
        many writes it; both chains verify and are counted."""
        for n, service in enumerate(self.gateways):
            self.record(service, f"w{n}")
        self.record(self.gateways[0], "again")
        for service in self.gateways:
            self.stop(service)
        self.assertFalse(self.path.exists())
        zero, one = (records(worker_file(self.path, k)) for k in range(2))
        self.assertEqual([r["event"] for r in zero], ["start", "request", "request", "stop"])
        self.assertEqual([r["event"] for r in one], ["start", "request", "stop"])
        self.assertEqual((zero[0]["detail"], one[0]["detail"]), ("worker 0 of 2", "worker 1 of 2"))
        code, out, err = self.verify()
        self.assertEqual(code, 0, err)
        w0, w1 = worker_file(self.path, 0), worker_file(self.path, 1)
        self.assertIn(f"OK: chain 0 of 2 ({w0}): 4 record(s) verified; ends with a clean stop", out)
        self.assertIn(f"OK: chain 1 of 2 ({w1}): 3 record(s) verified; ends with a clean stop", out)
        self.assertTrue(out.endswith("OK: 2 chain(s) verified, 7 record(s) in all\n"), out)

    def test_missing_chain(self) -> None:
        """A configured worker's chain that is not there fails verify, named."""
        for service in self.gateways:
            self.stop(service)
        worker_file(self.path, 1).unlink()
        code, out, err = self.verify()
        self.assertEqual(code, 1, out)
        self.assertIn(
            f"FAIL: chain 1 of 2 ({worker_file(self.path, 1)}): missing: no such file", err
        )
        self.assertIn("FAIL: 1 of 2 chain(s) missing or broken: chain 1 of 2", err)
        self.assertIn("OK: chain 0 of 2", out)

    def test_tampered_chain(self) -> None:
        """An edited record in one chain fails verify, naming that chain and the line."""
        self.record(self.gateways[1], "honest")
        for service in self.gateways:
            self.stop(service)
        one = worker_file(self.path, 1)
        one.write_bytes(one.read_bytes().replace(b'"honest"', b'"edited"'))
        code, out, err = self.verify()
        self.assertEqual(code, 1, out)
        self.assertIn(f"FAIL: chain 1 of 2 ({one}): {one}:2: MAC mismatch: edited", err)
        self.assertIn("OK: chain 0 of 2", out)

    def test_replacement_continues_the_chain(self) -> None:
        """Worker 1 dies in the middle of a record; its replacement continues chain 1 from the
        last intact record, and both chains verify."""
        self.record(self.gateways[1], "before")
        one = worker_file(self.path, 1)
        whole = one.read_bytes()
        self.stop(self.gateways[1])  # gone: its lock released, and (below) no stop record
        one.write_bytes(whole + b'{"seq":3,"time":"2023-')  # cut mid-record
        replacement = self.gateway(1)
        self.record(replacement, "after")
        self.stop(replacement)
        self.stop(self.gateways[0])
        chain = records(one)
        self.assertEqual([r["seq"] for r in chain], [1, 2, 3, 4, 5])
        self.assertEqual(
            chain[2]["detail"],
            "worker 1 of 2; previous run ended mid-record; dropped its incomplete last record "
            "(22 bytes); previous run ended without a stop record (last seq 2)",
        )
        code, out, err = self.verify()
        self.assertEqual(code, 0, err)
        self.assertIn("OK: chain 1 of 2", out)
        self.assertIn("5 record(s) verified; ends with a clean stop", out)

    def test_rotation_per_chain(self) -> None:
        """Each worker rotates its own file: the rotated names differ per chain, each new
        file begins with a rotate record, and every chain verifies with its own series."""
        for k, service in enumerate(self.gateways):
            self.record(service, "before")
            worker_file(self.path, k).rename(f"{worker_file(self.path, k)}.1")
            service.rotate_audit_log()
            self.record(service, "after")
        for service in self.gateways:
            self.stop(service)
        for k in range(2):
            current = worker_file(self.path, k)
            self.assertEqual(records(current)[0]["event"], "rotate")
            self.assertIn(f'now named "{current}.1"', records(current)[0]["detail"])
            self.assertEqual(rotated_series(current)[0], [Path(f"{current}.1"), current])
        code, out, err = self.verify()
        self.assertEqual(code, 0, err)
        w0 = worker_file(self.path, 0)
        self.assertIn(f"FILES: chain 0 of 2: {w0}.1, {w0}\n", out)
        self.assertIn("OK: 2 chain(s) verified, 10 record(s) in all", out)

    def test_fewer_workers_later(self) -> None:
        """Chains beyond the configured workers (an earlier, larger ``workers``) are checked
        and reported, not required; a broken one fails all the same."""
        for service in self.gateways:
            self.stop(service)
        code, out, err = self.verify(workers=1)
        self.assertEqual(code, 1, out)
        self.assertIn(f"FAIL: chain ({self.path}): missing: no such file", err)
        self.assertIn("OK: chain 0 (not configured: workers is 1)", out)
        self.assertIn("OK: chain 1 (not configured: workers is 1)", out)

    def test_cli(self) -> None:
        """``audit verify --config`` of a single-process configuration reports the worker
        chains found beside its file; ``--chain K`` checks one, and witnessed heads need
        one."""
        for service in self.gateways:
            self.stop(service)
        single = AuditLog(self.path, self.key, self.reactor)
        single.startService()
        single.stopService()
        config = str(self.tree.path("main.yaml"))
        code, out, err = run_cli("audit", "verify", "--config", config)
        self.assertEqual(code, 0, err)
        self.assertIn(f"OK: chain ({self.path}): 2 record(s) verified", out)
        self.assertIn("OK: 3 chain(s) verified, 6 record(s) in all", out)
        code, out, err = run_cli("audit", "verify", "--config", config, "--chain", "1")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "OK: 2 record(s) verified; ends with a clean stop\n")
        code, out, err = run_cli("audit", "verify", "--config", config, "--expect", "1:1")
        self.assertEqual(code, 2, out)
        self.assertIn("witnessed heads belong to one chain: pick it with --chain K", err)
        for wrong in (["--chain", "1", str(self.path)], ["--config", config, "--chain", "-1"]):
            code, out, err = run_cli("audit", "verify", *wrong)
            self.assertEqual(code, 2, out)
            self.assertIn("--chain takes a worker number K >= 0", err)
