"""promgate's own metrics, on a registry it owns (never the process-global one).

Labels stay bounded: listener, route, identity, code, reason and direction only. Request
parameters that name no configured route are counted under route="" rather than their raw
value; callers are counted under a configured identity's name or one of two fixed values
(``none``, ``unrecognised``), never under what they presented.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

import promgate
import twisted
from promgate.audit_format import head_fingerprint

_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: tcp connections live from milliseconds (a refusal) to hours (a long-lived tunnel).
_TCP_DURATION_BUCKETS = (0.01, 0.1, 1, 10, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
_TUNNEL_BUCKETS = (0.1, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)

#: The ``identity`` label of a caller for whom no identity was established: no credentials
#: were presented (or the connection ended before any were).
NO_IDENTITY = "none"
#: The ``identity`` label of a caller whose credentials named no configured identity.
UNRECOGNISED = "unrecognised"
#: Recognition reasons meaning credentials were presented but matched no one identity.
_UNRECOGNISED_REASONS = frozenset(
    {"unknown_identity", "identity_ambiguous", "authn_failed", "authn_conflict"}
)


def identity_label(name: str | None, reason: str) -> str:
    """The ``identity`` label value: the identity's configured name when one was
    established, else ``unrecognised`` when ``reason`` says credentials matched no
    identity, else ``none``."""
    if name is not None:
        return name
    return UNRECOGNISED if reason in _UNRECOGNISED_REASONS else NO_IDENTITY


class Metrics:
    """Every metric promgate exports, created once per process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "promgate_requests",
            "HTTP requests answered, by listener, route, caller identity and status code.",
            ["listener", "route", "identity", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "promgate_request_duration_seconds",
            "Time from a complete request head to the last response byte.",
            ["listener", "route"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "promgate_upstream_duration_seconds",
            "Time from sending a request upstream to the end of its response.",
            ["route"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.bytes = Counter(
            "promgate_bytes",
            "Bytes relayed per route: direction in = from clients, out = to clients.",
            ["route", "direction"],
            registry=r,
        )
        self.rate_limited = Counter(
            "promgate_rate_limited",
            "Requests refused by a route's limits, by reason.",
            ["route", "reason"],
            registry=r,
        )
        self.denied = Counter(
            "promgate_denied",
            "Requests refused before reaching an upstream, by reason.",
            ["listener", "route", "reason"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "promgate_upstream_errors",
            "Upstream failures, by route and reason.",
            ["route", "reason"],
            registry=r,
        )
        self.authn_failures = Counter(
            "promgate_authn_failures",
            "Requests refused because the caller was not authenticated, by listener and "
            "reason (authn_missing, authn_failed, authn_conflict, identity_ambiguous, "
            "unknown_identity, no_credentials).",
            ["listener", "reason"],
            registry=r,
        )
        self.tls_handshake_failures = Counter(
            "promgate_tls_handshake_failures",
            "Refused or failed TLS handshakes, by listener and reason.",
            ["listener", "reason"],
            registry=r,
        )
        self.connections = Counter(
            "promgate_connections",
            "Connections accepted, by listener.",
            ["listener"],
            registry=r,
        )
        self.open_connections = Gauge(
            "promgate_open_connections",
            "Connections currently open, by listener.",
            ["listener"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.open_tunnels = Gauge(
            "promgate_open_tunnels",
            "CONNECT tunnels currently open on forward listeners, by listener.",
            ["listener"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.tunnel_duration = Histogram(
            "promgate_tunnel_duration_seconds",
            "Lifetime of CONNECT tunnels, from the request head to the tunnel's end.",
            ["listener", "route"],
            buckets=_TUNNEL_BUCKETS,
            registry=r,
        )
        self.upstream_connections = Counter(
            "promgate_upstream_connections",
            "Upstream connections opened (a low rate against requests means pooling works).",
            ["route"],
            registry=r,
        )
        self.tcp_connections = Counter(
            "promgate_tcp_connections",
            "Connections on tcp listeners, counted when they end, by listener, route, caller "
            "identity and reason (how they ended, or why they were refused).",
            ["listener", "route", "identity", "reason"],
            registry=r,
        )
        self.tcp_tunnels_open = Gauge(
            "promgate_tcp_tunnels_open",
            "Connections on tcp listeners currently relayed to an upstream, by listener and route.",
            ["listener", "route"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.tcp_duration = Histogram(
            "promgate_tcp_connection_duration_seconds",
            "Lifetime of relayed tcp connections, from accept to the end of both sides.",
            ["listener", "route"],
            buckets=_TCP_DURATION_BUCKETS,
            registry=r,
        )
        self.audit_records = Counter("promgate_audit_records", "Audit records written.", registry=r)
        self.audit_write_errors = Counter(
            "promgate_audit_write_errors", "Audit records that could not be written.", registry=r
        )
        self.audit_reopens = Counter(
            "promgate_audit_reopens",
            "Times the audit log was reopened because its path no longer named the open file.",
            registry=r,
        )
        self.audit_records_aggregated = Counter(
            "promgate_audit_records_aggregated",
            "Refusals of unauthenticated peers counted into an aggregated audit record "
            "rather than written one record each.",
            registry=r,
        )
        self.auth_bcrypt_checks = Counter(
            "promgate_auth_bcrypt_checks",
            "bcrypt password checks started (basic auth not answered from the cache).",
            registry=r,
        )
        self.auth_bcrypt_queue_length = Gauge(
            "promgate_auth_bcrypt_queue_length",
            "bcrypt password checks waiting for a thread or running.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.auth_rejections = Counter(
            "promgate_auth_rejections",
            "Basic-auth checks refused without running bcrypt, by reason (auth_throttled, "
            "auth_overloaded).",
            ["reason"],
            registry=r,
        )
        self.discovery_targets = Gauge(
            "promgate_discovery_targets",
            "Targets each provider currently gives each route (after the route's selector).",
            ["route", "provider"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.discovery_refresh_duration = Histogram(
            "promgate_discovery_refresh_duration_seconds",
            "Time taken by discovery refreshes, by provider.",
            ["provider"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.discovery_failures = Counter(
            "promgate_discovery_failures",
            "Discovery refreshes that failed in whole or part (the last good targets are "
            "kept), by route and provider.",
            ["route", "provider"],
            registry=r,
        )
        self.discovery_last_success = Gauge(
            "promgate_discovery_last_success_timestamp_seconds",
            "Time of the last fully successful discovery refresh, by route and provider.",
            ["route", "provider"],
            multiprocess_mode="max",
            registry=r,
        )
        self.process = ProcessMetrics(r)
        self._routes: dict[tuple[str, str], RouteMetrics] = {}
        self.identity_providers = IdentityProviderMetrics(r)
        self.audit_head = AuditHeadMetrics(r)
        self.tls = TLSMetrics(r)

    def route(self, listener: str, route: str) -> RouteMetrics:
        """The per-request metric children of one listener and route, made once."""
        key = (listener, route)
        found = self._routes.get(key)
        if found is None:
            found = self._routes[key] = RouteMetrics(self, listener, route)
        return found

    def audit_result(self, ok: bool) -> None:
        """Count one audit write attempt (passed to the audit log as on_result)."""
        if ok:
            self.audit_records.inc()
        else:
            self.audit_write_errors.inc()


class ProcessMetrics:
    """What a process that answers ``/metrics`` says of itself, the same in a single
    gateway and in the supervisor of worker processes: the outcome of the last
    configuration load, the build, and what every Prometheus client exports about its
    process (``process_*``: CPU, memory, file descriptors, start time; ``python_*``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.config_last_reload_successful = Gauge(
            "promgate_config_last_reload_successful",
            "Whether the last configuration load succeeded (in every worker, with worker "
            "processes).",
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.config_last_reload_success_timestamp = Gauge(
            "promgate_config_last_reload_success_timestamp_seconds",
            "Time of the last successful configuration load.",
            multiprocess_mode="max",
            registry=registry,
        )
        build_info = Gauge(
            "promgate_build_info",
            "promgate build information (always 1).",
            ["version", "pythonversion", "twistedversion"],
            multiprocess_mode="max",
            registry=registry,
        )
        build_info.labels(promgate.__version__, platform.python_version(), twisted.__version__).set(
            1
        )
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

    def loaded(self, now: float) -> None:
        """A configuration was loaded (at start-up, or by a reload) at ``now``."""
        self.config_last_reload_successful.set(1)
        self.config_last_reload_success_timestamp.set(now)

    def refused(self) -> None:
        """A reload was refused: the running configuration stays."""
        self.config_last_reload_successful.set(0)


class RouteMetrics:
    """Label children used on every request, looked up once instead of per request."""

    __slots__ = (
        "_codes",
        "_listener",
        "_requests",
        "_route",
        "bytes_in",
        "bytes_out",
        "duration",
        "upstream_duration",
    )

    def __init__(self, metrics: Metrics, listener: str, route: str) -> None:
        self._requests = metrics.requests
        self._listener = listener
        self._route = route
        self._codes: dict[tuple[str, int], Any] = {}
        self.duration = metrics.request_duration.labels(listener, route)
        self.upstream_duration = metrics.upstream_duration.labels(route)
        self.bytes_in = metrics.bytes.labels(route, "in")
        self.bytes_out = metrics.bytes.labels(route, "out")

    def answered(self, status: int, identity: str) -> None:
        """Count one request answered with ``status`` to ``identity`` (a label value from
        ``identity_label``)."""
        key = (identity, status)
        child = self._codes.get(key)
        if child is None:
            child = self._codes[key] = self._requests.labels(
                self._listener, self._route, identity, str(status)
            )
        child.inc()


class WithoutCreated(Collector):
    """A registry's metrics without the ``*_created`` series the Python client adds to
    counters and histograms: in the text format they would be separate gauges beside every
    counter, doubling the series for no use (Prometheus does not read them)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return self._without_created(self._registry.collect())

    @staticmethod
    def _without_created(families: Iterable[Metric]) -> Iterator[Metric]:
        for family in families:
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield kept


def exposed_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """The registry the admin listener serves: ``registry``'s metrics without ``_created``
    series. The process-wide switch (``disable_created_metrics``) would also change every
    other registry in the process, such as an integrator's test suite's."""
    exposed = CollectorRegistry(auto_describe=False)
    exposed.register(WithoutCreated(registry))
    return exposed


# -- identity providers (JWT bearer tokens) ----------------------------------------------------


class IdentityProviderMetrics:
    """The signing keys of each identity provider: how many are held, and how fetching
    them goes. Labelled by provider (a configured name, so bounded)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.keys = Gauge(
            "promgate_identity_provider_keys",
            "Signing keys held for each identity provider (as last fetched from its JWKS).",
            ["provider"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.refresh_failures = Counter(
            "promgate_identity_provider_refresh_failures",
            "Fetches of an identity provider's keys that failed (the keys held are kept).",
            ["provider"],
            registry=registry,
        )
        self.last_refresh = Gauge(
            "promgate_identity_provider_last_refresh_success_timestamp_seconds",
            "Time of the last successful fetch of each identity provider's keys.",
            ["provider"],
            multiprocess_mode="max",
            registry=registry,
        )
        self.token_checks = Counter(
            "promgate_identity_provider_token_verifications",
            "JWT signature checks run (tokens not answered from the cache of verified "
            "tokens), by provider.",
            ["provider"],
            registry=registry,
        )

    def provider(self, name: str) -> None:
        """Show ``name``'s series from the start, before its first fetch ends."""
        self.keys.labels(name).set(0)
        self.refresh_failures.labels(name)
        self.last_refresh.labels(name)
        self.token_checks.labels(name)


# -- the audit chain's head, witnessed by the Prometheus that scrapes it ------------------------


class AuditHeadMetrics:
    """The last audit record written: its seq and a fingerprint of its MAC. Prometheus keeps
    every scraped pair, so ``promgate audit verify --witness`` can check that the records it
    saw are still in the log, unchanged (see docs/audit.md)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.last_sequence = Gauge(
            "promgate_audit_last_sequence",
            "Sequence number of the last audit record written.",
            multiprocess_mode="liveall",
            registry=registry,
        )
        self.head_fingerprint = Gauge(
            "promgate_audit_head_fingerprint",
            "The first 48 bits of the last audit record's MAC, as an integer.",
            multiprocess_mode="liveall",
            registry=registry,
        )

    def update(self, seq: int, mac: str) -> None:
        """A record was written (passed to the audit log as on_head)."""
        self.last_sequence.set(seq)
        self.head_fingerprint.set(head_fingerprint(mac))


# -- served certificates (reloaded when their files change) -----------------------------------


class TLSMetrics:
    """What each TLS listener serves, and how reloading its files goes. Labelled by
    listener (a configured name, so bounded)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.expiry = Gauge(
            "promgate_tls_certificate_expiry_timestamp_seconds",
            "notAfter of the certificate each listener serves now.",
            ["listener"],
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.reloads = Counter(
            "promgate_tls_reloads",
            "New certificate, key, client CA and CRL sets loaded and served, by listener.",
            ["listener"],
            registry=registry,
        )
        self.reload_failures = Counter(
            "promgate_tls_reload_failures",
            "Changed TLS files that could not be served (the set served before is kept), "
            "by listener.",
            ["listener"],
            registry=registry,
        )

    def listener(self, name: str, not_after: float) -> None:
        """Show ``name``'s series from the start, serving a certificate valid until
        ``not_after``."""
        self.expiry.labels(name).set(not_after)
        self.reloads.labels(name)
        self.reload_failures.labels(name)


# -- limits shared through Redis (shared_limits) ---------------------------------------------


class SharedLimitsMetrics:
    """How the Redis of ``shared_limits`` answers; registered only when it is configured.
    Labels are closed vocabularies (error kind, ``on_unavailable`` mode)."""

    #: The kinds of error counted.
    ERROR_KINDS = ("timeout", "connection", "script")

    def __init__(self, registry: CollectorRegistry) -> None:
        self.errors = Counter(
            "promgate_shared_limits_redis_errors",
            "Calls to Redis that failed, by kind: no answer within the timeout, no "
            "connection, or an error reply.",
            ["kind"],
            registry=registry,
        )
        self.latency = Histogram(
            "promgate_shared_limits_redis_latency_seconds",
            "Time from sending a call to Redis to its reply (late replies included).",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1),
            registry=registry,
        )
        self.unavailable = Counter(
            "promgate_shared_limits_unavailable",
            "Admissions decided without Redis (it did not answer in time), by the "
            "on_unavailable mode that decided them.",
            ["on_unavailable"],
            registry=registry,
        )
        self.up = Gauge(
            "promgate_shared_limits_redis_up",
            "1 while Redis answers in time and the limits are shared, 0 otherwise.",
            registry=registry,
        )
        for kind in self.ERROR_KINDS:
            self.errors.labels(kind)
