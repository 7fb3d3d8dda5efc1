"""The supervisor of ``workers: N`` gateway processes on one host.

In ``privilegedStartService`` (before ``twistd --uid`` drops privileges) it binds every
listener's socket once (``systemd:`` sockets it was passed are adopted), and the admin
listener, which it serves itself for the whole gateway. It then spawns the workers
(``python -m promgate.workers``), handing each the listening sockets and one end of an
AF_UNIX socket pair that carries AMP: the workers share each socket's accept queue, so a
connection waiting in it is taken by whichever worker accepts first, and none is lost
when one dies.

A worker that ends unasked is replaced at once in the same slot, with the current
configuration file and sockets; a slot whose workers keep dying waits longer each time
(:func:`promgate.workers.slots.backoff`). SIGHUP and ``/-/reload`` reload every worker
as one (:mod:`promgate.workers.coordinator`); SIGUSR1 has each reopen its audit log;
SIGTERM stops every worker (each drains as a single gateway does) and kills those still
running after the drain and a grace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

from promgate.admin import Readiness, admin_site
from promgate.config.loader import check_config
from promgate.config.model import Config, Listener
from promgate.errors import StartupError, os_error_text
from promgate.listening import ListenerService
from promgate.reload import ReloadResult, restart_needed
from promgate.service import ABORT_GRACE, DRAIN_TIMEOUT
from promgate.systemd import SystemdNotifier
from promgate.workers.control import HandOver, Refused, RotateAudit, Stop
from promgate.workers.coordinator import coordinate_reload
from promgate.workers.metrics import (
    SupervisorMetrics,
    WorkerMetrics,
    WorkerProcesses,
    forget_process,
)
from promgate.workers.reactors import ISupervisorReactor
from promgate.workers.slots import (
    Slot,
    SlotState,
    SupervisorControl,
    WorkerProcess,
    backoff,
    how_it_ended,
)

__all__ = ["KILL_GRACE", "Supervisor"]

#: How long after the drain (DRAIN_TIMEOUT, then ABORT_GRACE) a worker told to stop may
#: take to exit before it is killed.
KILL_GRACE = 5.0
#: Variables a worker must not inherit: systemd speaks to the supervisor only.
_NOT_INHERITED = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC")


class SharedWithWorkers(Factory):
    """The factory of a socket the supervisor binds but never accepts on."""

    noisy = False

    def buildProtocol(self, addr: Any) -> Protocol | None:
        return None


def _closed_meanwhile(failure: Failure) -> None:
    """A worker told to stop may close its channel before its answer is read."""
    failure.trap(ConnectionDone, ConnectionLost)


class _One(ServerFactory):
    """Builds the one protocol of an adopted control socket."""

    def __init__(self, protocol: SupervisorControl) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: object) -> SupervisorControl:
        return self.protocol_instance


class Supervisor(MultiService):
    """``count`` workers sharing every listener, and the admin listener for them all."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: ISupervisorReactor,
        count: int,
        *,
        ready_file: Path | None = None,
        log_level: str = "info",
        notifier: SystemdNotifier | None = None,
        install_signal_handlers: bool = True,
        executable: str = sys.executable,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.reactor = reactor
        self.ready_file = ready_file
        self.log_level = log_level
        self.notifier = notifier if notifier is not None else SystemdNotifier.from_environment()
        self.install_signal_handlers = install_signal_handlers
        self.executable = executable
        self.environ = dict(os.environ if environ is None else environ)
        self.slots = [Slot(i) for i in range(count)]
        self.metrics = SupervisorMetrics(state.value for state in SlotState)
        #: The multiprocess metrics directory, made when the workers start.
        self.metrics_dir: str | None = None
        self.metrics.registry.register(
            WorkerMetrics(lambda: self.metrics_dir, self.metrics.names())
        )
        self.metrics.registry.register(
            WorkerProcesses(
                lambda: [(s.index, s.pid) for s in self.slots if s.alive and s.pid is not None]
            )
        )
        #: Every listener's socket, bound and never accepted on here, by name.
        self.sockets: dict[str, ListenerService] = {}
        self.readiness = Readiness(self._every_worker_ready)
        self.admin = ListenerService(
            "admin",
            config.admin.endpoint,
            admin_site(self.metrics.registry, self.readiness, reactor, reload=self._admin_reload),
            reactor,
            clock=reactor,
        )
        self.generation = 0
        self._reloading = False
        self._stopping = False
        self._announced = False
        self._respawns: dict[int, IDelayedCall] = {}
        self._previous: dict[int, Any] = {}

    # -- start-up ------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind every listener and the admin listener, before privileges are dropped; a
        listener that cannot bind is a StartupError, and none stays bound."""
        try:
            for listener in self.config.listeners:
                self.sockets[listener.name] = self._bind(listener)
            self.admin.privilegedStartService()
        except StartupError:
            self._unbind()
            raise
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def _bind(self, listener: Listener) -> ListenerService:
        svc = ListenerService(
            listener.name, listener.endpoint, SharedWithWorkers(), self.reactor, clock=self.reactor
        )
        svc.privilegedStartService()
        assert svc.port is not None
        svc.port.stopReading()  # type: ignore[attr-defined]  # the workers accept
        return svc

    def _unbind(self) -> None:
        for svc in self.sockets.values():
            svc.stopService()
        self.sockets.clear()
        if self.admin.port is not None:
            self.admin.stopService()

    def startService(self) -> None:
        """Start the workers; the gateway is ready (ready file, READY=1) once every one
        of them says it is."""
        if self.admin.port is None:
            self.privilegedStartService()
        super().startService()  # type: ignore[no-untyped-call]
        self.metrics_dir = tempfile.mkdtemp(prefix="promgate-metrics-")
        self.admin.startService()
        self.metrics.process.loaded(self.reactor.seconds())
        for warning in self.config.warnings:
            self.log.warn("configuration: {problem}", problem=warning)
        if self.install_signal_handlers:
            for signum, handler in (
                (signal.SIGHUP, self._on_sighup),
                (signal.SIGUSR1, self._on_sigusr1),
            ):
                self._previous[signum] = signal.signal(signum, handler)
        self.readiness.ready = True
        self.log.info(
            "starting {count} workers on {listeners}",
            count=len(self.slots),
            listeners=", ".join(f"{n} {a}" for n, a in self.addresses().items()),
        )
        for slot in self.slots:
            self._spawn(slot)
        self._counted()

    def _spawn(self, slot: Slot) -> None:
        """Start a worker in ``slot`` with the current sockets and configuration file."""
        self._respawns.pop(slot.index, None)
        if self._stopping:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", 3: theirs.fileno()}
        args = [
            self.executable,
            "-m",
            "promgate.workers",
            "--config",
            str(self.config.source),
            "--index",
            str(slot.index),
            "--count",
            str(len(self.slots)),
            "--control",
            "3",
            "--log-level",
            self.log_level,
        ]
        for number, (name, svc) in enumerate(self.sockets.items(), start=4):
            assert svc.port is not None
            child_fds[number] = svc.port.fileno()  # type: ignore[attr-defined]
            args += ["--listener", f"{name}={number}"]
        env = {k: v for k, v in self.environ.items() if k not in _NOT_INHERITED}
        assert self.metrics_dir is not None
        env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        try:
            process = self.reactor.spawnProcess(
                WorkerProcess(slot, globalLogPublisher, self._ended),
                self.executable,
                args,
                env=env,
                childFDs=child_fds,
            )
        except OSError as e:
            ours.close()
            theirs.close()
            slot.failures += 1
            delay = max(1.0, backoff(slot.failures))
            self.log.error(
                "worker {worker} could not be started: {problem}; trying again in {delay:g}s",
                worker=slot.index,
                problem=os_error_text(e),
                delay=delay,
            )
            self._respawns[slot.index] = self.reactor.callLater(delay, self._replace, slot)
            return
        theirs.close()
        process.closeStdin()
        control = SupervisorControl(slot, self._reported)
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, _One(control))
        ours.close()
        assert process.pid is not None
        slot.spawned(process.pid, process, control, self.reactor.seconds())
        self.log.info("worker {worker} started (pid {pid})", worker=slot.index, pid=process.pid)

    def _reported(self, slot: Slot, pid: int, ready: bool) -> None:
        if pid != slot.pid:
            return
        slot.reported(ready)
        self._counted()
        if ready and self._every_worker_ready():
            self._all_ready()

    def _all_ready(self) -> None:
        """Every worker is ready: the ready file (again, with the workers' pids) and, the
        first time, READY=1."""
        if self.ready_file is not None:
            self._write_ready_file(self.ready_file)
        if not self._announced:
            self._announced = True
            self.log.info("all {count} workers ready", count=len(self.slots))
        self.notifier.notify_ready(self._serving())

    def _every_worker_ready(self) -> bool:
        return all(slot.state is SlotState.READY for slot in self.slots)

    def _counted(self) -> None:
        for state in SlotState:
            self.metrics.workers.labels(state.value).set(
                sum(1 for slot in self.slots if slot.state is state)
            )

    # -- a worker's end --------------------------------------------------------------------

    def _ended(self, slot: Slot, reason: Failure) -> None:
        pid, asked = slot.pid, slot.state is SlotState.STOPPING or self._stopping
        slot.ended(self.reactor.seconds())
        if pid is not None:
            forget_process(self.metrics_dir, pid)
        how = how_it_ended(reason)
        self._counted()
        if asked:
            self.log.info(
                "worker {worker} (pid {pid}) ended: {how}", worker=slot.index, pid=pid, how=how
            )
            return
        self.metrics.worker_restarts.inc()
        delay = backoff(slot.failures)
        self.log.error(
            "worker {worker} (pid {pid}) died: {how}; replacing it{when}",
            worker=slot.index,
            pid=pid,
            how=how,
            when=f" in {delay:g}s ({slot.failures} quick deaths in a row)" if delay else "",
        )
        self._respawns[slot.index] = self.reactor.callLater(delay, self._replace, slot)

    def _replace(self, slot: Slot) -> None:
        """Spawn a worker in place of one that died, saying so when it will not run what
        the others run: the configuration file is read again as it is now. Not while a
        reload is under way: the replacement waits for its sockets to be settled."""
        if self._reloading:
            self._respawns[slot.index] = self.reactor.callLater(0.5, self._replace, slot)
            return
        current, _, _ = check_config(self.config.source)
        if current is None:
            self.log.warn(
                "worker {worker}: the configuration file no longer loads; the replacement "
                "will not start until it does",
                worker=slot.index,
            )
        elif current != self.config:
            self.log.warn(
                "worker {worker}: the configuration file changed since it was loaded; the "
                "replacement runs it as it is now (reload to bring every worker in line)",
                worker=slot.index,
            )
        self._spawn(slot)

    # -- signals and reloads ----------------------------------------------------------------

    def _on_sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.reload, "SIGHUP")

    def _on_sigusr1(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.rotate_audit_logs)

    def rotate_audit_logs(self) -> None:
        """SIGUSR1: every worker reopens its audit log."""
        for slot in self.slots:
            if slot.control is not None:
                slot.control.callRemote(RotateAudit).addErrback(self._lost, slot)

    def _lost(self, failure: Failure, slot: Slot) -> None:
        self.log.warn(
            "worker {worker}: {problem}", worker=slot.index, problem=failure.getErrorMessage()
        )

    def _admin_reload(self) -> Deferred[tuple[bool, str]]:
        def answer(result: ReloadResult) -> tuple[bool, str]:
            if result.applied:
                return True, f"reloaded: {result.summary}\n"
            return False, "".join(f"{problem}\n" for problem in result.problems)

        return self.reload("/-/reload").addCallback(answer)

    def reload(self, trigger: str) -> Deferred[ReloadResult]:
        """Reload every worker, all or none (see :mod:`promgate.workers.coordinator`);
        systemd hears RELOADING=1 before and READY=1 after, applied or not."""
        if self._reloading:
            return succeed(self._refused(trigger, ("a reload is already under way",)))
        self.notifier.notify_reloading()
        self._reloading = True

        def done(result: ReloadResult) -> ReloadResult:
            self._reloading = False
            self.notifier.notify_ready(self._serving())
            return result

        return Deferred.fromCoroutine(self._reload(trigger)).addBoth(done)

    async def _reload(self, trigger: str) -> ReloadResult:
        try:
            return await self._reload_workers(trigger)
        except Exception:
            self.log.failure("reload ({trigger}) failed", trigger=trigger)
            return self._refused(trigger, ("reload failed: see the gateway's log",))

    async def _reload_workers(self, trigger: str) -> ReloadResult:
        config, errors, _ = check_config(self.config.source)
        if config is None:
            return self._refused(trigger, tuple(str(e) for e in errors))
        problems = restart_needed(self.config, config)
        if problems:
            return self._refused(trigger, tuple(problems))
        starting = [slot.index for slot in self.slots if slot.state is SlotState.STARTING]
        if starting:
            return self._refused(
                trigger,
                (f"worker(s) {', '.join(map(str, starting))} starting: reload once ready",),
            )
        # Bind what is new or moved first: a socket that cannot be bound refuses the
        # reload with nothing changed.
        before = {li.name: li for li in self.config.listeners}
        fresh: dict[str, ListenerService] = {}
        try:
            try:
                for listener in config.listeners:
                    old = before.get(listener.name)
                    if old is None or old.endpoint != listener.endpoint:
                        fresh[listener.name] = self._bind(listener)
            except StartupError as e:
                return self._refused(trigger, (str(e),))
            result = await self._apply_across_workers(trigger, config, fresh)
        finally:
            # Sockets bound for a reload that was not applied (refused, or failed in a way
            # no check foresaw) are let go: nothing changed.
            if self.config is not config:
                for svc in fresh.values():
                    svc.stopService()
        return result

    async def _apply_across_workers(
        self, trigger: str, config: Config, fresh: dict[str, ListenerService]
    ) -> ReloadResult:
        """Hand the new sockets to every worker, then prepare and commit across them all
        (or abort in all); on success ``config`` is the supervisor's own."""
        workers = [
            (slot.index, slot.control)
            for slot in self.slots
            if slot.control is not None and slot.state in (SlotState.READY, SlotState.UNREADY)
        ]
        handed = []
        for _, control in workers:
            for name, svc in fresh.items():
                assert svc.port is not None
                handed.append(
                    control.callRemote(HandOver, listener=name, socket=svc.port.fileno())  # type: ignore[attr-defined]
                )
        await DeferredList(handed, consumeErrors=True)
        self.generation += 1
        outcome = await coordinate_reload(workers, self.generation, trigger)
        if not outcome.applied:
            return self._refused(trigger, outcome.problems, logged=True)
        kept = {li.name for li in config.listeners} - set(fresh)
        for name, svc in list(self.sockets.items()):
            if name not in kept:
                svc.stopService()
        self.sockets = {
            li.name: fresh[li.name] if li.name in fresh else self.sockets[li.name]
            for li in config.listeners
        }
        self.config = config
        self.metrics.process.loaded(self.reactor.seconds())
        self.log.info(
            "configuration reloaded in {count} workers ({trigger}): {summary}",
            count=len(workers),
            trigger=trigger,
            summary=outcome.summary,
        )
        if self.ready_file is not None and self._every_worker_ready():
            self._write_ready_file(self.ready_file)
        return ReloadResult(True, summary=outcome.summary)

    def _refused(
        self, trigger: str, problems: tuple[str, ...], *, logged: bool = False
    ) -> ReloadResult:
        """Refuse a reload; unless the workers refused it themselves (``logged``), they
        are told, so that each audits the refusal as a single gateway does."""
        self.metrics.process.refused()
        if not logged:
            for problem in problems:
                self.log.error(
                    "reload ({trigger}) refused: {problem}", trigger=trigger, problem=problem
                )
            for slot in self.slots:
                if slot.control is not None and slot.state in (SlotState.READY, SlotState.UNREADY):
                    slot.control.callRemote(
                        Refused, trigger=trigger, problems=list(problems)
                    ).addErrback(self._lost, slot)
        else:
            self.log.error(
                "reload ({trigger}) refused: not every worker could apply it", trigger=trigger
            )
        return ReloadResult(False, problems)

    # -- stopping ---------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """Stop every worker (each drains), kill those left after the drain and a grace,
        then close the sockets and the admin listener."""
        self._stopping = True
        self.readiness.ready = False
        self.notifier.notify_stopping("stopping: draining every worker")
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        for call in self._respawns.values():
            if call.active():
                call.cancel()
        self._respawns.clear()
        for slot in self.slots:
            if slot.control is not None and slot.alive:
                slot.stopping()
                slot.control.callRemote(Stop).addErrback(_closed_meanwhile)
        self._counted()
        # New connections are refused from now on, not queued for no one.
        for svc in self.sockets.values():
            svc.stopService()
        self.sockets.clear()
        if not await self._all_gone(DRAIN_TIMEOUT + ABORT_GRACE + KILL_GRACE):
            for slot in self.slots:
                if slot.process is not None:
                    self.log.warn(
                        "worker {worker} (pid {pid}) still running: killing it",
                        worker=slot.index,
                        pid=slot.pid,
                    )
                    with contextlib.suppress(Exception):  # it ended meanwhile
                        slot.process.signalProcess("KILL")
            await self._all_gone(KILL_GRACE)
        await self.admin.stopService()
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None
        await super().stopService()  # type: ignore[no-untyped-call]

    async def _all_gone(self, within: float) -> bool:
        """Wait until no slot has a process, up to ``within`` seconds; whether none has."""
        waits = [slot.when_gone() for slot in self.slots if slot.alive]
        if not waits:
            return True
        timed_out = []

        def give_up() -> None:
            timed_out.append(True)
            for d in waits:
                if not d.called:
                    d.callback(None)

        timer = self.reactor.callLater(within, give_up)
        await DeferredList(waits)
        if timer.active():
            timer.cancel()
        return not timed_out and not any(slot.alive for slot in self.slots)

    # -- what it tells ----------------------------------------------------------------------

    def addresses(self) -> dict[str, str]:
        found = {name: svc.address() for name, svc in self.sockets.items()}
        found["admin"] = self.admin.address()
        return found

    def _serving(self) -> str:
        listeners = ", ".join(f"{name} {where}" for name, where in self.addresses().items())
        return f"serving with {len(self.slots)} workers: {listeners}"

    def _write_ready_file(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        workers = [slot.pid for slot in self.slots]
        tmp.write_text(
            json.dumps({"pid": os.getpid(), "listeners": self.addresses(), "workers": workers})
            + "\n"
        )
        tmp.replace(path)
