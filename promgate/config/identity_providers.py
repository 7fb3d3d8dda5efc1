"""The ``identity_providers`` section: OIDC issuers whose JWT bearer tokens name identities.

Each provider names its issuer (keys found through its discovery document unless
``jwks_uri`` is given), the audiences a token must carry one of, the signature algorithms
accepted (asymmetric only: ``none`` and HMAC never), the clock leeway and how often keys
are fetched again. Identities refer to providers by name (``jwt: {provider: ...}``).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from promgate.config import files
from promgate.config.fields import Reader, where
from promgate.config.model import DEFAULT_JWT_ALGORITHMS, JWT_ALGORITHMS, IdentityProvider
from promgate.config.sections import Sections
from promgate.config.units import parse_duration
from promgate.config.yaml_source import Item

__all__ = ["check_identity_providers", "url_error"]

_KEYS = ("issuer", "audiences", "ca", "jwks_uri", "algorithms", "leeway", "refresh")
#: At most this much clock skew is tolerated: more is a clock to fix, not to paper over.
_MAX_LEEWAY = 600.0
#: Keys are fetched again at least this often: a rotated key must reach the gateway.
_MAX_REFRESH = 7 * 24 * 3600.0
_MIN_REFRESH = 10.0


def check_identity_providers(r: Reader, sections: Sections) -> dict[str, IdentityProvider]:
    """Every provider of ``identity_providers``; an issuer is given to one provider only."""
    out: dict[str, IdentityProvider] = {}
    issuers: dict[str, tuple[str, Item]] = {}
    for name, item in sections.identity_providers.items():
        provider = _provider(r, name, item)
        if provider is None:
            continue
        first = issuers.setdefault(provider.issuer, (name, item))
        if first[0] != name:
            r.error(
                item.src,
                f"{item.key}.issuer",
                f"issuer {provider.issuer!r} is already the issuer of provider "
                f"{first[0]!r} (at {where(first[1])})",
            )
            continue
        out[name] = provider
    return out


def url_error(text: str) -> str | None:
    """Why ``text`` is not a URL keys may be fetched from: https, or http on loopback only."""
    try:
        parts = urlsplit(text)
        host = parts.hostname
    except ValueError as e:
        return f"not a URL: {e}"
    if parts.scheme not in ("https", "http") or not host:
        return "must be an https:// URL"
    if parts.query or parts.fragment:
        return "must have no query or fragment"
    if parts.scheme == "http" and not _loopback(host):
        return "must be an https:// URL (http:// only on a loopback address)"
    return None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _provider(r: Reader, name: str, item: Item) -> IdentityProvider | None:
    f = r.fields(item, _KEYS, ("issuer", "audiences"))
    if f is None or "issuer" not in f or "audiences" not in f:
        return None
    issuer = _url(r, f["issuer"])
    jwks_uri = _url(r, f["jwks_uri"]) if "jwks_uri" in f else None
    ok = issuer is not None and ("jwks_uri" not in f or jwks_uri is not None)
    audiences = []
    for sub in r.one_or_many(f["audiences"]):
        audience = r.string(sub)
        if audience is None:
            ok = False
        else:
            audiences.append(audience)
    ca = None
    if "ca" in f:
        ca = r.existing_file(f["ca"])
        if ca is None or not files.certificates(r, f["ca"], ca):
            ok = False
    algorithms = DEFAULT_JWT_ALGORITHMS
    if "algorithms" in f:
        chosen = []
        for sub in r.one_or_many(f["algorithms"]):
            alg = sub.value
            if alg not in JWT_ALGORITHMS:
                why = (
                    "symmetric and unsigned tokens are never accepted"
                    if isinstance(alg, str) and (alg.lower() == "none" or alg.startswith("HS"))
                    else "unknown algorithm"
                )
                r.error(sub.src, sub.key, f"{why}; use some of: {', '.join(JWT_ALGORITHMS)}")
                ok = False
            else:
                chosen.append(alg)
        algorithms = tuple(dict.fromkeys(chosen))
    leeway = 30.0
    if "leeway" in f:
        value = r.typed(f["leeway"], parse_duration)
        if value is None:
            ok = False
        elif value > _MAX_LEEWAY:
            r.error(f["leeway"].src, f["leeway"].key, "at most 10m")
            ok = False
        else:
            leeway = value
    refresh = 3600.0
    if "refresh" in f:
        value = r.positive(f["refresh"], parse_duration)
        if value is None:
            ok = False
        elif not _MIN_REFRESH <= value <= _MAX_REFRESH:
            r.error(f["refresh"].src, f["refresh"].key, "between 10s and 7d")
            ok = False
        else:
            refresh = value
    if not ok or issuer is None:
        return None
    return IdentityProvider(
        name=name,
        issuer=issuer,
        audiences=tuple(dict.fromkeys(audiences)),
        ca=ca,
        jwks_uri=jwks_uri,
        algorithms=algorithms,
        leeway=leeway,
        refresh=refresh,
    )


def _url(r: Reader, item: Item) -> str | None:
    text = r.string(item)
    if text is None:
        return None
    error = url_error(text)
    if error is not None:
        r.error(item.src, item.key, error)
        return None
    return text
