"""JWT bearer tokens from identity providers: verify, then find the identity they name.

A token is verified against the provider whose ``issuer`` is its ``iss``: its header's
``alg`` must be one the provider accepts (never ``none`` nor HMAC: the key set holds only
asymmetric keys, and the check names the one algorithm the header gave, so no key
confusion), its signature must verify with the key its ``kid`` names (an unknown ``kid``
fetches the keys again, see :mod:`promgate.jwks`), its ``aud`` must hold one of the
provider's audiences, and ``exp`` (required), ``nbf`` and ``iat`` must hold on the injected
clock within the provider's leeway. PyJWT (with ``cryptography``) checks the signature,
``iss`` and ``aud``; times are checked here, on the gateway's clock.

A verified token then names identities by ``sub`` or claims (``jwt:`` rules): none is
``unknown_identity``, two or more ``identity_ambiguous``, as for certificates. Verified
tokens are kept (a bounded cache, by the token's SHA-256, until ``exp``), so a scraper
reusing one token pays for one signature check; a cached token whose key has been rotated
away is verified again (and refused).

A refused token is ``authn_failed`` (401): the caller is told the RFC 6750 error
``invalid_token`` with a short description that is constant per kind
(:data:`TOKEN_ERRORS`); the audit record's ``detail`` says which provider, the kind, and
the token's ``iss``, ``sub`` and ``jti`` (never the token).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
import jwt
from jwt.exceptions import (
    DecodeError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidKeyError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWTError,
)
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from promgate.config.model import Identity, IdentityProvider, JWTMatch
from promgate.identity import Recognition
from promgate.jwks import ProviderKeys, SigningKey

if TYPE_CHECKING:
    from promgate.metrics import IdentityProviderMetrics

__all__ = ["TOKEN_ERRORS", "JWTVerifier", "claims_match", "looks_like_jwt"]

#: The ``error_description`` of each kind of refused token: short and constant, so that it
#: tells a client what to fix and nothing about the gateway's keys or configuration.
TOKEN_ERRORS = {
    "malformed": "malformed token",
    "issuer": "unknown issuer",
    "algorithm": "signature algorithm not accepted",
    "key": "unknown signing key",
    "signature": "bad signature",
    "expired": "token expired",
    "not_yet_valid": "token not yet valid",
    "audience": "wrong audience",
    "claims": "required claim missing or malformed",
}
#: How much of each claim the audit record's ``detail`` quotes.
_QUOTED = 128
_REGISTERED = ("exp", "nbf", "iat")


def looks_like_jwt(token: bytes) -> bool:
    """Three dot-separated parts, the first a base64url JSON object: a JWS compact token."""
    return token.startswith(b"eyJ") and token.count(b".") == 2


def claims_match(match: JWTMatch, claims: Mapping[str, Any]) -> bool:
    """Does a verified token's ``claims`` satisfy one ``jwt:`` rule?

    ``subject`` must equal ``sub``; each claim listed must equal the token's (as a string),
    or be a member of it when it is a list, or one of its words when it is a
    space-separated string (OAuth's ``scope``).
    """
    if match.subject is not None and claims.get("sub") != match.subject:
        return False
    for name, wanted in match.claims.items():
        have = claims.get(name)
        if isinstance(have, list):
            if wanted not in [_text(v) for v in have]:
                return False
        elif have is None or isinstance(have, dict):
            return False
        else:
            text = _text(have)
            if text != wanted and wanted not in text.split(" "):
                return False
    return True


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@attrs.frozen
class _Verified:
    recognition: Recognition
    exp: float
    leeway: float
    key: SigningKey
    keys: ProviderKeys


class JWTVerifier:
    """Verifies JWT bearer tokens against the configured identity providers and names the
    identity each one is for.

    ``keys`` holds each provider's key set (by provider name); ``clock`` is the time tokens
    are judged by; at most ``cache_size`` verified tokens are kept.
    """

    def __init__(
        self,
        providers: Mapping[str, IdentityProvider],
        identities: Mapping[str, Identity],
        keys: Mapping[str, ProviderKeys],
        clock: IReactorTime,
        *,
        cache_size: int = 4096,
        metrics: IdentityProviderMetrics | None = None,
    ) -> None:
        self.clock = clock
        self.keys = keys
        self.metrics = metrics
        self._by_issuer = {p.issuer: p for p in providers.values()}
        self._rules: dict[str, list[tuple[JWTMatch, Identity]]] = {}
        for identity in identities.values():
            for match in identity.jwt:
                self._rules.setdefault(match.provider, []).append((match, identity))
        self._cache_size = cache_size
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()

    def verify(self, token: bytes) -> Recognition | Deferred[Recognition]:
        """Who ``token`` names, or why it is refused. A Deferred (that never fails) when
        the token names a key not held yet and the keys are being fetched again."""
        digest = hashlib.sha256(token).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            if self.clock.seconds() <= cached.exp + cached.leeway and cached.keys.holds(cached.key):
                self._cache.move_to_end(digest)
                return cached.recognition
            del self._cache[digest]
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except PyJWTError:
            return _refused(None, "malformed", {})
        provider = self._by_issuer.get(unverified.get("iss"))  # type: ignore[arg-type]
        if provider is None:
            return _refused(None, "issuer", unverified)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in provider.algorithms:
            return _refused(provider, "algorithm", unverified)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            return _refused(provider, "malformed", unverified)
        keys = self.keys[provider.name]
        key = keys.key_for(kid, alg)
        if key is not None:
            return self._check(token, digest, provider, keys, key, alg, unverified)
        again = keys.unknown_key()
        if again is None:
            return _refused(provider, "key", unverified)

        def fetched(_: None) -> Recognition:
            key = keys.key_for(kid, alg)
            if key is None:
                return _refused(provider, "key", unverified)
            return self._check(token, digest, provider, keys, key, alg, unverified)

        return again.addCallback(fetched)

    def _check(
        self,
        token: bytes,
        digest: bytes,
        provider: IdentityProvider,
        keys: ProviderKeys,
        key: SigningKey,
        alg: str,
        unverified: Mapping[str, Any],
    ) -> Recognition:
        if self.metrics is not None:
            self.metrics.token_checks.labels(provider.name).inc()
        try:
            claims = jwt.decode(
                token,
                key.jwk.key,
                algorithms=[alg],
                audience=list(provider.audiences),
                issuer=provider.issuer,
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "require": ["exp", "iss", "aud"],
                },
            )
        except InvalidSignatureError:
            return _refused(provider, "signature", unverified)
        except InvalidAudienceError:
            return _refused(provider, "audience", unverified)
        except MissingRequiredClaimError as e:
            kind = "audience" if e.claim == "aud" else "claims"
            return _refused(provider, kind, unverified)
        except InvalidIssuerError:
            return _refused(provider, "issuer", unverified)
        except (InvalidAlgorithmError, InvalidKeyError):
            return _refused(provider, "key", unverified)
        except DecodeError:
            return _refused(provider, "malformed", unverified)
        except PyJWTError:
            return _refused(provider, "claims", unverified)
        times = {}
        for name in _REGISTERED:
            value = claims.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return _refused(provider, "claims", claims)
            times[name] = float(value)
        now = self.clock.seconds()
        leeway = provider.leeway
        if now > times["exp"] + leeway:
            return _refused(provider, "expired", claims)
        if "nbf" in times and now + leeway < times["nbf"]:
            return _refused(provider, "not_yet_valid", claims)
        if "iat" in times and now + leeway < times["iat"]:
            return _refused(provider, "not_yet_valid", claims)
        recognition = self._identify(provider, claims)
        self._remember(digest, _Verified(recognition, times["exp"], leeway, key, keys))
        return recognition

    def _identify(self, provider: IdentityProvider, claims: Mapping[str, Any]) -> Recognition:
        found = [
            identity
            for match, identity in self._rules.get(provider.name, ())
            if claims_match(match, claims)
        ]
        names = list(dict.fromkeys(identity.name for identity in found))
        if len(names) == 1:
            return Recognition(found[0], "ok", _about(provider, claims))
        reason = "identity_ambiguous" if names else "unknown_identity"
        detail = f"{_about(provider, claims)}; no jwt rule matches"
        if names:
            detail = f"{_about(provider, claims)}; jwt rules of {', '.join(names)} match"
        return Recognition(None, reason, detail)

    def _remember(self, digest: bytes, verified: _Verified) -> None:
        self._cache[digest] = verified
        self._cache.move_to_end(digest)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def _about(provider: IdentityProvider | None, claims: Mapping[str, Any]) -> str:
    """Which token: the provider and the token's iss, sub and jti (quoted, capped)."""
    parts = [f"jwt provider {provider.name}" if provider is not None else "jwt"]
    for name in ("iss", "sub", "jti"):
        value = claims.get(name)
        if value is not None:
            text = _text(value)
            if len(text) > _QUOTED:
                text = text[:_QUOTED] + "..."
            parts.append(f"{name}={text!r}")
    return " ".join(parts)


def _refused(
    provider: IdentityProvider | None, kind: str, claims: Mapping[str, Any]
) -> Recognition:
    description = TOKEN_ERRORS[kind]
    return Recognition(
        None, "authn_failed", f"{_about(provider, claims)}: {description}", token_error=description
    )
