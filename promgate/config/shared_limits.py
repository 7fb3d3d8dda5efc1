"""The ``shared_limits`` section: the Redis that holds every route's limits as one budget
across the gateway's worker processes and across gateways.

Optional; without it each process keeps its own limits. Redis is named by either a
Twisted client endpoint string, parsed here as the gateway will parse it (nothing is
connected), or the Redis Sentinels that name the current master; passwords, if any, are
read from their ``password_file`` like every other secret.
"""

from __future__ import annotations

from typing import Any

from promgate.addresses import split_address
from promgate.config.fields import Reader
from promgate.config.files import secret_file
from promgate.config.model import ON_LIMITS_UNAVAILABLE, RedisLimits, RedisSentinel, SharedLimits
from promgate.config.sections import Sections
from promgate.config.units import parse_duration
from promgate.config.yaml_source import Item

__all__ = ["check_shared_limits", "client_endpoint_problem"]

_KEYS = ("redis",)
_REDIS_KEYS = (
    "endpoint",
    "sentinel",
    "password_file",
    "key_prefix",
    "timeout",
    "on_unavailable",
    "lease_ttl",
)
_SENTINEL_KEYS = ("endpoints", "master", "password_file")
#: The shortest lease: renewed every third of it, a shorter one would be renewed in a
#: tight loop and lost to one slow reply.
MIN_LEASE_TTL = 1.0
DEFAULT_LEASE_TTL = 30.0
DEFAULT_TIMEOUT = 0.05


def client_endpoint_problem(text: str) -> str | None:
    """Why ``text`` is not a client endpoint string the gateway can connect with, or None.
    Parsed on a memory reactor: nothing is connected."""
    from twisted.internet.endpoints import clientFromString
    from twisted.internet.testing import MemoryReactor

    try:
        clientFromString(MemoryReactor(), text)
    except (ValueError, TypeError, KeyError, RuntimeError, ImportError) as e:
        return f"invalid client endpoint {text!r}: {e}"
    return None


def check_shared_limits(r: Reader, sections: Sections) -> SharedLimits | None:
    """The shared limits' settings; None when the section is absent or wrong (reported)."""
    item = sections.singletons.get("shared_limits")
    if item is None:
        return None
    f = r.fields(item, _KEYS, _KEYS)
    if f is None or "redis" not in f:
        return None
    redis = _redis(r, f["redis"])
    return SharedLimits(redis) if redis is not None else None


def _redis(r: Reader, item: Item) -> RedisLimits | None:
    f = r.fields(item, _REDIS_KEYS)
    if f is None:
        return None
    ok = True
    endpoint = None
    sentinel = None
    if ("endpoint" in f) == ("sentinel" in f):
        r.error(item.src, item.key, "give either 'endpoint' or 'sentinel' (one of them)")
        ok = False
    elif "endpoint" in f:
        endpoint = r.string(f["endpoint"])
        if endpoint is not None:
            problem = client_endpoint_problem(endpoint)
            if problem is not None:
                r.error(f["endpoint"].src, f["endpoint"].key, problem)
                endpoint = None
        ok = endpoint is not None
    else:
        sentinel = _sentinel(r, f["sentinel"])
        ok = sentinel is not None
    kw: dict[str, Any] = {}
    ok = _password(r, f, kw) and ok
    if "key_prefix" in f:
        prefix = r.string(f["key_prefix"])
        if prefix is not None and not prefix.isprintable():
            r.error(f["key_prefix"].src, f["key_prefix"].key, "must be printable text")
            prefix = None
        ok = ok and prefix is not None
        kw["key_prefix"] = prefix
    if "on_unavailable" in f:
        choice = r.choice(f["on_unavailable"], ON_LIMITS_UNAVAILABLE)
        ok = ok and choice is not None
        kw["on_unavailable"] = choice
    for key in ("timeout", "lease_ttl"):
        if key in f:
            value = r.positive(f[key], parse_duration)
            ok = ok and value is not None
            kw[key] = value
    ttl: float = kw.get("lease_ttl") or DEFAULT_LEASE_TTL
    timeout: float = kw.get("timeout") or DEFAULT_TIMEOUT
    if "lease_ttl" in f and kw.get("lease_ttl") is not None and ttl < MIN_LEASE_TTL:
        r.error(f["lease_ttl"].src, f["lease_ttl"].key, "must be at least 1s")
        ok = False
    elif timeout * 3 > ttl:
        where = f.get("timeout") or f.get("lease_ttl") or item
        r.error(where.src, where.key, "timeout must be at most a third of lease_ttl")
        ok = False
    if not ok:
        return None
    return RedisLimits(endpoint=endpoint, sentinel=sentinel, **kw)


def _sentinel(r: Reader, item: Item) -> RedisSentinel | None:
    """``sentinel``: the sentinels (``HOST:PORT`` each) and the name of the master."""
    f = r.fields(item, _SENTINEL_KEYS, ("endpoints", "master"))
    if f is None:
        return None
    ok = "endpoints" in f
    endpoints: list[tuple[str, int]] = []
    for entry in r.one_or_many(f["endpoints"]) if "endpoints" in f else []:
        text = r.string(entry)
        split = split_address(text) if text is not None else None
        if split is None:
            if text is not None:
                r.error(entry.src, entry.key, f"{text!r}: give HOST:PORT ([v6]:port for IPv6)")
            ok = False
        elif split in endpoints:
            r.error(entry.src, entry.key, f"{text!r}: given twice")
            ok = False
        else:
            endpoints.append(split)
    ok = ok and bool(endpoints)
    master = r.string(f["master"]) if "master" in f else None
    kw: dict[str, Any] = {}
    ok = _password(r, f, kw) and ok
    if master is None or not ok:
        return None
    return RedisSentinel(endpoints=tuple(endpoints), master=master, **kw)


def _password(r: Reader, f: dict[str, Item], kw: dict[str, Any]) -> bool:
    """``password_file``, if given, read into ``kw`` (``password_file``, ``password``);
    False if it is given and unusable (reported)."""
    if "password_file" not in f:
        return True
    secret = secret_file(r, f["password_file"])
    if secret is None:
        return False
    kw["password_file"], kw["password"] = secret
    return True
