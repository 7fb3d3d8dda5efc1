"""Admission: the route's limits, then the audit log's health, for every request or
connection that policy allowed; what is admitted holds a ``Ticket`` until it ends.

The limits of this process answer at once. With ``shared_limits``, a route that has
limits is asked of Redis instead, and the answer is a Deferred (the listeners wait for it
in a state of their own); a route without limits is still admitted at once.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred

from promgate.audit import IAuditSink
from promgate.config.model import Limits
from promgate.core.reasons import Reason
from promgate.metrics import Metrics
from promgate.ratelimit import Admission, Holder, IRateLimiter, SharedAdmission

#: The refusal of an admission while ``on_failure: deny`` and the audit log cannot be written.
AUDIT_UNAVAILABLE = Admission(allowed=False, reason=Reason.AUDIT_UNAVAILABLE, retry_after=0.0)


class Ticket:
    """A route's place among its ``max_concurrent`` held by one admitted request or
    connection; released exactly once, however many of its endings call ``release``."""

    __slots__ = ("_held", "_limiter", "route")

    def __init__(self, limiter: Holder, route: str) -> None:
        self._limiter = limiter
        self._held = True
        self.route = route

    @property
    def held(self) -> bool:
        return self._held

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limiter.release(self.route)


@attrs.frozen
class Admitter:
    """Admits past the limits of a route, then the audit log's health (``deny_unaudited``
    when ``audit.on_failure`` is ``deny``); counts what the limits refused. ``shared``,
    when given, holds the limits of every route that has some."""

    limiter: IRateLimiter
    audit: IAuditSink
    metrics: Metrics
    deny_unaudited: bool
    shared: SharedAdmission | None = None

    def admit(
        self, route: str, limits: Limits, identity: str, target: str
    ) -> Ticket | Admission | Deferred[Ticket | Admission]:
        """A ticket, or the refusal (``rate_limited``, ``concurrency_limited``,
        ``audit_unavailable``, ``limits_unavailable``) with its retry delay; or, when
        the limits are shared, a Deferred of one of these (it never fails)."""
        shared = self.shared
        if shared is not None and (limits.rate is not None or limits.max_concurrent is not None):
            return shared.admit(route, limits, identity, target).addCallback(
                self._shared_answer, route
            )
        admission = self.limiter.admit(route, limits, identity, target)
        if not admission.allowed:
            self.metrics.rate_limited.labels(route, admission.reason).inc()
            return admission
        if self.deny_unaudited and not self.audit.healthy:
            self.limiter.release(route)
            return AUDIT_UNAVAILABLE
        return Ticket(self.limiter, route)

    def _shared_answer(self, answer: Admission | Holder, route: str) -> Ticket | Admission:
        if isinstance(answer, Admission):
            self.metrics.rate_limited.labels(route, answer.reason).inc()
            return answer
        if self.deny_unaudited and not self.audit.healthy:
            answer.release(route)
            return AUDIT_UNAVAILABLE
        return Ticket(answer, route)


__all__ = ["AUDIT_UNAVAILABLE", "Admitter", "Ticket"]
