"""The control channel between the supervisor and each worker: AMP commands over an
AF_UNIX socket pair, the listening sockets of a reload passed as descriptors.

Worker to supervisor: :class:`Ready` (start-up done, and each later change of readiness).
Supervisor to worker: :class:`HandOver` (a listening socket bound for a reload),
:class:`Prepare`, :class:`Commit` and :class:`Abort` (the two phases of a reload),
:class:`Refused` (a reload refused before the workers were asked),
:class:`RotateAudit` (SIGUSR1) and :class:`Stop` (SIGTERM: drain and exit).
"""

from __future__ import annotations

from typing import Any

from twisted.protocols import amp
from twisted.python.failure import Failure

__all__ = [
    "Abort",
    "Commit",
    "ControlChannel",
    "HandOver",
    "Prepare",
    "Ready",
    "Refused",
    "RotateAudit",
    "Stop",
]


class ControlChannel(amp.AMP):
    """AMP without its log lines on every connection made and lost: the supervisor logs
    each worker's start and end itself."""

    def makeConnection(self, transport: Any) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class Ready(amp.Command):
    """The worker started (or its readiness changed): whether it would answer /-/ready
    with 200 now."""

    arguments = [(b"pid", amp.Integer()), (b"ready", amp.Boolean())]
    response = []


class HandOver(amp.Command):
    """A listening socket bound by the supervisor for listener ``listener``, for the next
    Prepare: a listener a reload adds or moves."""

    arguments = [(b"listener", amp.Unicode()), (b"socket", amp.Descriptor())]
    response = []


class Prepare(amp.Command):
    """Load and check the configuration file and build its snapshot, applying nothing;
    ``problems`` is empty when it can be committed."""

    arguments = [(b"generation", amp.Integer()), (b"trigger", amp.Unicode())]
    response = [(b"problems", amp.ListOf(amp.Unicode()))]


class Commit(amp.Command):
    """Apply the snapshot prepared for ``generation``; what changed, in one line."""

    arguments = [(b"generation", amp.Integer())]
    response = [(b"applied", amp.Boolean()), (b"summary", amp.Unicode())]


class Abort(amp.Command):
    """Let the snapshot prepared for ``generation`` go (another worker could not apply
    it); the refusal is audited with ``why``."""

    arguments = [(b"generation", amp.Integer()), (b"why", amp.Unicode())]
    response = []


class Refused(amp.Command):
    """A reload the supervisor refused before asking the workers to prepare it (the file
    does not load, a new socket cannot be bound): each worker audits the refusal."""

    arguments = [(b"trigger", amp.Unicode()), (b"problems", amp.ListOf(amp.Unicode()))]
    response = []


class RotateAudit(amp.Command):
    """Reopen the audit log's path (SIGUSR1 to the supervisor)."""

    arguments = []
    response = []


class Stop(amp.Command):
    """Stop accepting, drain as on SIGTERM, and exit; answered when the drain begins."""

    arguments = []
    response = []
