"""The discovery plugin API: what a source of targets provides, and the defaults a
provider can start from. Re-exported by ``promgate.discovery``, which plugins import."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface, implementer

from promgate.config.model import Target
from promgate.reactors import IDiscoveryReactor

#: How often a runner wakes to ask a provider whether its source changed, at most.
DEFAULT_POLL_INTERVAL = 5.0


@attrs.frozen
class Discovered:
    """What one refresh found: the complete set, and the problems met on the way.

    A provider that could read part of its sources returns the rest (keeping, for the
    parts it could not read, what it had before) and names each problem in ``errors``;
    the refresh then counts as a failure in metrics and logs, but its targets apply.
    """

    targets: tuple[Target, ...]
    errors: tuple[str, ...] = ()


class IDiscoveryProvider(Interface):
    """A source of targets. Subclass ``BaseProvider`` for the defaults."""

    #: How often (seconds) the runner asks ``changed()``.
    poll_interval = Attribute("float: seconds between calls to changed()")

    def refresh() -> Deferred[Discovered] | Discovered | Sequence[Target]:
        """Discover the complete current set now. A failure (exception or failed
        Deferred) keeps the previous set."""

    def changed() -> bool:
        """Cheap: has the source changed since the last refresh? (Polled.)"""

    def next_interval(succeeded: bool) -> float:  # noqa: N805
        """Seconds from the end of a refresh to the next scheduled one."""


class IDiscoveryProviderFactory(Interface):
    """A third-party provider, found as a plugin in ``twisted/plugins/``.

    The configuration names it: ``targets: {plugin: {name: NAME, ...settings}}``.
    """

    name = Attribute("str: the name the configuration uses")

    def check(settings: Mapping[str, Any]) -> Sequence[tuple[str, str]]:  # noqa: N805
        """Problems with ``settings`` as ``(key, message)`` pairs; empty if usable."""

    def build(
        settings: Mapping[str, Any],  # noqa: N805
        reactor: IDiscoveryReactor,
        base: Path,
    ) -> IDiscoveryProvider:
        """A provider for ``settings``; relative paths resolve against ``base``.

        ``reactor`` keeps time and connects over TCP and UDP, with name resolution:
        enough for ``twisted.names`` and for an HTTP client (``Agent``, treq)."""


@implementer(IDiscoveryProvider)
class BaseProvider:
    """Defaults: never changed between refreshes, refreshed every ``refresh_interval``."""

    poll_interval = DEFAULT_POLL_INTERVAL
    refresh_interval = 60.0

    def refresh(self) -> Deferred[Discovered] | Discovered | Sequence[Target]:
        raise NotImplementedError

    def changed(self) -> bool:
        return False

    def next_interval(self, succeeded: bool) -> float:
        return self.refresh_interval


__all__ = [
    "DEFAULT_POLL_INTERVAL",
    "BaseProvider",
    "Discovered",
    "IDiscoveryProvider",
    "IDiscoveryProviderFactory",
]
