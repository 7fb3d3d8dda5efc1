"""The supervisor's side of the workers, in memory: the all-or-none reload over real AMP
(an in-memory loopback per worker), a slot's named states, and the back-off of a slot
whose workers keep dying."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from promgate.workers.control import Abort, Commit, Prepare
from promgate.workers.coordinator import ReloadOutcome, coordinate_reload
from promgate.workers.slots import (
    MAX_BACKOFF,
    STABLE_AFTER,
    Slot,
    SlotState,
    backoff,
    how_it_ended,
)


class FakeWorker(amp.AMP):
    """A worker's control channel that answers Prepare with ``problems`` and records
    what it was told."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__()
        self.problems = problems
        self.told: list[str] = []

    @Prepare.responder
    def prepare(self, generation: int, trigger: str) -> dict[str, Any]:
        self.told.append(f"prepare {generation}")
        return {"problems": self.problems}

    @Commit.responder
    def commit(self, generation: int) -> dict[str, Any]:
        self.told.append(f"commit {generation}")
        return {"applied": True, "summary": f"applied {generation}"}

    @Abort.responder
    def abort(self, generation: int, why: str) -> dict[str, Any]:
        self.told.append(f"abort {generation}")
        return {}


class CoordinatorTests(SynchronousTestCase):
    """A reload across workers is applied by all of them or by none."""

    def workers(self, *answers: list[str]) -> tuple[list[FakeWorker], list[amp.AMP], list[IOPump]]:
        fakes, controls, pumps = [], [], []
        for problems in answers:
            fake = FakeWorker(problems)
            control, server, pump = connectedServerAndClient(lambda f=fake: f, amp.AMP)
            fakes.append(server)
            controls.append(control)
            pumps.append(pump)
        return fakes, controls, pumps

    def run_reload(self, controls: list[amp.AMP], pumps: list[IOPump]) -> ReloadOutcome:
        d = Deferred.fromCoroutine(coordinate_reload(list(enumerate(controls)), 7, "test"))
        for _ in range(10):
            for pump in pumps:
                pump.flush()
        return self.successResultOf(d)

    def test_every_worker_prepared(self) -> None:
        """Every worker prepared it: every worker is told to commit."""
        fakes, controls, pumps = self.workers([], [], [])
        outcome = self.run_reload(controls, pumps)
        self.assertEqual(outcome, ReloadOutcome(True, summary="applied 7"))
        self.assertEqual([f.told for f in fakes], [["prepare 7", "commit 7"]] * 3)

    def test_one_worker_refuses(self) -> None:
        """One worker answers Prepare with problems: every worker is told to abort, none
        to commit, and the reload is refused with that worker's problems."""
        fakes, controls, pumps = self.workers([], ["main.yaml:3: tls: unreadable"], [])
        outcome = self.run_reload(controls, pumps)
        self.assertEqual(outcome, ReloadOutcome(False, ("main.yaml:3: tls: unreadable",)))
        self.assertEqual([f.told for f in fakes], [["prepare 7", "abort 7"]] * 3)

    def test_same_problem_once(self) -> None:
        """The problems every worker found are reported once each."""
        _, controls, pumps = self.workers(["bad"], ["bad", "worse"])
        outcome = self.run_reload(controls, pumps)
        self.assertEqual(outcome.problems, ("bad", "worse"))

    def test_worker_gone(self) -> None:
        """A worker whose channel is closed counts as one that could not prepare."""
        fakes, controls, pumps = self.workers([], [])
        controls[1].transport.loseConnection()  # type: ignore[union-attr]
        for pump in pumps:
            pump.flush()
        outcome = self.run_reload(controls, pumps)
        self.assertFalse(outcome.applied)
        self.assertIn("worker 1: could not be asked", outcome.problems[0])
        self.assertEqual(fakes[0].told, ["prepare 7", "abort 7"])


class SlotTests(SynchronousTestCase):
    """A slot's lifecycle is a named state, changed by what happens to its process."""

    def test_lifecycle(self) -> None:
        slot = Slot(1)
        self.assertIs(slot.state, SlotState.DEAD)
        slot.spawned(100, None, amp.AMP(), at=0.0)  # type: ignore[arg-type]
        self.assertIs(slot.state, SlotState.STARTING)
        slot.reported(False)
        self.assertIs(slot.state, SlotState.UNREADY)
        slot.reported(True)
        self.assertIs(slot.state, SlotState.READY)
        slot.stopping()
        slot.reported(True)  # too late: it is stopping
        self.assertIs(slot.state, SlotState.STOPPING)
        gone = slot.when_gone()
        self.assertNoResult(gone)
        slot.ended(at=1.0)
        self.successResultOf(gone)
        self.assertIs(slot.state, SlotState.DEAD)
        self.assertIsNone(slot.control)

    def test_quick_deaths_counted(self) -> None:
        """Deaths soon after a start count up; one after a stable run starts again."""
        slot = Slot(0)
        for n in range(1, 4):
            slot.spawned(n, None, amp.AMP(), at=10.0 * n)  # type: ignore[arg-type]
            slot.ended(at=10.0 * n + 1)
            self.assertEqual(slot.failures, n)
        slot.spawned(9, None, amp.AMP(), at=100.0)  # type: ignore[arg-type]
        slot.ended(at=100.0 + STABLE_AFTER)
        self.assertEqual(slot.failures, 1)

    def test_backoff(self) -> None:
        """Replaced at once the first time, then waiting longer, up to a bound."""
        self.assertEqual([backoff(n) for n in range(1, 6)], [0.0, 1.0, 2.0, 4.0, 8.0])
        self.assertEqual(backoff(100), MAX_BACKOFF)

    def test_how_it_ended(self) -> None:
        self.assertEqual(how_it_ended(Failure(ProcessDone(0))), "exit code 0")
        self.assertEqual(how_it_ended(Failure(ProcessTerminated(exitCode=2))), "exit code 2")
        self.assertEqual(how_it_ended(Failure(ProcessTerminated(signal=9))), "signal 9 (SIGKILL)")
