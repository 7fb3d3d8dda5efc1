"""The ``dns_srv`` provider: SRV records, then their target hosts' A and AAAA records.

Resolved with ``twisted.names`` against the configured servers (default: the system's
``resolv.conf``). The next refresh comes when the shortest TTL seen runs out, but never
sooner than ``min_interval`` nor later than ``refresh_interval``. A name whose lookup
fails keeps its previous targets; a name that does not exist (NXDOMAIN) or has no SRV
records has none.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.names import dns
from twisted.names.error import AuthoritativeDomainError, DNSNameError
from zope.interface import implementer

from promgate.addresses import host_port
from promgate.config.model import Target
from promgate.discovery.provider import BaseProvider, Discovered, IDiscoveryProvider
from promgate.reactors import INamesReactor

DEFAULT_REFRESH_INTERVAL = 30.0
DEFAULT_MIN_INTERVAL = 5.0
#: Per-query retransmission timeouts (seconds): a dead server costs 6 s per refresh.
QUERY_TIMEOUT = (1, 2, 3)

#: A lookup's answer, authority and additional sections.
Sections = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]


class SRVResolver(Protocol):
    """The three lookups dns_srv makes: a ``twisted.names`` resolver, or a fake in tests.

    (``IResolver`` says the same, but types each section as one record.)
    """

    def lookupService(self, name: str, timeout: Sequence[int]) -> Deferred[Sections]: ...

    def lookupAddress(self, name: str, timeout: Sequence[int]) -> Deferred[Sections]: ...

    def lookupIPV6Address(self, name: str, timeout: Sequence[int]) -> Deferred[Sections]: ...


def make_resolver(servers: Sequence[tuple[str, int]] | None, reactor: INamesReactor) -> SRVResolver:
    """A ``twisted.names`` resolver asking ``servers``, or those of resolv.conf; no cache
    (the provider honours TTLs itself) and no hosts file."""
    from twisted.names import client

    if servers:
        return client.Resolver(servers=list(servers), reactor=reactor)
    return client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)


@implementer(IDiscoveryProvider)
class DNSSRV(BaseProvider):
    """Targets from the SRV records of ``names``."""

    def __init__(
        self,
        names: Sequence[str],
        resolver: SRVResolver,
        *,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        min_interval: float = DEFAULT_MIN_INTERVAL,
    ) -> None:
        self.names = tuple(names)
        self.resolver = resolver
        self.refresh_interval = refresh_interval
        self.min_interval = min(min_interval, refresh_interval)
        self.poll_interval = refresh_interval
        #: Per name: its last good targets.
        self.found: dict[str, tuple[Target, ...]] = {}
        self._ttl: float | None = None

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], reactor: INamesReactor) -> DNSSRV:
        return cls(
            settings["names"],
            make_resolver(settings.get("servers"), reactor),
            refresh_interval=settings.get("refresh_interval", DEFAULT_REFRESH_INTERVAL),
            min_interval=settings.get("min_interval", DEFAULT_MIN_INTERVAL),
        )

    def next_interval(self, succeeded: bool) -> float:
        if not succeeded:
            return self.min_interval
        ttl = self.refresh_interval if self._ttl is None else self._ttl
        return max(self.min_interval, min(ttl, self.refresh_interval))

    def refresh(self) -> Deferred[Discovered]:
        return Deferred.fromCoroutine(self._refresh())

    async def _refresh(self) -> Discovered:
        self._ttl = None
        errors: list[str] = []
        targets: dict[str, Target] = {}
        for name in self.names:
            try:
                found = await self._lookup(name)
            except Exception as e:  # timeouts, SERVFAIL, refused: keep what we had
                errors.append(f"{name}: {type(e).__name__}: {e}")
                found = self.found.get(name, ())
            else:
                self.found[name] = found
            for target in found:
                targets.setdefault(target.address, target)
        return Discovered(tuple(targets.values()), tuple(errors))

    def _seen_ttl(self, ttl: int) -> None:
        self._ttl = ttl if self._ttl is None else min(self._ttl, ttl)

    async def _lookup(self, name: str) -> tuple[Target, ...]:
        try:
            answers, _, additional = await self.resolver.lookupService(name, QUERY_TIMEOUT)
        except (DNSNameError, AuthoritativeDomainError):  # NXDOMAIN: the name is gone
            return ()
        out: list[Target] = []
        glue: dict[str, list[str]] = {}
        for rr in additional:
            ip = _ip(rr.payload)
            if ip is not None:
                glue.setdefault(rr.name.name.decode().lower().rstrip("."), []).append(ip)
                self._seen_ttl(rr.ttl)
        records: list[tuple[int, dns.Record_SRV]] = []
        for rr in answers:
            if isinstance(rr.payload, dns.Record_SRV):
                records.append((rr.ttl, rr.payload))
        records.sort(
            key=lambda record: (record[1].priority, -record[1].weight, record[1].target.name)
        )
        for ttl, srv in records:
            self._seen_ttl(ttl)
            host = srv.target.name.decode().lower().rstrip(".")
            port = srv.port
            if not host or not port:  # "." means: no service here
                continue
            addresses = glue.get(host) or await self._addresses(host)
            labels = {
                "__meta_dns_name": name,
                "__meta_dns_srv_record_target": host,
                "__meta_dns_srv_record_port": str(port),
            }
            for ip in addresses:
                out.append(Target(host_port(ip, port), labels))
        return tuple(out)

    async def _addresses(self, host: str) -> list[str]:
        out: list[str] = []
        failures: list[Exception] = []
        for lookup, rtype in (
            (self.resolver.lookupAddress, dns.Record_A),
            (self.resolver.lookupIPV6Address, dns.Record_AAAA),
        ):
            try:
                answers, _, _ = await lookup(host, QUERY_TIMEOUT)
            except (DNSNameError, AuthoritativeDomainError):
                continue
            except Exception as e:
                failures.append(e)
                continue
            for rr in answers:
                ip = _ip(rr.payload) if isinstance(rr.payload, rtype) else None
                if ip is not None:
                    self._seen_ttl(rr.ttl)
                    out.append(ip)
        if failures and not out:
            raise failures[0]
        return out


def _ip(record: object) -> str | None:
    """The address an A or AAAA record holds; None for any other record."""
    if isinstance(record, dns.Record_A):
        return str(record.dottedQuad())
    if isinstance(record, dns.Record_AAAA):
        return str(ipaddress.IPv6Address(record.address))
    return None
