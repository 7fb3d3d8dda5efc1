"""Authorisation for all three listener kinds: may this caller reach this route, target
and path? Deny by default.

Each policy is a pure function of the configuration, the recognised caller and what was
asked: ``ScrapePolicy`` for ``/scrape`` and ``/sd``, ``ForwardPolicy`` for absolute-form
requests and CONNECT, ``ConnectionPolicy`` for ``tcp`` connections. The gateway and the
``promgate explain`` and ``promgate test-policy`` commands all ask them, so what the
commands print is what the gateway does. Decisions carry no wire format: each listener
turns a ``Refusal`` into its own answer.
"""

from promgate.policy.connection import ConnectionPolicy, match_server_name
from promgate.policy.decision import (
    AUTHZ_DENIED,
    BAD_REQUEST,
    NOT_FOUND,
    OK,
    PARAM_REFUSED,
    PATH_REFUSED,
    POLICY_REASONS,
    Check,
    Decision,
    Refusal,
    Verdict,
    allowed,
    refused,
)
from promgate.policy.forward import ForwardPolicy, needs_credentials, parse_query
from promgate.policy.membership import Membership
from promgate.policy.rules import RouteRules, Rules, authorize, sni_pattern_matches
from promgate.policy.scrape import ScrapePolicy, ScrapeQuery, parse_scrape_query

__all__ = [
    "AUTHZ_DENIED",
    "BAD_REQUEST",
    "NOT_FOUND",
    "OK",
    "PARAM_REFUSED",
    "PATH_REFUSED",
    "POLICY_REASONS",
    "Check",
    "ConnectionPolicy",
    "Decision",
    "ForwardPolicy",
    "Membership",
    "Refusal",
    "RouteRules",
    "Rules",
    "ScrapePolicy",
    "ScrapeQuery",
    "Verdict",
    "allowed",
    "authorize",
    "match_server_name",
    "needs_credentials",
    "parse_query",
    "parse_scrape_query",
    "refused",
    "sni_pattern_matches",
]
