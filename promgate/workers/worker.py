"""A worker process (``python -m promgate.workers``): one reactor running the gateway on
the listening sockets its supervisor bound, answering the supervisor over AMP.

It has no admin listener, handles no SIGHUP or SIGUSR1 and tells systemd nothing: the
supervisor does all that for every worker and relays what concerns them. It logs JSON
events on its standard output, which the supervisor publishes as its own. When its
supervisor goes away (the control channel closes), it drains and exits as on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import LoopingCall
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    jsonFileLogObserver,
)
from twisted.python.failure import Failure

from promgate.config.errors import ConfigError
from promgate.errors import StartupError
from promgate.reload import (
    PreparedReload,
    ReloadResult,
    abort_reload,
    commit_reload,
    prepare_reload,
    refuse_reload,
)
from promgate.service import GatewayService
from promgate.worker_slot import WorkerSlot
from promgate.workers.control import (
    Abort,
    Commit,
    ControlChannel,
    HandOver,
    Prepare,
    Ready,
    Refused,
    RotateAudit,
    Stop,
)
from promgate.workers.reactors import IWorkerReactor

__all__ = ["READINESS_INTERVAL", "WorkerControl", "main"]

#: How often a worker looks at its readiness, and tells its supervisor when it changed.
READINESS_INTERVAL = 1.0


class WorkerControl(ControlChannel):
    """The worker's end of its control channel: reloads in two phases, audit log
    rotation and stop, on behalf of the supervisor; readiness reported to it."""

    log = Logger()

    def __init__(self, gateway: GatewayService, reactor: IWorkerReactor) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.gateway = gateway
        self.reactor = reactor
        self._prepared: dict[int, PreparedReload] = {}
        self._reported: bool | None = None
        self._watch = LoopingCall(self.report)
        self._watch.clock = reactor
        self.stopping = False

    def started(self) -> None:
        """The gateway serves: say so, and keep saying when readiness changes."""
        self._watch.start(READINESS_INTERVAL, now=True)

    def report(self) -> None:
        ready = self.gateway.readiness.is_ready() and not self.stopping
        if ready != self._reported:
            self._reported = ready
            self.callRemote(Ready, pid=os.getpid(), ready=ready).addErrback(  # type: ignore[no-untyped-call]
                _ignore
            )

    @HandOver.responder
    def hand_over(self, listener: str, socket: int) -> dict[str, Any]:
        previous = self.gateway.descriptors.pop(listener, None)
        if previous is not None:
            os.close(previous)
        self.gateway.descriptors[listener] = socket
        return {}

    @Prepare.responder
    def prepare(self, generation: int, trigger: str) -> dict[str, Any]:
        for other in list(self._prepared.values()):
            abort_reload(self.gateway, other, "superseded by a later reload")
        self._prepared.clear()
        result = prepare_reload(self.gateway, trigger)
        self._close_unused()
        if isinstance(result, ReloadResult):
            return {"problems": list(result.problems) or ["reload refused"]}
        self._prepared[generation] = result
        return {"problems": []}

    @Commit.responder
    def commit(self, generation: int) -> dict[str, Any]:
        prepared = self._prepared.pop(generation, None)
        if prepared is None:
            return {"applied": False, "summary": "nothing prepared"}
        result = commit_reload(self.gateway, prepared)
        return {"applied": result.applied, "summary": result.summary}

    @Abort.responder
    def abort(self, generation: int, why: str) -> dict[str, Any]:
        prepared = self._prepared.pop(generation, None)
        if prepared is not None:
            abort_reload(self.gateway, prepared, why)
        return {}

    @Refused.responder
    def refused(self, trigger: str, problems: list[str]) -> dict[str, Any]:
        refuse_reload(self.gateway, trigger, tuple(problems))
        return {}

    @RotateAudit.responder
    def rotate_audit(self) -> dict[str, Any]:
        self.gateway.rotate_audit_log()
        return {}

    @Stop.responder
    def stop(self) -> dict[str, Any]:
        self.reactor.callLater(0, self.end)
        return {}

    def end(self) -> None:
        """Stop the reactor (the gateway drains first), unless it is stopping already:
        under systemd, SIGTERM reaches every worker as well as the supervisor."""
        if not self.stopping:
            self.stopping = True
            with contextlib.suppress(ReactorNotRunning):
                self.reactor.stop()

    def shut_down(self) -> Deferred[None] | None:
        """Before the reactor stops: drain the gateway (if it started)."""
        self.stopping = True
        if self._watch.running:
            self._watch.stop()
        if not self.gateway.running:
            return None
        d: Deferred[None] = self.gateway.stopService()
        return d

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        if not self.stopping:
            self.log.warn("the supervisor went away: stopping")
            self.reactor.callLater(0, self.end)

    def _close_unused(self) -> None:
        for fd in self.gateway.descriptors.values():
            os.close(fd)
        self.gateway.descriptors.clear()


class _Once(ServerFactory):
    """Builds the one control protocol of the worker's control socket."""

    def __init__(self, control: WorkerControl) -> None:
        self.control = control

    def buildProtocol(self, addr: object) -> WorkerControl:
        return self.control


def _ignore(failure: Failure) -> None:
    """The supervisor may be gone; the worker learns it from the closed connection."""


def _arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m promgate.workers")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--control", type=int, required=True, help="the control socket's fd")
    parser.add_argument("--listener", action="append", default=[], help="NAME=FD")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one worker until it is told to stop; the process's exit status."""
    args = _arguments(sys.argv[1:] if argv is None else argv)
    from twisted.internet import reactor as global_reactor

    reactor: IWorkerReactor = global_reactor  # type: ignore[assignment]
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    level = LogLevel.levelWithName(args.log_level)
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                jsonFileLogObserver(sys.stdout, recordSeparator=""),
                [LogLevelFilterPredicate(defaultLogLevel=level)],
            )
        ],
        redirectStandardIO=False,
    )
    log = Logger(namespace="promgate.workers.worker")
    slot = WorkerSlot(args.index, args.count)
    descriptors = {}
    for given in args.listener:
        name, _, fd = given.partition("=")
        descriptors[name] = int(fd)
    from promgate.config.loader import load_config

    try:
        config = load_config(args.config)
    except ConfigError as e:
        log.error(
            "worker {worker}: invalid configuration:\n{problems}",
            worker=slot.index,
            problems=str(e),
        )
        return 2
    gateway = GatewayService(config, reactor, worker=slot, descriptors=descriptors)
    control = WorkerControl(gateway, reactor)
    reactor.adoptStreamConnection(args.control, socket.AF_UNIX, _Once(control))
    os.close(args.control)
    status = [0]

    def start() -> None:
        try:
            gateway.privilegedStartService()
            gateway.startService()
        except StartupError as e:
            log.error("worker {worker}: {problem}", worker=slot.index, problem=str(e))
            status[0] = 1
            control.end()
            return
        except Exception:
            log.failure("worker {worker} could not start", worker=slot.index)
            status[0] = 1
            control.end()
            return
        log.info("worker {worker} (pid {pid}) serving", worker=slot.index, pid=os.getpid())
        control.started()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", control.shut_down)
    reactor.run()
    return status[0]
