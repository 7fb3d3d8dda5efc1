"""Authorisation: may this identity reach this route, target and path? Deny by default.

``ScrapePolicy.decide`` is the whole decision for one ``/scrape`` request, as a pure
function of the configuration, the recognised caller and the query. The gateway, and the
``promgate explain`` and ``promgate test-policy`` commands, all ask it, so what they print
is what the gateway does.

The reasons it gives are one small vocabulary, shared by audit records and metric labels:
``bad_request``, ``not_found``, ``authz_denied``, ``path_refused``, ``param_refused`` (plus
the caller-recognition reasons, such as ``unknown_identity``, passed through unchanged).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl

import attrs

from promgate.config.model import Identity, Route, Target
from promgate.identity import Recognition
from promgate.paths import PathRefused, normalize_path
from promgate.policy.decision import (
    BAD_REQUEST,
    NOT_FOUND,
    PARAM_REFUSED,
    PATH_REFUSED,
    Check,
    Decision,
    Refusal,
    allowed,
    refused,
)
from promgate.policy.membership import Membership
from promgate.policy.rules import Rules


@attrs.frozen
class ScrapeQuery:
    """The parameters of one ``/scrape`` request, decoded once."""

    route: str
    target: str
    path: str | None
    params: tuple[tuple[str, str], ...]


def _bad_query(rule: str) -> Decision:
    return refused(Refusal.MALFORMED, BAD_REQUEST, "query", rule)


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
        return _bad_query("query string: malformed")
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            return _bad_query(f"query string: {key!r} given twice")
        params[key] = value
    route = params.pop("route", None)
    target = params.pop("target", None)
    if not route or not target:
        return _bad_query("query string: route and target are required")
    path = params.pop("path", None)
    return ScrapeQuery(route, target, path, tuple(params.items()))


class ScrapePolicy:
    """Routes, their targets, and who may reach which path on them.

    Without ``membership`` the targets are the configuration's static ones (what the
    ``explain`` and ``test-policy`` tools judge); the gateway passes the discovered set.
    """

    def __init__(
        self,
        routes: Mapping[str, Route],
        identities: Mapping[str, Identity] | None = None,
        membership: Membership | None = None,
    ) -> None:
        self.routes = routes
        self.rules = Rules(routes.values())
        #: The configured identities by name (for tools that name the caller).
        self.identities: Mapping[str, Identity] = identities or {}
        self.membership = membership if membership is not None else Membership(routes)

    @property
    def targets(self) -> Mapping[str, Mapping[str, Target]]:
        """Every route's current members by address."""
        return self.membership.current

    def visible_routes(self, identity: Identity) -> list[Route]:
        """The routes ``identity`` may scrape (what ``/sd`` lists for it)."""
        rules = self.rules
        return [r for r in self.routes.values() if rules[r].authorize(identity).allowed]

    def decide(self, recognition: Recognition, query: ScrapeQuery) -> Decision:
        """Allow or refuse one scrape.

        Order, first failure answers: the route exists (unknown), the caller is recognised
        and allowed by the route (forbidden), the target is in the route (unknown, the same
        answer as an unknown route), the path is canonical (malformed) and one of the
        route's paths (forbidden), every further parameter is one the route passes
        (malformed).
        """
        checks: list[Check] = []

        def refuse(
            name: str, refusal: Refusal, reason: str, rule: str, route: Route | None
        ) -> Decision:
            return refused(refusal, reason, name, rule, route, tuple(checks))

        route = self.routes.get(query.route)
        if route is None:
            return refuse(
                "route", Refusal.UNKNOWN, NOT_FOUND, f"routes: no route {query.route!r}", None
            )
        checks.append(Check("route", True, f"routes.{route.name}"))
        identity = recognition.identity
        if identity is None:
            why = recognition.reason
            if recognition.detail:
                why = f"{why}: {recognition.detail}"
            return refuse(
                "identity",
                Refusal.FORBIDDEN,
                recognition.reason,
                f"identities: caller not recognised ({why})",
                route,
            )
        roles = ", ".join(sorted(identity.roles)) or "none"
        checks.append(Check("identity", True, f"identities.{identity.name} (roles: {roles})"))
        verdict = self.rules[route].authorize(identity)
        if not verdict.allowed:
            return refuse("allow", Refusal.FORBIDDEN, verdict.reason, verdict.rule, route)
        checks.append(Check("allow", True, verdict.rule))
        target = self.targets.get(route.name, {}).get(query.target)
        if target is None:
            return refuse(
                "target",
                Refusal.UNKNOWN,
                NOT_FOUND,
                f"routes.{route.name}.targets: {query.target!r} not a member",
                route,
            )
        checks.append(
            Check("target", True, f"routes.{route.name}.targets: {target.address!r} is a member")
        )
        if query.path is None:
            path = route.metrics_path
            checks.append(Check("path", True, f"routes.{route.name}.metrics_path: {path!r}"))
        else:
            try:
                path = normalize_path(query.path)
            except PathRefused as e:
                return refuse(
                    "path",
                    Refusal.MALFORMED,
                    PATH_REFUSED,
                    f"path normalisation: {e.reason}",
                    route,
                )
            if path not in route.paths:
                return refuse(
                    "path",
                    Refusal.FORBIDDEN,
                    PATH_REFUSED,
                    f"routes.{route.name}.paths: {path!r} not listed",
                    route,
                )
            checks.append(Check("path", True, f"routes.{route.name}.paths: {path!r} is listed"))
        for key, _ in query.params:
            if key not in route.params:
                return refuse(
                    "params",
                    Refusal.MALFORMED,
                    PARAM_REFUSED,
                    f"routes.{route.name}.params: {key!r} not listed",
                    route,
                )
        if query.params:
            names = ", ".join(repr(k) for k, _ in query.params)
            checks.append(Check("params", True, f"routes.{route.name}.params: {names} listed"))
        else:
            checks.append(Check("params", True, "no further parameters"))
        return allowed(verdict.rule, route, target, path, query.params, tuple(checks))


__all__ = ["ScrapePolicy", "ScrapeQuery", "parse_scrape_query"]
