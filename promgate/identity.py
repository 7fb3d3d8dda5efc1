"""Recognise callers: map a verified client certificate to a configured identity.

Header credentials (bearer tokens, basic auth) are checked in ``promgate.authn``, which
combines them with what the certificate said; JWT bearer tokens of identity providers in
``promgate.jwt_authn``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from promgate.config.model import CertMatch, Identity
from promgate.spiffe import is_spiffe, spiffe_id_error
from promgate.tls import PeerCertificate

#: How much of a refused URI SAN the audit record's ``detail`` quotes.
_QUOTED = 200


def uri_matches(pattern: str, uri: str) -> bool:
    """Match a URI SAN: exact, or ``*`` standing for exactly one non-empty path segment.

    A ``spiffe:`` URI that is not a valid SPIFFE ID (a ``..`` segment, percent-encoding, a
    query...) matches nothing, whatever the pattern.
    """
    if is_spiffe(uri) and spiffe_id_error(uri) is not None:
        return False
    if "*" not in pattern:
        return pattern == uri
    want = pattern.split("/")
    have = uri.split("/")
    if len(want) != len(have):
        return False
    return all(w == h or (w == "*" and h != "") for w, h in zip(want, have, strict=True))


def cert_matches(match: CertMatch, peer: PeerCertificate) -> bool:
    """Does one configured certificate rule accept this peer?"""
    if match.cn is not None:
        return match.cn in peer.cn
    if match.dns is not None:
        wanted = match.dns.lower().rstrip(".")
        return any(d.lower().rstrip(".") == wanted for d in peer.dns)
    if match.uri is not None:
        return any(uri_matches(match.uri, u) for u in peer.uris)
    if match.spki_sha256 is not None:
        return match.spki_sha256 == peer.spki_sha256
    return False


def invalid_spiffe_uri(peer: PeerCertificate) -> str | None:
    """Why the certificate's ``spiffe:`` URI SAN is not a valid SPIFFE ID, if it is not.

    Such a certificate names no identity at all, not even by its CN or DNS name: whoever
    issued it made something the SPIFFE specification forbids.
    """
    for uri in peer.uris:
        if is_spiffe(uri):
            error = spiffe_id_error(uri)
            if error is not None:
                quoted = uri if len(uri) <= _QUOTED else uri[:_QUOTED] + "..."
                return f"URI SAN {quoted!r} is not a valid SPIFFE ID: {error}"
    return None


@attrs.frozen
class Recognition:
    """The outcome of recognising a caller: an identity, or why there is none."""

    identity: Identity | None
    #: "ok", "unknown_identity", "identity_ambiguous", "no_credentials", or from
    #: promgate.authn: "authn_missing", "authn_failed", "authn_conflict".
    reason: str
    #: Why, for the audit record's ``detail`` (never a secret).
    detail: str | None = None
    #: For a check held back (throttled or overloaded): seconds until it may be tried again.
    retry_after: int | None = None
    #: For a refused JWT bearer token: the RFC 6750 ``error_description`` of its
    #: ``invalid_token`` challenge (short, constant per kind; see promgate.jwt_authn).
    token_error: str | None = attrs.field(default=None, kw_only=True)


class IdentityResolver:
    """Finds the one identity a certificate names; two or more matches is a refusal, and
    so is a certificate whose ``spiffe:`` URI SAN is not a valid SPIFFE ID."""

    def __init__(self, identities: Mapping[str, Identity]) -> None:
        self._identities: tuple[Identity, ...] = tuple(identities.values())

    def for_certificate(self, peer: PeerCertificate | None) -> Recognition:
        if peer is None:
            return Recognition(None, "no_credentials")
        invalid = invalid_spiffe_uri(peer)
        if invalid is not None:
            return Recognition(None, "unknown_identity", invalid)
        found = list(self._matching(peer))
        if not found:
            return Recognition(None, "unknown_identity")
        if len(found) > 1:
            return Recognition(None, "identity_ambiguous")
        return Recognition(found[0], "ok")

    def _matching(self, peer: PeerCertificate) -> Iterable[Identity]:
        for identity in self._identities:
            if any(cert_matches(m, peer) for m in identity.cert):
                yield identity
