"""The ``identities`` and ``web_configs`` sections: who may call, and how each is known.

An identity is matched by client certificate rules, bearer tokens (kept only as SHA-256
digests), basic-auth users (bcrypt hashes) or JWTs of an identity provider (by ``sub`` or
claims). One token or one user names one identity: the same credential given to two
identities is an error, wherever it is written.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from promgate.config import files
from promgate.config.fields import NAME, Reader, where
from promgate.config.model import BasicCredential, CertMatch, Identity, JWTMatch
from promgate.config.sections import Sections
from promgate.config.yaml_source import Item, join_key
from promgate.spiffe import is_spiffe, spiffe_pattern_error

__all__ = ["check_identities"]

#: Identity names the metrics' ``identity`` label keeps for callers without one.
RESERVED_NAMES = frozenset({"none", "unrecognised"})
_IDENTITY_KEYS = ("cert", "roles", "bearer_sha256", "bearer_file", "basic", "jwt")
_CREDENTIAL_KEYS = ("cert", "bearer_sha256", "bearer_file", "basic", "jwt")
_CERT_RULES = ("cn", "dns", "uri", "spki_sha256")
_SHA256_HEX = re.compile(r"^[0-9A-Fa-f]{64}$")
_WEB_CONFIG_KEYS = ("basic_auth_users", "http_server_config", "tls_server_config")


def check_identities(
    r: Reader, sections: Sections, providers: Collection[str] = ()
) -> dict[str, Identity]:
    """Every identity: those of ``identities``, then the users of each web-config file.
    ``providers`` are the names of the identity providers a ``jwt`` rule may name."""
    credentials = _Credentials(r)
    out = {}
    for name, item in sections.identities.items():
        if name in RESERVED_NAMES:
            r.error(
                item.src,
                item.key,
                f"{name!r} is reserved: the metrics' identity label uses it for callers "
                "without an identity",
            )
            continue
        ident = _identity(r, credentials, name, item, providers)
        if ident is not None:
            out[name] = ident
    known = dict(sections.identities)
    for item in sections.web_configs:
        out.update(_web_config(r, credentials, item, known))
    return out


class _Credentials:
    """The header credentials seen so far, for "configured twice" errors: where, and whose."""

    def __init__(self, r: Reader) -> None:
        self.r = r
        self._bearer_seen: dict[bytes, tuple[str, Item]] = {}
        self._users_seen: dict[str, tuple[str, Item]] = {}

    def bearer(self, name: str, item: Item, digest: bytes) -> bytes:
        """Note a bearer token digest of identity ``name``; one token names one identity."""
        first, at = self._bearer_seen.setdefault(digest, (name, item))
        if first != name:
            self.r.error(
                item.src,
                item.key,
                f"the same bearer token is configured for identity {first!r} (at {where(at)})",
            )
        return digest

    def basic_user(self, name: str, item: Item) -> bool:
        """Note a basic-auth user of identity ``name``; one user names one identity."""
        user = str(item.value)
        first, at = self._users_seen.setdefault(user, (name, item))
        if at is not item:
            self.r.error(
                item.src,
                item.key,
                f"basic auth user {user!r} is already configured for identity {first!r} "
                f"(at {where(at)})",
            )
            return False
        return True


def _identity(
    r: Reader, credentials: _Credentials, name: str, item: Item, providers: Collection[str]
) -> Identity | None:
    f = r.fields(item, _IDENTITY_KEYS)
    if f is None:
        return None
    matches = _cert_matches(r, f["cert"]) if "cert" in f else []
    bearer: list[bytes] = []
    if "bearer_sha256" in f:
        for sub_item in r.one_or_many(f["bearer_sha256"]):
            hexdigest = _sha256_hex(r, sub_item)
            if hexdigest is not None:
                bearer.append(credentials.bearer(name, sub_item, bytes.fromhex(hexdigest)))
    if "bearer_file" in f:
        for sub_item in r.one_or_many(f["bearer_file"]):
            digest = files.token_file(r, sub_item)
            if digest is not None:
                bearer.append(credentials.bearer(name, sub_item, digest))
    basic: list[BasicCredential] = []
    if "basic" in f:
        for sub_item in r.one_or_many(f["basic"]):
            b = r.fields(sub_item, ("user", "bcrypt"), ("user", "bcrypt"))
            if b is None or "user" not in b or "bcrypt" not in b:
                continue
            user = r.string(b["user"])
            if user is not None and ":" in user:
                r.error(b["user"].src, b["user"].key, "a basic auth user cannot contain ':'")
                user = None
            hashed = files.bcrypt_hash(r, b["bcrypt"])
            if user is not None and hashed is not None and credentials.basic_user(name, b["user"]):
                basic.append(BasicCredential(user, hashed))
    jwt: list[JWTMatch] = []
    if "jwt" in f:
        for sub_item in r.one_or_many(f["jwt"]):
            match = _jwt_match(r, sub_item, providers)
            if match is not None:
                jwt.append(match)
    if not any(k in f for k in _CREDENTIAL_KEYS):
        r.warn(item.src, item.key, "identity has no credential and can never match")
    roles = frozenset(r.strings(f["roles"]) or ()) if "roles" in f else frozenset()
    return Identity(
        name=name,
        cert=tuple(matches),
        roles=roles,
        bearer_sha256=tuple(dict.fromkeys(bearer)),
        basic=tuple(basic),
        jwt=tuple(jwt),
    )


def _jwt_match(r: Reader, item: Item, providers: Collection[str]) -> JWTMatch | None:
    """``jwt: {provider, subject, claims}``: the provider's tokens whose ``sub`` is
    ``subject`` and whose ``claims`` hold the values given; one of the two is needed."""
    f = r.fields(item, ("provider", "subject", "claims"), ("provider",))
    if f is None or "provider" not in f:
        return None
    provider = r.string(f["provider"])
    if provider is not None and provider not in providers:
        known = ", ".join(sorted(providers)) or "none is configured"
        r.error(
            f["provider"].src,
            f["provider"].key,
            f"no identity provider {provider!r} (identity_providers: {known})",
        )
        provider = None
    subject = r.string(f["subject"]) if "subject" in f else None
    claims: dict[str, str] = {}
    if "claims" in f:
        c = f["claims"]
        if not isinstance(c.value, dict) or not c.value:
            r.error(c.src, c.key, "must be a mapping of claim names to values")
            return None
        for claim, value in c.value.items():
            sub = Item(value, c.src, join_key(c.key, str(claim)))
            if not isinstance(claim, str) or not claim:
                r.error(c.src, sub.key, "a claim name is a non-empty string")
            elif isinstance(value, bool) or not isinstance(value, (str, int)):
                r.error(c.src, sub.key, "a claim's value is a string (or a number)")
            else:
                claims[claim] = str(value)
    if subject is None and not claims:
        if "subject" not in f and "claims" not in f:
            r.error(item.src, item.key, "give subject, claims or both: which tokens name it")
        return None
    if provider is None:
        return None
    return JWTMatch(provider=provider, subject=subject, claims=claims)


def _cert_matches(r: Reader, item: Item) -> list[CertMatch]:
    """``cert``: one rule, or a list of them; each names exactly one of _CERT_RULES."""
    raw = item.value
    entries = raw if isinstance(raw, list) else [raw]
    matches: list[CertMatch] = []
    for i, entry in enumerate(entries):
        key = f"{item.key}[{i}]" if isinstance(raw, list) else item.key
        sub = r.fields(Item(entry, item.src, key), _CERT_RULES)
        if sub is None:
            continue
        if len(sub) != 1:
            r.error(item.src, key, f"give exactly one of {', '.join(_CERT_RULES)}")
            continue
        ((kind, value),) = sub.items()
        text = _sha256_hex(r, value) if kind == "spki_sha256" else r.string(value)
        if text is not None and kind == "uri" and is_spiffe(text):
            why = spiffe_pattern_error(text)
            if why is not None:
                r.error(value.src, value.key, f"not a valid SPIFFE ID: {why}")
                continue
        if text is not None:
            matches.append(CertMatch(**{kind: text}))
    return matches


def _sha256_hex(r: Reader, item: Item) -> str | None:
    """A SHA-256 digest written as 64 hexadecimal characters; returned in lower case."""
    text = item.value
    if not isinstance(text, str) or not _SHA256_HEX.match(text):
        r.error(
            item.src,
            item.key,
            "must be a SHA-256 digest: 64 hexadecimal characters"
            + (f" (this has {len(text)})" if isinstance(text, str) else ""),
        )
        return None
    return text.lower()


def _web_config(
    r: Reader, credentials: _Credentials, item: Item, known: dict[str, Item]
) -> dict[str, Identity]:
    """Identities from one exporter-toolkit ``web-config.yml`` file: each user of
    ``basic_auth_users`` becomes an identity of that name, with the entry's roles.
    ``known`` holds every identity name defined so far, and gains these."""
    f = r.fields(item, ("path", "roles"), ("path",))
    if f is None or "path" not in f:
        return {}
    roles = frozenset(r.strings(f["roles"]) or ()) if "roles" in f else frozenset()
    path = r.existing_file(f["path"])
    if path is None:
        return {}
    parsed = r.parse(path)
    if parsed is None:
        return {}
    data, src = parsed
    if data is None:
        data = {}
    if not isinstance(data, dict):
        r.error(src, "", "a web-config.yml file is a mapping")
        return {}
    for key in data:
        if key not in _WEB_CONFIG_KEYS:
            r.error(src, key, f"unknown key (expected one of: {', '.join(_WEB_CONFIG_KEYS)})")
        elif key != "basic_auth_users":
            r.warn(
                src,
                key,
                "ignored: promgate's own listener settings apply (only basic_auth_users is used)",
            )
    users = data.get("basic_auth_users")
    if users is None:
        r.warn(src, "", "no basic_auth_users: this file adds no identity")
        return {}
    if not isinstance(users, dict):
        r.error(src, "basic_auth_users", "must be a mapping of user names to bcrypt hashes")
        return {}
    out: dict[str, Identity] = {}
    for user, hashed in users.items():
        key = f"basic_auth_users.{user}"
        user_item = Item(user, src, key)
        if not NAME.match(user):
            r.error(
                src,
                key,
                "the user becomes an identity of that name: use letters, digits, "
                "'_', '.', '-' (at most 63)",
            )
            continue
        if user in RESERVED_NAMES:
            r.error(
                src,
                key,
                f"{user!r} is reserved: the metrics' identity label uses it for callers "
                "without an identity",
            )
            continue
        first = known.get(user)
        if first is not None:
            r.error(src, key, f"identity {user!r} defined twice (first at {where(first)})")
            continue
        known[user] = user_item
        digest = files.bcrypt_hash(r, Item(hashed, src, key))
        if digest is None or not credentials.basic_user(user, user_item):
            continue
        out[user] = Identity(name=user, roles=roles, basic=(BasicCredential(user, digest),))
    return out
