"""What a policy decides: allow or refuse, why, by which rule, after which checks.

Decisions are free of wire formats: a refusal says what *kind* of refusal it is
(``Refusal``), and each listener kind turns that into its own answer (an HTTP status and
constant body for ``http`` and ``forward`` listeners, a closed connection for ``tcp``).
"""

from __future__ import annotations

from enum import Enum

import attrs

from promgate.config.model import Route, Target
from promgate.core.reasons import Reason

OK = Reason.OK
BAD_REQUEST = Reason.BAD_REQUEST
NOT_FOUND = Reason.NOT_FOUND
AUTHZ_DENIED = Reason.AUTHZ_DENIED
PATH_REFUSED = Reason.PATH_REFUSED
PARAM_REFUSED = Reason.PARAM_REFUSED
#: Every reason the policies give of their own (recognition reasons come from identity.py).
POLICY_REASONS = frozenset({BAD_REQUEST, NOT_FOUND, AUTHZ_DENIED, PATH_REFUSED, PARAM_REFUSED})


class Refusal(Enum):
    """The kind of a refusal, whatever the wire it is told on."""

    #: The request cannot be judged as sent (malformed query, path that does not normalise).
    MALFORMED = "malformed"
    #: Nothing to reach there: an unknown route, or a target outside it.
    UNKNOWN = "unknown"
    #: Known, and not for this caller (or not this path or parameter).
    FORBIDDEN = "forbidden"
    #: The caller brought no credential that verified, and one would help (a 407).
    CREDENTIALS = "credentials"
    #: Credential checks for this caller are being held back: try again later.
    THROTTLED = "throttled"
    #: Credential checks are overloaded: try again later.
    OVERLOADED = "overloaded"


@attrs.frozen
class Verdict:
    """An authorisation decision and the rule that made it."""

    allowed: bool
    reason: str  # OK or AUTHZ_DENIED
    rule: str  # the allow entry that matched, or "default deny"


@attrs.frozen
class Check:
    """One step of a decision: what was checked, whether it passed, and the rule applied."""

    name: str  # "query", "route", "identity", "allow", "target", "path", "params", ...
    passed: bool
    rule: str


@attrs.frozen
class Decision:
    """A policy's answer to one request or connection before any upstream is involved."""

    allowed: bool
    reason: str
    #: The rule that decided: the allow entry for an allow, the failed check for a refusal.
    rule: str
    #: What kind of refusal; None when allowed.
    refusal: Refusal | None = None
    route: Route | None = None
    target: Target | None = None
    #: The exact upstream path policy evaluated: the one sent upstream.
    path: str | None = None
    params: tuple[tuple[str, str], ...] = ()
    #: Every check made, in order; for a refusal the last one is the check that failed.
    checks: tuple[Check, ...] = ()


def allowed(
    rule: str,
    route: Route | None = None,
    target: Target | None = None,
    path: str | None = None,
    params: tuple[tuple[str, str], ...] = (),
    checks: tuple[Check, ...] = (),
) -> Decision:
    """An allow decided by ``rule``."""
    return Decision(True, OK, rule, None, route, target, path, params, checks)


def refused(
    refusal: Refusal,
    reason: str,
    check: str,
    rule: str,
    route: Route | None = None,
    checks: tuple[Check, ...] = (),
    target: Target | None = None,
) -> Decision:
    """A refusal decided by ``rule`` at the check named ``check`` (appended to ``checks``)."""
    return Decision(
        False, reason, rule, refusal, route, target, checks=(*checks, Check(check, False, rule))
    )


__all__ = [
    "AUTHZ_DENIED",
    "BAD_REQUEST",
    "NOT_FOUND",
    "OK",
    "PARAM_REFUSED",
    "PATH_REFUSED",
    "POLICY_REASONS",
    "Check",
    "Decision",
    "Refusal",
    "Verdict",
    "allowed",
    "refused",
]
