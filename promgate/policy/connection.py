"""``tcp`` listener policy: where one connection goes and whether it may.

A listener sends each connection to one route's target, chosen by the listener
(``route``) or by the server name the client asked for (``sni``). A terminated connection
is judged by its caller's identity; a passthrough connection carries none, so only the
route's ``sni:`` allow entries can admit it.
"""

from __future__ import annotations

from collections.abc import Mapping

from promgate.config.model import Destination, Route, TCPForwarding
from promgate.core.reasons import Reason
from promgate.identity import Recognition
from promgate.net.sni import normalise_server_name
from promgate.policy.decision import NOT_FOUND, Check, Decision, Refusal, allowed, refused
from promgate.policy.rules import Rules


def match_server_name(sni: Mapping[str, Destination], name: str | None) -> Destination | None:
    """The destination ``sni`` gives ``name``: an exact entry first, then ``*.parent``."""
    if name is None:
        return None
    name = normalise_server_name(name)
    found = sni.get(name)
    if found is None:
        _, dot, parent = name.partition(".")
        if dot:
            found = sni.get("*." + parent)
    return found


class ConnectionPolicy:
    """Where one listener's connections go and who may make them."""

    def __init__(self, settings: TCPForwarding, routes: Mapping[str, Route]) -> None:
        self.settings = settings
        self.routes = routes
        self.rules = Rules(routes.values())

    def destination(self, server_name: str | None) -> Destination | None:
        settings = self.settings
        if settings.destination is not None:
            return settings.destination
        return match_server_name(settings.sni, server_name) or settings.sni_default

    def decide(self, recognition: Recognition | None, server_name: str | None) -> Decision:
        """Allow or refuse one connection. ``recognition`` is None in passthrough mode.

        Order: destination (listener route, or SNI), route and target exist, caller
        recognised (terminate) and allowed.
        """
        dest = self.destination(server_name)
        if dest is None:
            reason = Reason.NO_SERVER_NAME if server_name is None else Reason.UNKNOWN_SERVER_NAME
            rule = "listener sni: no entry and no sni_default"
            return refused(Refusal.UNKNOWN, reason, "destination", rule)
        route = self.routes.get(dest.route)
        target = None
        if route is not None:
            target = next((t for t in route.targets if t.address == dest.target), None)
        if route is None or target is None:
            # A validated configuration never gets here.
            rule = "destination not in the routes"
            return refused(Refusal.UNKNOWN, NOT_FOUND, "destination", rule, route)
        checks: tuple[Check, ...] = (
            Check("destination", True, f"routes.{route.name}: {target.address}"),
        )
        rules = self.rules[route]
        if recognition is None:
            verdict = rules.authorize_server_name(server_name)
        else:
            identity = recognition.identity
            if identity is None:
                rule = "caller not recognised"
                return refused(
                    Refusal.FORBIDDEN, recognition.reason, "identity", rule, route, checks, target
                )
            checks += (Check("identity", True, f"identities.{identity.name}"),)
            verdict = rules.authorize(identity)
        if not verdict.allowed:
            return refused(
                Refusal.FORBIDDEN, verdict.reason, "allow", verdict.rule, route, checks, target
            )
        return allowed(
            verdict.rule, route, target, checks=(*checks, Check("allow", True, verdict.rule))
        )


__all__ = ["ConnectionPolicy", "match_server_name"]
