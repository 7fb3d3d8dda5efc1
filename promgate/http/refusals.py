"""What a refusal tells the caller: one short, constant body per status and reason.

A refusal body never carries anything from the request (route names, targets, paths,
header values) nor anything the gateway learned on the way (upstream addresses, expected
TLS identities, OpenSSL's or the resolver's error text): the caller learns what happened,
the audit record's ``detail`` and the log say precisely why.
"""

from __future__ import annotations

from promgate.policy.decision import Decision, Refusal

#: The HTTP status of each kind of policy refusal.
STATUS_OF_REFUSAL: dict[Refusal, int] = {
    Refusal.MALFORMED: 400,
    Refusal.UNKNOWN: 404,
    Refusal.FORBIDDEN: 403,
    Refusal.CREDENTIALS: 407,
    Refusal.THROTTLED: 429,
    Refusal.OVERLOADED: 503,
}

#: The body of a refusal whose reason has no body of its own.
BY_STATUS: dict[int, bytes] = {
    400: b"bad request\n",
    401: b"unauthorized\n",
    403: b"forbidden\n",
    404: b"not found\n",
    405: b"method not allowed\n",
    407: b"proxy authentication required\n",
    408: b"request timeout\n",
    414: b"request line too long\n",
    429: b"too many requests\n",
    431: b"request header fields too large\n",
    500: b"internal error\n",
    502: b"bad gateway\n",
    503: b"service unavailable\n",
    504: b"gateway timeout\n",
    505: b"HTTP version not supported\n",
}

#: Reasons that say more than their status, still without a word of the request.
BY_REASON: dict[tuple[int, str], bytes] = {
    (400, "path_refused"): b"path refused\n",
    (400, "param_refused"): b"query parameter not allowed on this route\n",
    (429, "rate_limited"): b"rate limited\n",
    (429, "concurrency_limited"): b"too many concurrent requests\n",
    (429, "auth_throttled"): b"too many failed logins, try later\n",
    (503, "auth_overloaded"): b"authentication busy, try later\n",
    (503, "audit_unavailable"): b"audit log unavailable\n",
    (503, "limits_unavailable"): b"rate limits unavailable, try later\n",
    (502, "upstream_refused"): b"upstream connection failed\n",
    (502, "upstream_reset"): b"upstream closed the connection\n",
    (502, "upstream_tls_failed"): b"upstream TLS check failed\n",
    (502, "upstream_malformed"): b"malformed upstream response\n",
    (502, "response_too_large"): b"upstream response too large\n",
    (504, "upstream_timeout"): b"upstream timed out\n",
}

#: Every body a refusal can have.
BODIES = frozenset({*BY_STATUS.values(), *BY_REASON.values(), b"refused\n"})


def refusal_body(status: int, reason: str) -> bytes:
    """The body of a refusal with ``status`` and ``reason``: short, constant."""
    body = BY_REASON.get((status, reason))
    if body is None:
        body = BY_STATUS.get(status, b"refused\n")
    return body


def decision_status(decision: Decision) -> int:
    """The status an HTTP listener answers ``decision`` with: 200 when allowed."""
    if decision.refusal is None:
        return 200
    return STATUS_OF_REFUSAL[decision.refusal]


__all__ = [
    "BODIES",
    "BY_REASON",
    "BY_STATUS",
    "STATUS_OF_REFUSAL",
    "decision_status",
    "refusal_body",
]
