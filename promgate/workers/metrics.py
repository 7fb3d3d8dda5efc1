"""The supervisor's ``/metrics``: its own few metrics, and every worker's added up.

Workers run ``prometheus_client`` in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, a
directory the supervisor makes for them): each metric is kept in a file per process,
which :class:`MultiProcessCollector` adds up (counters and histograms summed, gauges as
their ``multiprocess_mode`` says). The supervisor's own metrics take precedence over a
worker's of the same name (the outcome of a reload is the supervisor's to say).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

import promgate
import twisted

__all__ = ["SupervisorMetrics", "WorkerMetrics", "forget_process"]


class SupervisorMetrics:
    """What the supervisor itself exports, on a registry it owns."""

    def __init__(self, states: Iterable[str]) -> None:
        self.registry = r = CollectorRegistry()
        self.workers = Gauge(
            "promgate_workers",
            "Worker processes, by the state of their slot (starting, ready, unready, "
            "stopping, dead).",
            ["state"],
            registry=r,
        )
        for state in states:
            self.workers.labels(state).set(0)
        self.worker_restarts = Counter(
            "promgate_worker_restarts",
            "Worker processes that ended unasked and were replaced.",
            registry=r,
        )
        self.config_last_reload_successful = Gauge(
            "promgate_config_last_reload_successful",
            "Whether the last configuration load succeeded (in every worker).",
            registry=r,
        )
        self.config_last_reload_success_timestamp = Gauge(
            "promgate_config_last_reload_success_timestamp_seconds",
            "Time of the last successful configuration load.",
            registry=r,
        )
        self.build_info = Gauge(
            "promgate_build_info",
            "promgate build information (always 1).",
            ["version", "pythonversion", "twistedversion"],
            registry=r,
        )
        self.build_info.labels(
            promgate.__version__, platform.python_version(), twisted.__version__
        ).set(1)
        # The supervisor's own process; each worker's process_* series are its own and
        # are not kept in the shared directory.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def names(self) -> frozenset[str]:
        """The names of the families the supervisor exports itself."""
        return frozenset(family.name for family in self.registry.collect())


class WorkerMetrics(Collector):
    """Every worker's metrics from the multiprocess directory (``directory()``, None
    before the workers start), without the families the supervisor exports itself."""

    def __init__(self, directory: Callable[[], str | None], own: frozenset[str]) -> None:
        self._directory = directory
        self._own = own

    def collect(self) -> Iterator[Metric]:
        path = self._directory()
        if path is None or not os.path.isdir(path):
            return
        for family in MultiProcessCollector(None, path=path).collect():  # type: ignore[no-untyped-call]
            if family.name not in self._own:
                yield family


def forget_process(directory: str | None, pid: int) -> None:
    """A worker ended: its ``live*`` gauges no longer count (its counters still do)."""
    if directory is not None:
        mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
