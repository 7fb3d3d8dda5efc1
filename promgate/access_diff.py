"""What a configuration change does to access: every request whose decision it flips.

``access_diff(old, new)`` enumerates, for every listener present in either configuration,
every question that listener could be asked: on ``http`` listeners a ``/scrape`` of each
route target on each of the route's paths, and whether ``/sd`` lists each route; on
``forward`` listeners an absolute-form GET of each ``http`` route target and path, and a
CONNECT to each ``https`` route target; on ``tcp`` listeners a connection for each server
name configured (and one without). Each is asked of every identity (passthrough
connections carry none), decided under both configurations by the policy objects the
gateway asks (built as ``promgate explain`` builds them), and kept when one side allows
and the other refuses. A listener, identity, route or target missing on one side refuses
there, so an added identity with access is newly allowed.

The work stays within identities x requests, and mostly well below: a route (or, on a
forward listener, the routes sharing a target address) equal on both sides is not asked
again for an identity whose roles did not change, since its answers cannot differ; and
identities a route's allow lists treat alike on both sides are asked once, the rest
counted from that one and asked only for the changes listed (``limit`` caps those).
Targets are the static ones, as for ``explain``: discovered members are not known offline.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlencode

import attrs

from promgate.addresses import canonical_address
from promgate.config.model import Config, Identity, Route
from promgate.core.reasons import Reason
from promgate.http.refusals import decision_status
from promgate.identity import Recognition
from promgate.policy import (
    OK,
    Check,
    ConnectionPolicy,
    Decision,
    ForwardPolicy,
    Rules,
    ScrapePolicy,
    ScrapeQuery,
)
from promgate.policy_questions import (
    ConnectionQuestion,
    ForwardQuestion,
    ScrapeQuestion,
    question,
)

#: The kinds of request, in the order changes are listed, and the protocol receiving each.
KINDS = {"scrape": "http", "sd": "http", "get": "forward", "connect": "forward", "tcp": "tcp"}
_ORDER = {kind: i for i, kind in enumerate(KINDS)}

#: The requests whose answers depend on the same routes: ("route", NAME) on http
#: listeners, ("address", HOST:PORT) on forward ones, ("tcp", "") on tcp ones.
Group = tuple[str, str]


@attrs.frozen
class Request:
    """One question a listener could be asked, without the caller."""

    #: ``scrape``, ``sd`` (does /sd list the route), ``get``, ``connect`` or ``tcp``.
    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    route: str | None = None
    #: ``host:port``: as configured for ``scrape``, canonical for ``get`` and ``connect``.
    target: str | None = None
    path: str | None = None
    #: The server name a ``tcp`` connection asks for; ``""`` for none.
    server_name: str | None = None

    def text(self) -> str:
        """The request as ``promgate explain`` takes it on that listener."""
        if self.kind == "scrape":
            query = [("route", self.route or ""), ("target", self.target or "")]
            return "/scrape?" + urlencode([*query, ("path", self.path or "")])
        if self.kind == "sd":
            return "/sd"
        if self.kind == "get":
            return f"http://{self.target}{self.path}"
        if self.kind == "connect":
            return f"CONNECT {self.target}"
        return self.server_name or ""

    def describe(self) -> str:
        """The request in words."""
        if self.kind == "scrape":
            return f"route {self.route} target {self.target} path {self.path}"
        if self.kind == "sd":
            return f"/sd lists route {self.route}"
        if self.kind in ("get", "connect"):
            return ("GET " if self.kind == "get" else "CONNECT ") + self.text().split(" ")[-1]
        if self.server_name:
            return f"connection for server name {self.server_name}"
        return "connection without server name"

    def sort_key(self) -> tuple[int, str, str, str, str]:
        return (
            _ORDER[self.kind],
            self.route or "",
            self.target or "",
            self.path or "",
            self.server_name or "",
        )


@attrs.frozen
class Side:
    """One configuration's decision on a request."""

    allowed: bool
    reason: str
    #: The rule that decided: the allow entry for an allow, the failed check for a refusal.
    rule: str
    #: The HTTP status; None on ``tcp`` listeners, for ``/sd`` (200 either way), and when
    #: the listener does not exist.
    status: int | None = None
    #: The route that decided (on a forward listener, the one the proxy picked).
    route: str | None = None
    #: Every check made, in order; for a refusal the last one failed.
    checks: tuple[Check, ...] = attrs.field(default=(), eq=False, repr=False)

    @property
    def failed(self) -> str | None:
        """The name of the check that refused (None for an allow)."""
        if self.allowed or not self.checks:
            return None
        return self.checks[-1].name

    def passed(self, name: str | None) -> str | None:
        """The rule of the check ``name`` when it passed here."""
        for check in self.checks:
            if check.name == name and check.passed:
                return check.rule
        return None

    def verdict(self) -> str:
        """``allow 200 ok``, ``deny 403 authz_denied``, ``deny not_found``."""
        words = ["allow" if self.allowed else "deny"]
        if self.status is not None:
            words.append(str(self.status))
        words.append(self.reason)
        return " ".join(words)

    def to_json(self) -> dict[str, Any]:
        return {
            "decision": "allow" if self.allowed else "deny",
            "status": self.status,
            "reason": self.reason,
            "rule": self.rule,
            "route": self.route,
            "checks": [{"check": c.name, "passed": c.passed, "rule": c.rule} for c in self.checks],
        }


@attrs.frozen
class Change:
    """A request one configuration allows and the other refuses."""

    listener: str
    #: The caller; None for a passthrough ``tcp`` listener's connections, which carry none.
    identity: str | None
    request: Request
    old: Side
    new: Side

    @property
    def granted(self) -> bool:
        """Newly allowed (else newly denied)."""
        return self.new.allowed

    def why(self, side: Side) -> str:
        """The rule deciding ``side``; for the allowing side, also the check there that
        the refusing side failed, when that is not the allow list itself."""
        other = self.new if side is self.old else self.old
        failed = other.failed
        if side.allowed and failed not in (None, "allow"):
            passed = side.passed(failed)
            if passed is not None and passed != side.rule:
                return f"{side.rule}; {failed}: {passed}"
        return side.rule

    def describe(self) -> str:
        """One line: ``+`` newly allowed, ``-`` newly denied, and the rule deciding each."""
        sign = "+" if self.granted else "-"
        caller = self.identity if self.identity is not None else "(no identity)"
        return (
            f"{sign} {self.listener} {caller} {self.request.describe()}: "
            f"{self.why(self.old)} -> {self.why(self.new)}"
        )

    def sort_key(self) -> tuple[Any, ...]:
        return (self.listener, self.identity or "", self.request.sort_key())

    def to_json(self) -> dict[str, Any]:
        request = self.request
        return {
            "change": "granted" if self.granted else "revoked",
            "listener": self.listener,
            "identity": self.identity,
            "kind": request.kind,
            "route": request.route,
            "target": request.target,
            "path": request.path,
            "server_name": request.server_name,
            "request": request.text(),
            "old": self.old.to_json(),
            "new": self.new.to_json(),
        }


@attrs.frozen
class AccessDiff:
    """Every change of access between two configurations (or the first of them, and
    the counts of all)."""

    #: Sorted by listener, identity, kind of request, route, target, path, server name;
    #: only the first ones when ``access_diff`` was given a limit.
    changes: tuple[Change, ...]
    #: How many requests are newly allowed and newly denied, listed or not.
    granted: int
    revoked: int
    #: How many (listener, identity, request) entries were compared, changed or not.
    compared: int
    #: The listeners compared: those of either configuration, by name.
    listeners: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return self.granted + self.revoked > 0

    @property
    def total(self) -> int:
        """How many changes there are, listed or not."""
        return self.granted + self.revoked

    def summary(self, limit: int = 10) -> dict[str, Any]:
        """Counts and the first ``limit`` changes as one line each (for a reload record)."""
        shown = self.changes[: max(limit, 0)]
        return {
            "granted": self.granted,
            "revoked": self.revoked,
            "compared": self.compared,
            "changes": [c.describe() for c in shown],
            "more": self.total - len(shown),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "changed": self.changed,
            "granted": self.granted,
            "revoked": self.revoked,
            "compared": self.compared,
            "listeners": list(self.listeners),
            "changes": [c.to_json() for c in self.changes],
        }


def _side(decision: Decision, http: bool) -> Side:
    route = decision.route.name if decision.route is not None else None
    status = decision_status(decision) if http else None
    return Side(decision.allowed, decision.reason, decision.rule, status, route, decision.checks)


class _View:
    """One configuration's listener, ready to be asked every kind of request."""

    def __init__(self, config: Config, name: str) -> None:
        self.config = config
        self.name = name
        self.asked = question(config, name)
        self.protocol = self.asked.listener.protocol
        tcp = self.asked.listener.tcp
        self.passthrough = tcp is not None and tcp.mode == "passthrough"
        self.routes: Mapping[str, Route] = config.routes_of(name)
        asked = self.asked
        assert isinstance(asked, (ScrapeQuestion, ForwardQuestion, ConnectionQuestion))
        #: The allow lists as the listener's policy parsed them.
        self.rules: Rules = asked.policy.rules
        self._visible: dict[str, frozenset[str]] = {}
        self._by_address: dict[str, tuple[str, ...]] | None = None
        self._admits: dict[tuple[str, str], bool] = {}

    def requests(self) -> Iterator[tuple[Group, Request]]:
        """(group, request) for every request this listener could be asked; a group's
        answers depend only on the routes the group names."""
        if self.protocol == "http":
            for name, route in self.routes.items():
                yield ("route", name), Request("sd", route=name)
                for target in route.targets:
                    for path in route.paths:
                        yield ("route", name), Request("scrape", name, target.address, path)
        elif self.protocol == "forward":
            for route in self.routes.values():
                for target in route.targets:
                    address = canonical_address(target.address)
                    if address is None:
                        continue
                    if route.scheme == "https":
                        yield ("address", address), Request("connect", target=address)
                        continue
                    for path in route.paths:
                        yield ("address", address), Request("get", target=address, path=path)
        else:
            tcp = self.asked.listener.tcp
            assert tcp is not None
            yield ("tcp", ""), Request("tcp", server_name="")
            for server_name in tcp.sni if tcp.destination is None else ():
                yield ("tcp", ""), Request("tcp", server_name=server_name)

    def by_address(self) -> dict[str, tuple[str, ...]]:
        """The routes naming each canonical target address (what a forward request meets)."""
        if self._by_address is not None:
            return self._by_address
        found: dict[str, set[str]] = {}
        for name, route in self.routes.items():
            for target in route.targets:
                address = canonical_address(target.address)
                if address is not None:
                    found.setdefault(address, set()).add(name)
        self._by_address = {address: tuple(sorted(names)) for address, names in found.items()}
        return self._by_address

    def reach(self, caller: str | None, group: Group) -> tuple[bool, ...] | None:
        """Whether each route the requests of ``group`` meet admits ``caller``, which
        (with the request) decides every answer there; None when every answer is a
        refusal (no such caller, route or listener kind, or no route admits it)."""
        kind, key = group
        if kind != {"http": "route", "forward": "address"}.get(self.protocol):
            return None
        identity = self.config.identities.get(caller) if caller is not None else None
        if identity is None:
            return None
        names = (key,) if kind == "route" else self.by_address().get(key, ())
        bits = []
        for name in names:
            route = self.routes.get(name)
            cached = self._admits.get((name, identity.name))
            if cached is None and route is not None:
                cached = self.rules[route].authorize(identity).allowed
                self._admits[(name, identity.name)] = cached
            bits.append(bool(cached))
        return tuple(bits) if any(bits) else None

    def decide(self, identity_name: str | None, request: Request) -> Side:
        """This listener's answer to ``request`` from ``identity_name``."""
        http = self.protocol != "tcp"
        if KINDS[request.kind] != self.protocol:
            rule = f"listeners.{self.name}: a {self.protocol} listener takes no such request"
            return Side(False, Reason.NOT_FOUND, rule)
        identity = None
        if identity_name is not None:
            identity = self.config.identities.get(identity_name)
        if identity is None and not self.passthrough:
            rule = f"identities: no identity {identity_name!r}"
            return Side(False, Reason.UNKNOWN_IDENTITY, rule, 403 if http else None)
        asked = self.asked
        if isinstance(asked, ConnectionQuestion):
            policy: ConnectionPolicy = asked.policy
            recognition = None if self.passthrough else Recognition(identity, OK)
            return _side(policy.decide(recognition, request.server_name or None), False)
        assert identity is not None
        recognition = Recognition(identity, OK)
        if isinstance(asked, ForwardQuestion):
            forward: ForwardPolicy = asked.policy
            address = request.target or ""
            if request.kind == "connect":
                return _side(forward.decide_connect(recognition, address), True)
            return _side(forward.decide_request(recognition, address, request.path or "", ()), True)
        assert isinstance(asked, ScrapeQuestion)
        scrape: ScrapePolicy = asked.policy
        route_name = request.route or ""
        if request.kind == "sd":
            return self._listed(scrape, identity, route_name)
        query = ScrapeQuery(route_name, request.target or "", request.path, ())
        return _side(scrape.decide(recognition, query), True)

    def _listed(self, policy: ScrapePolicy, identity: Identity, route_name: str) -> Side:
        """Whether ``/sd`` lists the route to ``identity``, and the rule that says so."""
        visible = self._visible.get(identity.name)
        if visible is None:
            visible = frozenset(r.name for r in policy.visible_routes(identity))
            self._visible[identity.name] = visible
        route = policy.routes.get(route_name)
        if route is None:
            return Side(False, Reason.NOT_FOUND, f"routes: no route {route_name!r}")
        verdict = policy.rules[route].authorize(identity)
        listed = route_name in visible
        return Side(listed, Reason.OK if listed else verdict.reason, verdict.rule, None, route_name)


def _missing(listener: str) -> Side:
    return Side(False, Reason.NOT_FOUND, f"listeners: no listener {listener!r}")


def _names(*groups: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({name for group in groups for name in group}))


#: Callers whose answers in a group are bound to agree, and the callers counted as
#: compared without asking (they cannot change there).
_Partition = tuple[dict[Hashable, list[str | None]], int]


class _Comparison:
    """The state of one comparison: what is equal on both sides, computed once."""

    def __init__(self, old: Config, new: Config) -> None:
        self.old, self.new = old, new
        self.same_routes = frozenset(
            name for name, r in old.routes.items() if new.routes.get(name) == r
        )
        self.identities = _names(old.identities, new.identities)
        self.same_identities = frozenset(
            name
            for name in self.identities
            if name in old.identities
            and name in new.identities
            and old.identities[name].roles == new.identities[name].roles
        )
        self.compared = 0
        self.granted = 0
        self.revoked = 0

    def view(self, config: Config, name: str) -> _View | None:
        if all(li.name != name for li in config.listeners):
            return None
        return _View(config, name)

    def listener(self, name: str, limit: int | None) -> list[Change]:
        """Compare every request of listener ``name`` for every caller; count the
        changes and return the first ``limit`` (all if None) in order.

        Callers are put in classes per group: those whose route-level verdicts agree on
        each side get the same allow or refuse for every request of the group. One of a
        class is asked every request; the others change exactly where it changed, so they
        are counted from it and asked only for the changes to be listed. A class refused
        everything on both sides is not asked at all.
        """
        old, new = self.view(self.old, name), self.view(self.new, name)
        views = [v for v in (old, new) if v is not None]
        groups: dict[Group, dict[Request, None]] = {}
        for view in views:
            for group, request in view.requests():
                groups.setdefault(group, {})[request] = None
        callers: tuple[str | None, ...] = self.identities
        if all(v.passthrough for v in views):
            callers = (None,)
        partitions: dict[Hashable, _Partition] = {}
        asked: dict[tuple[str | None, Request], Change] = {}
        flipped_for: dict[str | None, list[list[Request]]] = {}
        for group, requests in groups.items():
            key = self._partition_key(old, new, group)
            found = partitions.get(key)
            if found is None:
                found = partitions[key] = self._partition(old, new, group, callers)
            classes, skipped = found
            self.compared += skipped * len(requests)
            for members in classes.values():
                self.compared += len(members) * len(requests)
                flipped = []
                for change in self._ask(name, old, new, members[0], requests):
                    asked[(members[0], change.request)] = change
                    flipped.append(change.request)
                    if change.granted:
                        self.granted += len(members)
                    else:
                        self.revoked += len(members)
                if flipped:
                    for caller in members:
                        flipped_for.setdefault(caller, []).append(flipped)
        listed: list[Change] = []
        for caller in sorted(flipped_for, key=lambda c: c or ""):
            pending = sorted(
                (r for block in flipped_for[caller] for r in block), key=Request.sort_key
            )
            if limit is not None:
                pending = pending[: limit - len(listed)]
            for request in pending:
                known = asked.get((caller, request))
                if known is not None:
                    listed.append(known)
                else:
                    listed.extend(self._ask(name, old, new, caller, (request,)))
            if limit is not None and len(listed) >= limit:
                break
        return listed

    def _ask(
        self,
        name: str,
        old: _View | None,
        new: _View | None,
        caller: str | None,
        requests: Iterable[Request],
    ) -> Iterator[Change]:
        """Decide ``requests`` for ``caller`` on both sides; the changes."""
        for request in requests:
            before = old.decide(caller, request) if old else _missing(name)
            after = new.decide(caller, request) if new else _missing(name)
            if before.allowed != after.allowed:
                yield Change(name, caller, request, before, after)

    def _partition_key(self, old: _View | None, new: _View | None, group: Group) -> Hashable:
        """Groups with equal keys get the same partition of callers."""
        kind, key = group
        if kind == "address":
            return (kind, _met(old, key), _met(new, key))
        return group

    def _partition(
        self,
        old: _View | None,
        new: _View | None,
        group: Group,
        callers: tuple[str | None, ...],
    ) -> _Partition:
        if group[0] == "tcp":  # few requests: every caller on its own
            return {caller: [caller] for caller in callers}, 0
        stable = self._stable(old, new, group)
        classes: dict[Hashable, list[str | None]] = {}
        skipped = 0
        for caller in callers:
            if stable and caller in self.same_identities:
                skipped += 1
                continue
            before = old.reach(caller, group) if old else None
            after = new.reach(caller, group) if new else None
            if before is None and after is None:  # refused everything on both sides
                skipped += 1
                continue
            classes.setdefault((before, after), []).append(caller)
        return classes, skipped

    def _stable(self, old: _View | None, new: _View | None, group: Group) -> bool:
        """Can no request of ``group`` be answered differently (for an unchanged caller)?"""
        if old is None or new is None or old.protocol != new.protocol:
            return False
        kind, key = group
        if kind == "route":
            return key in old.routes and key in new.routes and key in self.same_routes
        if kind == "address":
            names = _met(old, key)
            return (
                bool(names)
                and names == _met(new, key)
                and all(n in self.same_routes for n in names)
            )
        return False


def _met(view: _View | None, address: str) -> tuple[str, ...]:
    """The routes a forward request to ``address`` meets on ``view``."""
    if view is None or view.protocol != "forward":
        return ()
    return view.by_address().get(address, ())


def access_diff(old: Config, new: Config, limit: int | None = None) -> AccessDiff:
    """Every request whose decision differs between ``old`` and ``new``: all of them
    counted, the first ``limit`` (all if None) listed with both sides' decisions.

    The work is proportional to the requests of what changed, times the classes of
    callers treated alike there, plus the changes listed: give a limit when only a
    summary is wanted.
    """
    comparison = _Comparison(old, new)
    listeners = _names((li.name for li in old.listeners), (li.name for li in new.listeners))
    changes: list[Change] = []
    for name in listeners:
        left = None if limit is None else max(limit - len(changes), 0)
        changes.extend(comparison.listener(name, left))
    return AccessDiff(
        tuple(changes), comparison.granted, comparison.revoked, comparison.compared, listeners
    )


__all__ = ["AccessDiff", "Change", "Request", "Side", "access_diff"]
