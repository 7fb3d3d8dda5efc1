"""Authorisation: may this identity reach this route, target and path? Deny by default.

``ScrapePolicy.decide`` is the whole decision for one ``/scrape`` request, as a pure
function of the configuration, the recognised caller and the query. The gateway, and the
``promgate explain`` and ``promgate test-policy`` commands, all ask it, so what they print
is what the gateway does.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl

import attrs

from promgate.config.model import Identity, Route, Target
from promgate.identity import Recognition

_NOT_FOUND = b"unknown route or target\n"


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
    return Verdict(False, "authz_denied", f"routes.{route.name}.allow: default deny")


@attrs.frozen
class ScrapeQuery:
    """The parameters of one ``/scrape`` request, decoded once."""

    route: str
    target: str
    path: str | None
    params: tuple[tuple[str, str], ...]


@attrs.frozen
class Decision:
    """The gateway's answer to one request before any upstream is involved."""

    allowed: bool
    status: int
    reason: str
    rule: str
    body: bytes = b""
    route: Route | None = None
    target: Target | None = None
    #: The exact upstream path policy evaluated: the one sent upstream.
    path: str | None = None
    params: tuple[tuple[str, str], ...] = ()


def refusal(
    status: int, reason: str, rule: str, body: bytes, route: Route | None = None
) -> Decision:
    return Decision(False, status, reason, rule, body, route)


def parse_scrape_query(query: bytes) -> ScrapeQuery | Decision:
    """Decode a ``/scrape`` query string strictly, or the 400 that refuses it."""
    try:
        pairs = parse_qsl(
            query.decode("ascii"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=32,
            errors="strict",
        )
    except (UnicodeDecodeError, ValueError):
        return refusal(400, "bad_request", "query string", b"malformed query string\n")
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            return refusal(400, "bad_request", "query string", b"parameter given twice\n")
        params[key] = value
    route = params.pop("route", None)
    target = params.pop("target", None)
    if not route or not target:
        return refusal(400, "bad_request", "query string", b"route and target are required\n")
    path = params.pop("path", None)
    return ScrapeQuery(route, target, path, tuple(params.items()))


class ScrapePolicy:
    """Routes, their targets, and who may reach which path on them."""

    def __init__(self, routes: Mapping[str, Route]) -> None:
        self.routes = routes
        self.targets = {name: {t.address: t for t in r.targets} for name, r in routes.items()}

    def visible_routes(self, identity: Identity) -> list[Route]:
        """The routes ``identity`` may scrape (what ``/sd`` lists for it)."""
        return [r for r in self.routes.values() if authorize(identity, r).allowed]

    def decide(self, recognition: Recognition, query: ScrapeQuery) -> Decision:
        """Allow or refuse one scrape. Order: route exists, caller recognised and allowed,
        target in the route, path allowed, extra parameters allowed."""
        route = self.routes.get(query.route)
        if route is None:
            return refusal(404, "not_found", "no such route", _NOT_FOUND)
        identity = recognition.identity
        if identity is None:
            return refusal(403, recognition.reason, "caller not recognised", b"forbidden\n", route)
        verdict = authorize(identity, route)
        if not verdict.allowed:
            return refusal(403, verdict.reason, verdict.rule, b"forbidden\n", route)
        target = self.targets[route.name].get(query.target)
        if target is None:
            return refusal(
                404, "not_found", f"routes.{route.name}.targets: not a member", _NOT_FOUND, route
            )
        path = route.metrics_path if query.path is None else query.path
        if path not in route.paths:
            return refusal(
                403,
                "path_refused",
                f"routes.{route.name}.paths: {path!r} not listed",
                b"path not allowed on this route\n",
                route,
            )
        for key, _ in query.params:
            if key not in route.params:
                return refusal(
                    400,
                    "param_refused",
                    f"routes.{route.name}.params: {key!r} not listed",
                    b"query parameter not allowed on this route\n",
                    route,
                )
        return Decision(True, 200, "ok", verdict.rule, b"", route, target, path, query.params)
