"""The reactor roles promgate's objects are given, each the narrowest that does the job.

Where one Twisted interface is enough (``IReactorTime`` for a clock, ``IReactorFromThreads``
for a thread pool's results) it is used as it is. Where an object needs several, the role
here names their sum, the way Twisted types its global reactor
(``twisted.internet._IReactorCommon``) and treq the reactor it connects with
(``treq._types._ITreqReactor``). These interfaces exist for type checking: no reactor
declares them, and nothing asks ``providedBy``; every Twisted reactor on a POSIX system
provides all of them. Tests pass in-memory stand-ins (a ``MemoryReactorClock``, or a
``Clock`` where only time is used) that provide the parts they exercise.
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IReactorFromThreads,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    IReactorUDP,
    IReactorUNIX,
)

__all__ = [
    "IConnectReactor",
    "IDiscoveryReactor",
    "IGatewayReactor",
    "IListenReactor",
    "INamesReactor",
]


class IConnectReactor(IReactorTCP, IReactorTime, IReactorPluggableNameResolver):
    """Connects to a host name or an address with a deadline: what ``HostnameEndpoint``,
    ``TCP4ClientEndpoint`` and ``TCP6ClientEndpoint`` (and so ``Agent`` and treq) need."""


class INamesReactor(IReactorTCP, IReactorUDP, IReactorTime):
    """Asks DNS servers: what ``twisted.names.client.Resolver`` needs (queries over UDP,
    truncated answers again over TCP, each with a timeout)."""


class IDiscoveryReactor(IConnectReactor, INamesReactor):
    """What a discovery provider is given: timers, TCP and UDP, and name resolution;
    enough for ``twisted.names`` and for an HTTP client."""


class IListenReactor(IReactorTCP, IReactorUNIX):
    """Listens on the endpoint descriptions a configuration may give: ``tcp:``, ``tcp6:``
    and ``unix:``."""


class IGatewayReactor(IDiscoveryReactor, IListenReactor, IReactorFromThreads):
    """The whole gateway's: it listens, connects upstream, runs discovery, keeps time and
    takes results back from its bcrypt threads and signal handlers."""
