"""Admission: the route's limits, then the audit log's health, for every request or
connection that policy allowed; what is admitted holds a ``Ticket`` until it ends."""

from __future__ import annotations

import attrs

from promgate.audit import IAuditSink
from promgate.config.model import Limits
from promgate.core.reasons import Reason
from promgate.metrics import Metrics
from promgate.ratelimit import Admission, IRateLimiter

#: The refusal of an admission while ``on_failure: deny`` and the audit log cannot be written.
AUDIT_UNAVAILABLE = Admission(allowed=False, reason=Reason.AUDIT_UNAVAILABLE, retry_after=0.0)


class Ticket:
    """A route's place among its ``max_concurrent`` held by one admitted request or
    connection; released exactly once, however many of its endings call ``release``."""

    __slots__ = ("_held", "_limiter", "route")

    def __init__(self, limiter: IRateLimiter, route: str) -> None:
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
    when ``audit.on_failure`` is ``deny``); counts what the limits refused."""

    limiter: IRateLimiter
    audit: IAuditSink
    metrics: Metrics
    deny_unaudited: bool

    def admit(self, route: str, limits: Limits, identity: str, target: str) -> Ticket | Admission:
        """A ticket, or the refusal (``rate_limited``, ``concurrency_limited``,
        ``audit_unavailable``) with its retry delay."""
        admission = self.limiter.admit(route, limits, identity, target)
        if not admission.allowed:
            self.metrics.rate_limited.labels(route, admission.reason).inc()
            return admission
        if self.deny_unaudited and not self.audit.healthy:
            self.limiter.release(route)
            return AUDIT_UNAVAILABLE
        return Ticket(self.limiter, route)


__all__ = ["AUDIT_UNAVAILABLE", "Admitter", "Ticket"]
