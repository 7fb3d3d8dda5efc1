"""The questions ``promgate explain`` and ``promgate test-policy`` ask: what one listener
would decide for one request, from the same policy objects the gateway asks.

What a request is depends on the listener's kind:

- ``http``: ``https://HOST/scrape?...`` or ``/scrape?...`` (the host is ignored), or ``/sd``;
- ``forward``: an absolute ``http://HOST:PORT/PATH`` URL, or ``CONNECT HOST:PORT``;
- ``tcp``: the server name (SNI) the client asks for, or nothing (``""``).
"""

from __future__ import annotations

from typing import Protocol, TextIO
from urllib.parse import urlencode, urlsplit

import attrs

from promgate.config.model import Config, Identity, Limits, Listener, Route
from promgate.http.refusals import decision_status
from promgate.http.targets import parse_absolute_form, parse_authority_form
from promgate.http.wire import HTTPError
from promgate.identity import Recognition
from promgate.policy import (
    NOT_FOUND,
    OK,
    ConnectionPolicy,
    Decision,
    ForwardPolicy,
    Refusal,
    ScrapePolicy,
    allowed,
    parse_query,
    parse_scrape_query,
    refused,
)


class UnusableInputError(Exception):
    """The question cannot be asked: say why and exit 2."""


@attrs.frozen
class Answer:
    """What the gateway would answer one request (before limits and audit health)."""

    decision: Decision
    #: The HTTP status; None on a ``tcp`` listener (it only relays or closes).
    status: int | None
    #: For ``/sd``: the routes listed for the caller.
    sd_routes: tuple[Route, ...] | None = None


class Question(Protocol):
    """One listener, ready to be asked."""

    @property
    def listener(self) -> Listener: ...

    def check(self, request: str) -> None:
        """Raise UnusableInputError if ``request`` is not one this listener receives."""

    def ask(self, identity: Identity, request: str) -> Answer: ...


def split_url(url: str) -> tuple[str, str]:
    """The path and query of ``https://host/scrape?...`` or ``/scrape?...``."""
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise UnusableInputError(f"URL {url!r}: {e}") from None
    if parts.scheme not in ("", "http", "https"):
        raise UnusableInputError(f"URL {url!r}: give https://HOST/scrape?... or /scrape?...")
    if not parts.scheme and not url.startswith("/"):
        raise UnusableInputError(f"URL {url!r}: give https://HOST/scrape?... or /scrape?...")
    return parts.path, parts.query


def _http_answer(decision: Decision, sd_routes: tuple[Route, ...] | None = None) -> Answer:
    return Answer(decision, decision_status(decision), sd_routes)


@attrs.frozen
class ScrapeQuestion:
    """``/scrape`` and ``/sd`` on an ``http`` listener."""

    listener: Listener
    policy: ScrapePolicy

    def check(self, request: str) -> None:
        split_url(request)

    def ask(self, identity: Identity, request: str) -> Answer:
        path, query = split_url(request)
        if path == "/scrape":
            parsed = parse_scrape_query(query.encode("utf-8"))
            if isinstance(parsed, Decision):
                return _http_answer(parsed)
            return _http_answer(self.policy.decide(Recognition(identity, OK), parsed))
        if path == "/sd":
            routes = tuple(self.policy.visible_routes(identity))
            rule = f"/sd lists the routes whose allow admits identities.{identity.name}"
            return _http_answer(allowed(rule), routes)
        rule = f"listener: {path!r} is neither /scrape nor /sd"
        return _http_answer(refused(Refusal.UNKNOWN, NOT_FOUND, "path", rule))


@attrs.frozen
class ForwardQuestion:
    """Absolute-form requests and CONNECT on a ``forward`` listener."""

    listener: Listener
    policy: ForwardPolicy

    def check(self, request: str) -> None:
        self._parse(request)

    def _parse(self, request: str) -> tuple[str, str | None]:
        """("CONNECT", address) or ("GET", url)."""
        method, _, rest = request.partition(" ")
        if method.upper() == "CONNECT" and rest.strip():
            return "CONNECT", rest.strip()
        if request.startswith("http://"):
            return "GET", request
        raise UnusableInputError(
            f"request {request!r}: give http://HOST:PORT/PATH or CONNECT HOST:PORT"
        )

    def ask(self, identity: Identity, request: str) -> Answer:
        method, text = self._parse(request)
        recognition = Recognition(identity, OK)
        assert text is not None
        try:
            if method == "CONNECT":
                address = parse_authority_form(text.encode("ascii", "replace"))
                return _http_answer(self.policy.decide_connect(recognition, address))
            form = parse_absolute_form(text.encode("ascii", "replace"))
        except HTTPError as e:
            return Answer(refused(Refusal.MALFORMED, e.reason, "request", e.message), e.status)
        params = parse_query(form.query)
        if isinstance(params, Decision):
            return _http_answer(params)
        return _http_answer(
            self.policy.decide_request(recognition, form.address, form.path, params)
        )


@attrs.frozen
class ConnectionQuestion:
    """One connection to a ``tcp`` listener, by the server name it asks for."""

    listener: Listener
    policy: ConnectionPolicy
    passthrough: bool

    def check(self, request: str) -> None:
        if " " in request.strip() or "/" in request:
            raise UnusableInputError(f"{request!r}: give a server name (SNI), or nothing")

    def ask(self, identity: Identity, request: str) -> Answer:
        name = request.strip() or None
        recognition = None if self.passthrough else Recognition(identity, OK)
        return Answer(self.policy.decide(recognition, name), None)


def question(config: Config, listener: str | None) -> Question:
    """The listener named ``listener`` (default: the first ``http`` one), ready to be asked;
    it sees only the routes it serves."""
    by_name = {li.name: li for li in config.listeners}
    if listener is None:
        http = [li.name for li in config.listeners if li.protocol == "http"]
        if not http:
            raise UnusableInputError("the configuration has no http listener; give --listener")
        listener = http[0]
    found = by_name.get(listener)
    if found is None:
        known = ", ".join(by_name) or "none"
        raise UnusableInputError(f"no listener {listener!r} (listeners: {known})")
    routes = config.routes_of(found.name)
    if found.protocol == "forward":
        return ForwardQuestion(found, ForwardPolicy(routes))
    if found.protocol == "tcp":
        assert found.tcp is not None
        passthrough = found.tcp.mode == "passthrough"
        return ConnectionQuestion(found, ConnectionPolicy(found.tcp, routes), passthrough)
    return ScrapeQuestion(found, ScrapePolicy(routes, config.identities))


def describe_limits(limits: Limits) -> str:
    """A route's limits in one line, as configured."""
    rate = f"{limits.rate:g}/s" if limits.rate is not None else "unlimited"
    concurrent = limits.max_concurrent if limits.max_concurrent is not None else "unlimited"
    return f"rate {rate}, burst {limits.burst}, per {limits.per}, max_concurrent {concurrent}"


def verdict_line(answer: Answer) -> str:
    """``allow 200 ok`` / ``deny 403 authz_denied``; ``deny authz_denied`` on tcp."""
    decision = answer.decision
    words = ["allow" if decision.allowed else "deny"]
    if answer.status is not None:
        words.append(str(answer.status))
    words.append(decision.reason)
    return " ".join(words)


def render(answer: Answer, identity: Identity, out: TextIO, passthrough: bool = False) -> None:
    """Print the decision, every check made, and what would apply next."""
    decision = answer.decision
    print(verdict_line(answer), file=out)
    print(f"rule: {decision.rule}", file=out)
    for check in decision.checks:
        print(f"  {check.name:<9} {'pass' if check.passed else 'FAIL'}  {check.rule}", file=out)
    if passthrough:
        print(
            "  (passthrough: the connection carries no identity; only sni: entries apply)",
            file=out,
        )
    if answer.sd_routes is not None:
        if not answer.sd_routes:
            print("  no routes: /sd returns an empty list", file=out)
        for listed in sorted(answer.sd_routes, key=lambda r: r.name):
            rule = ScrapePolicy({listed.name: listed}).rules[listed].authorize(identity).rule
            print(f"  route {listed.name} ({rule}): {len(listed.targets)} target(s)", file=out)
            for member in listed.targets:
                print(f"    {member.address}", file=out)
        return
    route, target = decision.route, decision.target
    if decision.allowed and route is not None and target is not None:
        if answer.status is None or decision.path is None:
            print(f"upstream: {route.scheme}://{target.address}", file=out)
        else:
            upstream = f"{route.scheme}://{target.address}{decision.path}"
            if decision.params:
                upstream += "?" + urlencode(decision.params)
            print(f"upstream: GET {upstream}", file=out)
        print(f"limits: routes.{route.name}.limits: {describe_limits(route.limits)}", file=out)
        print(
            "not evaluated here: the limiter's current state (429) and the audit log's "
            "health (503)",
            file=out,
        )


__all__ = [
    "Answer",
    "ConnectionQuestion",
    "ForwardQuestion",
    "Question",
    "ScrapeQuestion",
    "UnusableInputError",
    "question",
    "render",
    "split_url",
    "verdict_line",
]
