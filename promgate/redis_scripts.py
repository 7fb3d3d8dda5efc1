"""The Lua scripts and key names of the limits shared through Redis (``shared_limits``).

Each admission is one script: it reads Redis's own clock (``TIME``, so every gateway
counts time alike), drops the route's expired concurrency leases, checks the cap, then
the token bucket, and only when both admit, takes a token and a lease. A refusal takes
nothing, as with the limits of one process. Times are integer milliseconds of Redis's
clock; a retry delay is the smallest number of them after which the script admits.

Keys, all under the configured prefix (route and caller names are percent-encoded, so
no name can spell another's key):

- ``PREFIX ROUTE :c`` the route's leases: a sorted set, member = holder (a process's
  random id and a counter), score = when the lease expires; the key expires with its
  last lease.
- ``PREFIX ROUTE :b:i: IDENTITY`` (``:b:t: TARGET``, ``:b:p: IDENTITY : TARGET``) a
  token bucket: a hash of the level ``t`` at the time ``s``; the key expires when the
  bucket would be full again (a missing bucket is a full one).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from urllib.parse import quote

from promgate.config.model import Limits

__all__ = ["ADMIT", "ADMIT_SHA", "RENEW", "bucket_key", "encode", "lease_key"]

#: KEYS: leases, bucket. ARGV: cap (0: none), rate per second (0: none), burst, lease
#: ttl in ms, holder. Returns {0, 0} admitted, {1, ms} rate limited, {2, ms} at the cap.
ADMIT = b"""
local cap = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local capacity = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= cap then
    return {2, 1000}
  end
end
if rate > 0 then
  local per_ms = rate / 1000
  local tokens = capacity
  local b = redis.call('HMGET', KEYS[2], 't', 's')
  if b[1] then
    tokens = tonumber(b[1])
    local stamp = tonumber(b[2])
    if now > stamp then
      tokens = math.min(capacity, tokens + (now - stamp) * per_ms)
    end
  end
  if tokens < 1 then
    local wait = math.max(1, math.ceil((1 - tokens) / per_ms))
    local n = 0
    while tokens + wait * per_ms < 1 and n < 64 do
      wait = wait + 1
      n = n + 1
    end
    return {1, wait}
  end
  tokens = tokens - 1
  redis.call('HSET', KEYS[2], 't', string.format('%.17g', tokens), 's', now)
  redis.call('PEXPIRE', KEYS[2], math.max(1, math.ceil((capacity - tokens) / per_ms)))
end
if cap > 0 then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return {0, 0}
"""
ADMIT_SHA = hashlib.sha1(ADMIT).hexdigest()

#: KEYS: lease sets. ARGV: ttl in ms, then for each key the number of its holders and
#: the holders. Expired leases go; held ones that are still there live ``ttl`` longer (a
#: lease that already expired is not brought back: its place may be taken).
RENEW = b"""
local ttl = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local i = 2
for k = 1, #KEYS do
  local n = tonumber(ARGV[i])
  i = i + 1
  redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', now)
  for j = 1, n do
    redis.call('ZADD', KEYS[k], 'XX', now + ttl, ARGV[i])
    i = i + 1
  end
  if redis.call('EXISTS', KEYS[k]) == 1 then
    redis.call('PEXPIRE', KEYS[k], ttl)
  end
end
return 0
"""


@lru_cache(maxsize=4096)
def encode(name: str) -> str:
    """``name`` with every character but letters, digits, ``_``, ``.`` and ``-``
    percent-encoded (UTF-8): it cannot contain the key separator ``:``."""
    return quote(name, safe="_.-")


def lease_key(prefix: str, route: str) -> str:
    """The sorted set of ``route``'s concurrency leases."""
    return f"{prefix}{encode(route)}:c"


def bucket_key(prefix: str, route: str, limits: Limits, identity: str, target: str) -> str:
    """The token bucket a request on ``route`` draws from, per the route's ``per``."""
    per = limits.per
    if per == "identity_target":
        return f"{prefix}{encode(route)}:b:p:{encode(identity)}:{encode(target)}"
    if per == "identity":
        return f"{prefix}{encode(route)}:b:i:{encode(identity)}"
    if per == "target":
        return f"{prefix}{encode(route)}:b:t:{encode(target)}"
    raise ValueError(f"unknown rate limit key {per!r}")
