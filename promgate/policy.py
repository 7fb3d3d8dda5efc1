"""Authorisation: may this identity use this route? Deny by default."""

from __future__ import annotations

import attrs

from promgate.config.model import Identity, Route


@attrs.frozen
class Verdict:
    """An authorisation decision and the rule that made it."""

    allowed: bool
    reason: str  # "ok" or "authz_denied"
    rule: str  # the allow entry that matched, or "default deny"


def authorize(identity: Identity, route: Route) -> Verdict:
    """Allow if the route's ``allow`` names the identity or one of its roles."""
    for entry in route.allow:
        if entry == identity.name:
            return Verdict(True, "ok", f"routes.{route.name}.allow: {entry}")
        if entry.startswith("role:") and entry[5:] in identity.roles:
            return Verdict(True, "ok", f"routes.{route.name}.allow: {entry}")
    return Verdict(False, "authz_denied", "default deny")
