"""The supervisor's ``/metrics``: its own few metrics, and every worker's added up.

Workers run ``prometheus_client`` in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, a
directory the supervisor makes for them): each metric is kept in a file per process,
which :class:`MultiProcessCollector` adds up (counters and histograms summed, gauges as
their ``multiprocess_mode`` says). The supervisor's own metrics take precedence over a
worker's of the same name (the outcome of a reload is the supervisor's to say).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from promgate.metrics import ProcessMetrics

__all__ = ["SupervisorMetrics", "WorkerMetrics", "WorkerProcesses", "forget_process"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


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
        # The supervisor's own process; each worker's process_* series are its own and
        # are not kept in the shared directory (see WorkerProcesses).
        self.process = ProcessMetrics(r)

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


class WorkerProcesses(Collector):
    """Each live worker's CPU time and resident memory, by slot, read from ``/proc``
    (``workers()`` gives the ``(index, pid)`` of each): the multiprocess directory keeps no
    ``process_*`` series, and a busy or swelling worker is what an operator looks for.
    A replaced worker starts its CPU counter again, which ``rate()`` takes as a reset."""

    def __init__(self, workers: Callable[[], Iterable[tuple[int, int]]]) -> None:
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily(
            "promgate_worker_cpu_seconds",
            "CPU time (user and system) of each worker process, by slot.",
            labels=["worker"],
        )
        rss = GaugeMetricFamily(
            "promgate_worker_resident_memory_bytes",
            "Resident memory of each worker process, by slot.",
            labels=["worker"],
        )
        for index, pid in self._workers():
            read = _proc_usage(pid)
            if read is None:
                continue  # gone between the listing and the read
            seconds, resident = read
            cpu.add_metric([str(index)], seconds)
            rss.add_metric([str(index)], resident)
        yield cpu
        yield rss


def _proc_usage(pid: int) -> tuple[float, float] | None:
    """CPU seconds and resident bytes of ``pid``, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/statm", "rb") as f:
            statm = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: fields count from after it.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        pages = int(statm.split()[1])
    except (IndexError, ValueError):
        return None
    return ticks / _TICKS, float(pages * _PAGE)
