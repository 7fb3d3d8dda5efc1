"""A route's ``allow`` entries, parsed once: who may use the route. Deny by default.

An entry is an identity name, ``role:NAME``, or ``sni:PATTERN`` (``tcp`` passthrough
listeners, whose connections carry no identity). The first entry that admits a caller is
the rule that decided.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum

import attrs

from promgate.config.model import Identity, Route
from promgate.core.reasons import Reason
from promgate.net.sni import normalise_server_name
from promgate.policy.decision import Verdict


class EntryKind(Enum):
    IDENTITY = "identity"
    ROLE = "role"
    SNI = "sni"


@attrs.frozen
class AllowEntry:
    """One ``allow`` entry: its kind, what it names, and the text as configured."""

    kind: EntryKind
    value: str
    text: str

    @classmethod
    def parse(cls, text: str) -> AllowEntry:
        if text.startswith("role:"):
            return cls(EntryKind.ROLE, text[5:], text)
        if text.startswith("sni:"):
            pattern = text[4:]
            if pattern != "*":
                pattern = normalise_server_name(pattern)
            return cls(EntryKind.SNI, pattern, text)
        return cls(EntryKind.IDENTITY, text, text)


def sni_pattern_matches(pattern: str, name: str) -> bool:
    """``pattern`` is a server name or ``*.suffix``; ``*`` stands for exactly one label."""
    pattern = normalise_server_name(pattern)
    if pattern.startswith("*."):
        label, dot, parent = name.partition(".")
        return bool(label and dot) and parent == pattern[2:]
    return pattern == name


@attrs.frozen
class RouteRules:
    """One route's ``allow`` list, parsed."""

    route: str
    entries: tuple[AllowEntry, ...]

    @classmethod
    def of(cls, route: Route) -> RouteRules:
        return cls(route.name, tuple(AllowEntry.parse(e) for e in route.allow))

    def authorize(self, identity: Identity) -> Verdict:
        """Allow if an entry names the identity or one of its roles."""
        for entry in self.entries:
            if (entry.kind is EntryKind.IDENTITY and entry.value == identity.name) or (
                entry.kind is EntryKind.ROLE and entry.value in identity.roles
            ):
                return Verdict(True, Reason.OK, f"routes.{self.route}.allow: {entry.text}")
        return Verdict(False, Reason.AUTHZ_DENIED, f"routes.{self.route}.allow: default deny")

    def authorize_server_name(self, server_name: str | None) -> Verdict:
        """Admit a passthrough connection, which carries no identity, by its server name.

        Only ``sni:PATTERN`` entries apply: ``sni:*`` admits every passthrough connection
        routed here (with or without a server name), ``sni:NAME`` and ``sni:*.PARENT``
        those whose ClientHello named a matching server. Identity and ``role:`` entries
        never admit a connection without an identity.
        """
        for entry in self.entries:
            if entry.kind is not EntryKind.SNI:
                continue
            if entry.value == "*" or (
                server_name is not None and sni_pattern_matches(entry.value, server_name)
            ):
                return Verdict(True, Reason.OK, f"routes.{self.route}.allow: {entry.text}")
        return Verdict(
            False, Reason.AUTHZ_DENIED, f"routes.{self.route}.allow: no sni: entry matches"
        )


class Rules:
    """Every route's rules, parsed once when a policy is built."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._by_route: Mapping[str, RouteRules] = {r.name: RouteRules.of(r) for r in routes}

    def __getitem__(self, route: Route) -> RouteRules:
        found = self._by_route.get(route.name)
        return found if found is not None else RouteRules.of(route)


def authorize(identity: Identity, route: Route) -> Verdict:
    """``route``'s rules for ``identity``, parsed on the spot (tools; policies use Rules)."""
    return RouteRules.of(route).authorize(identity)


__all__ = ["AllowEntry", "EntryKind", "RouteRules", "Rules", "authorize", "sni_pattern_matches"]
