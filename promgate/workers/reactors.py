"""The reactor roles of the supervisor and of a worker process."""

from __future__ import annotations

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFromThreads,
    IReactorProcess,
    IReactorSocket,
    IReactorTime,
)

from promgate.reactors import IGatewayReactor, IListenReactor

__all__ = ["ISupervisorReactor", "IWorkerReactor"]


class ISupervisorReactor(
    IListenReactor, IReactorSocket, IReactorProcess, IReactorTime, IReactorCore, IReactorFromThreads
):
    """The supervisor's: it binds, spawns workers, speaks to them over adopted sockets,
    keeps time and takes signals back from their handlers."""


class IWorkerReactor(IGatewayReactor, IReactorSocket, IReactorCore):
    """A worker's: the gateway's, plus its control socket and its own stopping."""
