"""``workers``: how many worker processes serve the listeners, checked like every section,
a change to it refused by a live reload, and what ``twistd promgate`` assembles for it."""

from __future__ import annotations

import sys
from unittest import mock

from promgate.config.model import MAX_WORKERS, worker_count
from promgate.reload import restart_needed
from promgate.testing.configs import MAIN, ProblemAssertions


class WorkersConfigTests(ProblemAssertions):
    """The top-level ``workers`` key."""

    def setUp(self) -> None:
        super().setUp()
        self.tree.standard()

    def with_workers(self, value: str) -> tuple[object, list[object]]:
        self.tree.write("main.yaml", MAIN + f"workers: {value}\n")
        config, errors, _ = self.tree.check()
        return config, list(errors)

    def test_default(self) -> None:
        """Without the key, one process."""
        config, errors, _ = self.tree.check()
        self.assertEqual(errors, [])
        assert config is not None
        self.assertEqual(config.workers, 1)

    def test_valid(self) -> None:
        """An integer from 1 to 64, or auto."""
        for text, value in (("1", 1), ("2", 2), (str(MAX_WORKERS), MAX_WORKERS), ("auto", "auto")):
            with self.subTest(text=text):
                config, errors = self.with_workers(text)
                self.assertEqual(errors, [])
                self.assertEqual(getattr(config, "workers", None), value)

    def test_invalid(self) -> None:
        """Zero, too many, a string, a boolean: one problem at the key's line."""
        for text in ("0", str(MAX_WORKERS + 1), "many", "true", "1.5", "[2]"):
            with self.subTest(text=text):
                self.tree.write("main.yaml", MAIN + f"workers: {text}\n")
                config, errors, _ = self.tree.check()
                self.assertIsNone(config)
                self.assertProblem(
                    errors,
                    "main.yaml",
                    self.tree.line("main.yaml", "workers:"),
                    "workers",
                    "must be an integer from 1 to 64, or auto",
                )

    def test_defined_twice(self) -> None:
        """Given in a drop-in as well as the main file: defined twice."""
        self.tree.write("main.yaml", MAIN + "workers: 2\n")
        self.tree.write("conf.d/zz.yaml", "workers: 3\n")
        config, errors, _ = self.tree.check()
        self.assertIsNone(config)
        self.assertProblem(errors, "conf.d/zz.yaml", 1, "workers", "defined twice")

    def test_restart_needed(self) -> None:
        """A reload that changes the number of workers is refused: it takes a restart."""
        one, _, _ = self.tree.check()
        config, _ = self.with_workers("2")
        assert one is not None
        problems = restart_needed(one, config)  # type: ignore[arg-type]
        self.assertEqual(len(problems), 1)
        self.assertIn("workers: changing the number of workers takes a restart", problems[0])

    def test_auto(self) -> None:
        """auto is one per core this process may run on, at least one, at most 64."""
        self.assertEqual(worker_count(3), 3)
        with mock.patch("os.sched_getaffinity", return_value={0, 1, 5}, create=True):
            self.assertEqual(worker_count("auto"), 3)
        with mock.patch("os.sched_getaffinity", return_value=set(range(100)), create=True):
            self.assertEqual(worker_count("auto"), MAX_WORKERS)


class AssemblyTests(ProblemAssertions):
    """``twistd promgate`` assembles one gateway for ``workers: 1`` and a supervisor of
    worker processes for more."""

    def service_for(self, workers: str) -> object:
        from twisted.application.service import IServiceCollection

        from promgate import tap

        self.tree.standard()
        self.tree.write("main.yaml", MAIN + f"workers: {workers}\n")
        self.addCleanup(setattr, sys, "excepthook", sys.excepthook)
        options = tap.Options()
        options.parseOptions(["--config", str(self.tree.path("main.yaml"))])
        top = tap.makeService(options)
        (service,) = list(IServiceCollection(top))
        return service

    def test_one_worker(self) -> None:
        """One worker: the single process, as without the key."""
        from promgate.service import GatewayService

        self.assertIsInstance(self.service_for("1"), GatewayService)

    def test_two_workers(self) -> None:
        """Two workers: a supervisor with two slots."""
        from promgate.workers.supervisor import Supervisor

        service = self.service_for("2")
        self.assertIsInstance(service, Supervisor)
        assert isinstance(service, Supervisor)
        self.assertEqual([slot.index for slot in service.slots], [0, 1])
