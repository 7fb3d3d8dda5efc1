"""One worker's place in the supervisor: the process in it now, its lifecycle as named
states, and how long a slot that keeps failing waits before its next process."""

from __future__ import annotations

import enum
import signal
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import ILogObserver, Logger, eventFromJSON
from twisted.protocols import amp
from twisted.python.failure import Failure

from promgate.workers.control import ControlChannel, Ready

__all__ = [
    "MAX_BACKOFF",
    "STABLE_AFTER",
    "Slot",
    "SlotState",
    "SupervisorControl",
    "WorkerProcess",
    "backoff",
    "how_it_ended",
]

#: A worker that ran at least this long before it died is replaced at once.
STABLE_AFTER = 10.0
#: The longest a slot whose workers keep dying waits before its next one.
MAX_BACKOFF = 30.0
#: The longest line of a worker's output relayed to the log (the rest is cut).
_MAX_LINE = 64 * 1024


def backoff(failures: int) -> float:
    """How long a slot waits before its next worker after ``failures`` quick deaths in a
    row: none after the first, then 1s, 2s, 4s... up to MAX_BACKOFF."""
    if failures <= 1:
        return 0.0
    return float(min(MAX_BACKOFF, 2.0 ** (failures - 2)))


class SlotState(enum.Enum):
    """Where a slot's worker is in its life."""

    #: Spawned; it has not said it is ready yet.
    STARTING = "starting"
    #: Serving, and would answer /-/ready with 200.
    READY = "ready"
    #: Running but not ready (its audit log cannot be written, discovery not settled).
    UNREADY = "unready"
    #: Told to stop: draining its connections.
    STOPPING = "stopping"
    #: No process: it ended, and its replacement waits out the back-off (or the
    #: supervisor is stopping).
    DEAD = "dead"


class Slot:
    """Worker ``index`` as the supervisor sees it. The state changes only through
    :meth:`spawned`, :meth:`reported`, :meth:`stopping` and :meth:`ended`."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.state = SlotState.DEAD
        self.pid: int | None = None
        self.process: IProcessTransport | None = None
        self.control: amp.AMP | None = None
        #: When the current process was spawned (the supervisor's clock).
        self.spawned_at = 0.0
        #: Quick deaths in a row (see STABLE_AFTER).
        self.failures = 0
        self._gone: list[Deferred[None]] = []

    @property
    def alive(self) -> bool:
        return self.state is not SlotState.DEAD

    def spawned(self, pid: int, process: IProcessTransport, control: amp.AMP, at: float) -> None:
        self.state = SlotState.STARTING
        self.pid, self.process, self.control, self.spawned_at = pid, process, control, at

    def reported(self, ready: bool) -> None:
        """The worker said whether it is ready (ignored once it is told to stop)."""
        if self.state in (SlotState.STARTING, SlotState.READY, SlotState.UNREADY):
            self.state = SlotState.READY if ready else SlotState.UNREADY

    def stopping(self) -> None:
        if self.alive:
            self.state = SlotState.STOPPING

    def ended(self, at: float) -> None:
        """Its process ended: count a quick death, and tell whoever waits."""
        self.failures = self.failures + 1 if at - self.spawned_at < STABLE_AFTER else 1
        self.state = SlotState.DEAD
        self.process = self.control = None
        waiting, self._gone = self._gone, []
        for d in waiting:
            d.callback(None)

    def when_gone(self) -> Deferred[None]:
        """Fires once no process is in the slot."""
        d: Deferred[None] = Deferred()
        if not self.alive:
            d.callback(None)
        else:
            self._gone.append(d)
        return d


def how_it_ended(reason: Failure) -> str:
    """``exit code 1``, ``signal 9 (SIGKILL)``..., as the log says it."""
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exit code 0"
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = "?"
            return f"signal {value.signal} ({name})"
        return f"exit code {value.exitCode}"
    return str(value)


class WorkerProcess(ProcessProtocol):
    """A worker process's output and end. Its standard output carries its log events
    (one JSON object a line), published here with ``log_system`` naming the worker; its
    standard error is logged line by line."""

    log = Logger()

    def __init__(
        self, slot: Slot, publish: ILogObserver, on_end: Callable[[Slot, Failure], None]
    ) -> None:
        self.slot = slot
        self._publish = publish
        self._on_end = on_end
        self._buffers: dict[int, bytes] = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N803
        buffered = self._buffers.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > _MAX_LINE:
            lines.append(rest)
            rest = b""
        self._buffers[childFD] = rest
        for line in lines:
            if line.strip():
                self._line(childFD, line[:_MAX_LINE])

    def _line(self, fd: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if fd == 1:
            try:
                event: dict[str, Any] = eventFromJSON(text)
            except ValueError:
                event = {}
            if "log_level" in event:
                event["log_system"] = f"worker-{self.slot.index}"
                event["worker"] = self.slot.index
                self._publish(event)
                return
        self.log.warn(
            "worker {worker} (pid {pid}): {line}",
            worker=self.slot.index,
            pid=self.slot.pid,
            line=text,
        )

    def processEnded(self, reason: Failure) -> None:
        for fd in (1, 2):
            if self._buffers.get(fd):
                self._line(fd, self._buffers[fd])
                self._buffers[fd] = b""
        self._on_end(self.slot, reason)


class SupervisorControl(ControlChannel):
    """The supervisor's end of one worker's control channel."""

    def __init__(self, slot: Slot, on_ready: Callable[[Slot, int, bool], None]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.slot = slot
        self._on_ready = on_ready

    @Ready.responder
    def ready(self, pid: int, ready: bool) -> dict[str, Any]:
        self._on_ready(self.slot, pid, ready)
        return {}
