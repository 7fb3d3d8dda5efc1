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

OK = "ok"
BAD_REQUEST = "bad_request"
NOT_FOUND = "not_found"
AUTHZ_DENIED = "authz_denied"
PATH_REFUSED = "path_refused"
PARAM_REFUSED = "param_refused"
#: Every reason ScrapePolicy gives of its own (recognition reasons come from identity.py).
POLICY_REASONS = frozenset({BAD_REQUEST, NOT_FOUND, AUTHZ_DENIED, PATH_REFUSED, PARAM_REFUSED})

_NOT_FOUND = b"unknown route or target\n"


@attrs.frozen
class Verdict:
    """An authorisation decision and the rule that made it."""

    allowed: bool
    reason: str  # OK or AUTHZ_DENIED
    rule: str  # the allow entry that matched, or "default deny"


def authorize(identity: Identity, route: Route) -> Verdict:
    """Allow if the route's ``allow`` names the identity or one of its roles."""
    for entry in route.allow:
        if entry == identity.name:
            return Verdict(True, OK, f"routes.{route.name}.allow: {entry}")
        if entry.startswith("role:") and entry[5:] in identity.roles:
            return Verdict(True, OK, f"routes.{route.name}.allow: {entry}")
    return Verdict(False, AUTHZ_DENIED, f"routes.{route.name}.allow: default deny")


@attrs.frozen
class ScrapeQuery:
    """The parameters of one ``/scrape`` request, decoded once."""

    route: str
    target: str
    path: str | None
    params: tuple[tuple[str, str], ...]


@attrs.frozen
class Check:
    """One step of a decision: what was checked, whether it passed, and the rule applied."""

    name: str  # "query", "route", "identity", "allow", "target", "path", "params"
    passed: bool
    rule: str


@attrs.frozen
class Decision:
    """The gateway's answer to one request before any upstream is involved."""

    allowed: bool
    status: int
    reason: str
    #: The rule that decided: the allow entry for an allow, the failed check for a refusal.
    rule: str
    body: bytes = b""
    route: Route | None = None
    target: Target | None = None
    #: The exact upstream path policy evaluated: the one sent upstream.
    path: str | None = None
    params: tuple[tuple[str, str], ...] = ()
    #: Every check made, in order; for a refusal the last one is the check that failed.
    checks: tuple[Check, ...] = ()


def refusal(
    status: int,
    reason: str,
    rule: str,
    body: bytes,
    route: Route | None = None,
    checks: tuple[Check, ...] = (),
) -> Decision:
    """A refusal decided by ``rule``; the failed check is appended to ``checks``."""
    return Decision(False, status, reason, rule, body, route, checks=checks)


def _bad_query(rule: str, body: bytes) -> Decision:
    return refusal(400, BAD_REQUEST, rule, body, checks=(Check("query", False, rule),))


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
        return _bad_query("query string: malformed", b"malformed query string\n")
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            return _bad_query(f"query string: {key!r} given twice", b"parameter given twice\n")
        params[key] = value
    route = params.pop("route", None)
    target = params.pop("target", None)
    if not route or not target:
        return _bad_query(
            "query string: route and target are required", b"route and target are required\n"
        )
    path = params.pop("path", None)
    return ScrapeQuery(route, target, path, tuple(params.items()))


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
        #: The configured identities by name (for tools that name the caller).
        self.identities: Mapping[str, Identity] = identities or {}
        self.membership = membership if membership is not None else Membership(routes)

    @property
    def targets(self) -> Mapping[str, Mapping[str, Target]]:
        """Every route's current members by address."""
        return self.membership.current

    def visible_routes(self, identity: Identity) -> list[Route]:
        """The routes ``identity`` may scrape (what ``/sd`` lists for it)."""
        return [r for r in self.routes.values() if authorize(identity, r).allowed]

    def decide(self, recognition: Recognition, query: ScrapeQuery) -> Decision:
        """Allow or refuse one scrape.

        Order, first failure answers: the route exists (404), the caller is recognised
        (403) and allowed by the route (403), the target is in the route (404, the same
        answer as an unknown route), the path is canonical (400) and one of the route's
        paths (403), every further parameter is one the route passes (400).
        """
        checks: list[Check] = []

        def refuse(
            name: str, status: int, reason: str, rule: str, body: bytes, route: Route | None
        ) -> Decision:
            checks.append(Check(name, False, rule))
            return refusal(status, reason, rule, body, route, tuple(checks))

        route = self.routes.get(query.route)
        if route is None:
            return refuse(
                "route", 404, NOT_FOUND, f"routes: no route {query.route!r}", _NOT_FOUND, None
            )
        checks.append(Check("route", True, f"routes.{route.name}"))
        identity = recognition.identity
        if identity is None:
            why = recognition.reason
            if recognition.detail:
                why = f"{why}: {recognition.detail}"
            return refuse(
                "identity",
                403,
                recognition.reason,
                f"identities: caller not recognised ({why})",
                b"forbidden\n",
                route,
            )
        roles = ", ".join(sorted(identity.roles)) or "none"
        checks.append(Check("identity", True, f"identities.{identity.name} (roles: {roles})"))
        verdict = authorize(identity, route)
        if not verdict.allowed:
            return refuse("allow", 403, verdict.reason, verdict.rule, b"forbidden\n", route)
        checks.append(Check("allow", True, verdict.rule))
        target = self.targets.get(route.name, {}).get(query.target)
        if target is None:
            return refuse(
                "target",
                404,
                NOT_FOUND,
                f"routes.{route.name}.targets: {query.target!r} not a member",
                _NOT_FOUND,
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
                    400,
                    PATH_REFUSED,
                    f"path normalisation: {e.reason}",
                    f"path refused: {e.reason}\n".encode(),
                    route,
                )
            if path not in route.paths:
                return refuse(
                    "path",
                    403,
                    PATH_REFUSED,
                    f"routes.{route.name}.paths: {path!r} not listed",
                    b"path not allowed on this route\n",
                    route,
                )
            checks.append(Check("path", True, f"routes.{route.name}.paths: {path!r} is listed"))
        for key, _ in query.params:
            if key not in route.params:
                return refuse(
                    "params",
                    400,
                    PARAM_REFUSED,
                    f"routes.{route.name}.params: {key!r} not listed",
                    b"query parameter not allowed on this route\n",
                    route,
                )
        if query.params:
            names = ", ".join(repr(k) for k, _ in query.params)
            checks.append(Check("params", True, f"routes.{route.name}.params: {names} listed"))
        else:
            checks.append(Check("params", True, "no further parameters"))
        return Decision(
            True,
            200,
            OK,
            verdict.rule,
            b"",
            route,
            target,
            path,
            query.params,
            tuple(checks),
        )
