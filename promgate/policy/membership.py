"""The current targets of every route, shared by every listener and swapped by discovery."""

from __future__ import annotations

from collections.abc import Mapping

from promgate.config.model import Route, Target


class Membership:
    """The current targets of every route: the security boundary of ``/scrape``.

    ``current`` maps a route name to its members by address. It is never changed in
    place: discovery swaps in a new mapping (sharing the unchanged routes' dicts), so a
    lookup is two dict reads and a reader never sees a half-built set.
    """

    def __init__(self, routes: Mapping[str, Route]) -> None:
        self.current: Mapping[str, Mapping[str, Target]] = {
            name: {t.address: t for t in r.targets} for name, r in routes.items()
        }

    def replace(self, route: str, members: Mapping[str, Target]) -> None:
        """Make ``members`` the route's target set, from the next lookup on."""
        new = dict(self.current)
        new[route] = members
        self.current = new


__all__ = ["Membership"]
