"""Forward-proxy policy: which route, if any, lets a caller reach ``host:port``.

Absolute-form requests (``GET http://HOST:PORT/PATH``) may reach targets of ``http``
routes, CONNECT tunnels targets of ``https`` routes (a tunnel to a plain-text target would
bypass the route's path policy). Target addresses are compared with the configured
``host:port`` strings (canonical: names in lower case, IPv6 compressed), never with what a
name resolves to. When several routes qualify, the first by name that allows the request
is used. Every refusal by policy is the same ``forbidden`` to the caller: which of
target, route, caller or path was wrong is in the audit record.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl

from promgate.addresses import canonical_address
from promgate.authn import REFUSED_AT_THE_DOOR
from promgate.config.model import Route, Target
from promgate.identity import Recognition
from promgate.paths import PathRefused, normalize_path
from promgate.policy.decision import (
    AUTHZ_DENIED,
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

#: The kind of refusal for a caller not recognised, by the status the door would give.
_DOOR = {429: Refusal.THROTTLED, 503: Refusal.OVERLOADED}


def parse_query(query: bytes) -> tuple[tuple[str, str], ...] | Decision:
    """The parameters of an absolute-form URL, decoded once, or the refusal of them."""
    if not query:
        return ()
    try:
        pairs = parse_qsl(
            query.decode("ascii"), keep_blank_values=True, max_num_fields=32, errors="strict"
        )
    except (UnicodeDecodeError, ValueError):
        return refused(Refusal.MALFORMED, BAD_REQUEST, "query", "query string: malformed")
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            rule = f"query string: {key!r} given twice"
            return refused(Refusal.MALFORMED, BAD_REQUEST, "query", rule)
        seen.add(key)
    return tuple(pairs)


def needs_credentials(recognition: Recognition) -> bool:
    """Would other ``Proxy-Authorization`` help? (Missing, or not verified: a 407.)"""
    return recognition.identity is None and REFUSED_AT_THE_DOOR.get(recognition.reason) == 401


class ForwardPolicy:
    """Which route, if any, lets a caller reach ``host:port`` through the forward proxy."""

    def __init__(
        self,
        routes: Mapping[str, Route],
        *,
        challenge: bool = True,
        membership: Membership | None = None,
    ) -> None:
        #: Ask for credentials (rather than forbid) a caller without verified ones; only
        #: when some identity has a bearer token or basic-auth user to offer.
        self.challenge = challenge
        self.routes = routes
        self.rules = Rules(routes.values())
        #: The routes' current members (discovery swaps them); static targets if None.
        self.membership = membership if membership is not None else Membership(routes)
        self._indexed: Mapping[str, Mapping[str, Target]] | None = None
        self._by_address: dict[str, list[tuple[Route, Target]]] = {}

    def _index(self) -> dict[str, list[tuple[Route, Target]]]:
        """Routes by canonical target address, rebuilt once each time membership changes."""
        current = self.membership.current
        if current is not self._indexed:
            by_address: dict[str, list[tuple[Route, Target]]] = {}
            for name in sorted(self.routes):
                route = self.routes[name]
                for target in current.get(name, {}).values():
                    address = canonical_address(target.address)
                    if address is not None:
                        by_address.setdefault(address, []).append((route, target))
            self._by_address, self._indexed = by_address, current
        return self._by_address

    def decide_request(
        self,
        recognition: Recognition,
        address: str,
        raw_path: str,
        params: tuple[tuple[str, str], ...],
    ) -> Decision:
        """Allow or refuse one absolute-form GET/HEAD. Order, first failure answers: caller
        recognised, target in an ``http`` route, a route allowing the caller, path
        canonical (malformed), a route among those allowing the path, every parameter one
        that route passes (malformed). Routes are tried in order of name."""
        found = self._allowed_routes(recognition, address, "http")
        if isinstance(found, Decision):
            return found
        candidates, checks = found
        first = candidates[0][0]
        try:
            path = normalize_path(raw_path)
        except PathRefused as e:
            rule = f"path normalisation: {e.reason}"
            return refused(Refusal.MALFORMED, PATH_REFUSED, "path", rule, first, checks)
        for route, target, rule in candidates:  # noqa: B007 (the one that breaks is used)
            if path in route.paths:
                break
        else:
            names = ", ".join(r.name for r, _, _ in candidates)
            why = f"routes {names}: {path!r} not listed in paths"
            return refused(Refusal.FORBIDDEN, PATH_REFUSED, "path", why, first, checks)
        checks += (Check("path", True, f"routes.{route.name}.paths: {path!r} is listed"),)
        for key, _ in params:
            if key not in route.params:
                why = f"routes.{route.name}.params: {key!r} not listed"
                return refused(Refusal.MALFORMED, PARAM_REFUSED, "params", why, route, checks)
        if params:
            checks += (Check("params", True, f"routes.{route.name}.params"),)
        return allowed(rule, route, target, path, params, checks)

    def decide_connect(self, recognition: Recognition, address: str) -> Decision:
        """Allow or refuse one CONNECT: caller recognised, target in an ``https`` route, a
        route allowing the caller. The first such route by name."""
        found = self._allowed_routes(recognition, address, "https")
        if isinstance(found, Decision):
            return found
        candidates, checks = found
        route, target, rule = candidates[0]
        return allowed(rule, route, target, checks=checks)

    def _allowed_routes(
        self, recognition: Recognition, address: str, scheme: str
    ) -> tuple[list[tuple[Route, Target, str]], tuple[Check, ...]] | Decision:
        identity = recognition.identity
        if identity is None:
            why = recognition.reason
            if recognition.detail:
                why = f"{why}: {recognition.detail}"
            rule = f"identities: caller not recognised ({why})"
            if self.challenge and needs_credentials(recognition):
                kind = Refusal.CREDENTIALS
            else:
                door = REFUSED_AT_THE_DOOR.get(recognition.reason)
                kind = _DOOR.get(door, Refusal.FORBIDDEN) if door else Refusal.FORBIDDEN
            return refused(kind, recognition.reason, "identity", rule)
        checks: tuple[Check, ...] = (Check("identity", True, f"identities.{identity.name}"),)
        members = [(r, t) for r, t in self._index().get(address, ()) if r.scheme == scheme]
        if not members:
            rule = f"routes: no {scheme} route has target {address!r}"
            return refused(Refusal.FORBIDDEN, NOT_FOUND, "target", rule, None, checks)
        names = ", ".join(r.name for r, _ in members)
        checks += (Check("target", True, f"routes {names}: {address!r} is a member"),)
        candidates: list[tuple[Route, Target, str]] = []
        for route, target in members:
            verdict = self.rules[route].authorize(identity)
            if verdict.allowed:
                candidates.append((route, target, verdict.rule))
        if not candidates:
            rule = f"routes {names}: allow: default deny"
            return refused(Refusal.FORBIDDEN, AUTHZ_DENIED, "allow", rule, members[0][0], checks)
        return candidates, (*checks, Check("allow", True, candidates[0][2]))


__all__ = ["ForwardPolicy", "needs_credentials", "parse_query"]
