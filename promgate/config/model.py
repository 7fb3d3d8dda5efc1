"""Frozen values describing a validated promgate configuration."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import attrs

from promgate.addresses import address_parts
from promgate.config.units import parse_duration, parse_size

#: Hard defaults, the safe values DESIGN.md lists.
DEFAULT_TIMEOUT = parse_duration("30s")
DEFAULT_MAX_RESPONSE = parse_size("64MiB")
#: The largest ``max_response_size`` accepted: one scrape is relayed, not stored, but a
#: cap beyond what a process could ever count up to is a typo.
MAX_RESPONSE_LIMIT = parse_size("4GiB")

# The closed vocabularies of the configuration, spelled as in YAML (and in audit records).
# Each tuple lists its type's values in the order error messages give them.

#: What a listener speaks: the reverse gateway, the forward proxy, or TCP forwarding.
ListenerProtocol = Literal["http", "forward", "tcp"]
LISTENER_PROTOCOLS: tuple[ListenerProtocol, ...] = get_args(ListenerProtocol)
#: Whether a ``tcp`` listener terminates TLS or relays the client's TLS untouched.
TCPMode = Literal["terminate", "passthrough"]
TCP_MODES: tuple[TCPMode, ...] = get_args(TCPMode)
#: The PROXY protocol version a ``tcp`` listener sends upstream.
ProxyProtocol = Literal["v2"]
PROXY_PROTOCOLS: tuple[ProxyProtocol, ...] = get_args(ProxyProtocol)
#: How a route's upstream is reached.
Scheme = Literal["http", "https"]
SCHEMES: tuple[Scheme, ...] = get_args(Scheme)
#: What a route's rate limit is counted per.
LimitKey = Literal["identity", "target", "identity_target"]
LIMIT_KEYS: tuple[LimitKey, ...] = get_args(LimitKey)
#: When the audit log is fsynced.
FsyncPolicy = Literal["always", "interval", "never"]
FSYNC_POLICIES: tuple[FsyncPolicy, ...] = get_args(FsyncPolicy)
#: What the gateway does when the audit log cannot be written.
OnAuditFailure = Literal["deny", "allow"]
ON_AUDIT_FAILURE: tuple[OnAuditFailure, ...] = get_args(OnAuditFailure)
#: What admission does while the shared limits' Redis cannot answer in time.
OnLimitsUnavailable = Literal["local", "allow", "deny"]
ON_LIMITS_UNAVAILABLE: tuple[OnLimitsUnavailable, ...] = get_args(OnLimitsUnavailable)
#: Where a route's discovered targets come from.
ProviderKind = Literal["file_sd", "dns_srv", "plugin"]
PROVIDER_KINDS: tuple[ProviderKind, ...] = get_args(ProviderKind)


@attrs.frozen
class TLSFiles:
    """Server certificate, its key, the CA that client certificates must chain to, and
    optionally the certificate revocation list(s) that client certificates are checked
    against."""

    certificate: Path
    key: Path
    client_ca: Path
    client_crl: Path | None = None


@attrs.frozen
class Deadlines:
    """Deadlines (not idle timers) applied to every downstream connection."""

    tls_handshake: float = 10.0
    request_head: float = 10.0
    keepalive_idle: float = 120.0
    upstream_connect: float = 5.0
    #: A CONNECT tunnel (forward listeners) or a tcp listener's connection with no byte
    #: either way for this long is closed.
    tunnel_idle: float = 300.0


@attrs.frozen
class Destination:
    """Where a ``tcp`` listener sends a connection: a route and one of its targets."""

    route: str
    target: str


@attrs.frozen
class TCPForwarding:
    """The settings of a ``protocol: tcp`` listener.

    Exactly one of ``destination`` (the listener's ``route``) and ``sni`` (server name, or
    ``*.suffix`` pattern, to destination) is set; ``sni_default`` takes the connections whose
    server name is missing or not in ``sni``.
    """

    mode: TCPMode = "terminate"
    destination: Destination | None = None
    sni: Mapping[str, Destination] = attrs.field(factory=dict)
    sni_default: Destination | None = None
    proxy_protocol: ProxyProtocol | None = None


@attrs.frozen
class Listener:
    """One listening endpoint and the protocol spoken on it."""

    name: str
    protocol: ListenerProtocol
    endpoint: str
    tls: TLSFiles | None
    advertise: str | None = None
    deadlines: Deadlines = Deadlines()
    tcp: TCPForwarding | None = None
    #: The label ``/sd`` adds with the route's name, so that two routes sharing a target
    #: give Prometheus two series; None leaves it out (``http`` listeners only).
    sd_route_label: str | None = "route"

    def named_routes(self) -> frozenset[str]:
        """The routes a ``tcp`` listener names (its route, SNI map and default)."""
        if self.tcp is None:
            return frozenset()
        destinations = [self.tcp.destination, self.tcp.sni_default, *self.tcp.sni.values()]
        return frozenset(d.route for d in destinations if d is not None)


@attrs.frozen
class CertMatch:
    """One way a client certificate can name an identity; exactly one field is set."""

    cn: str | None = None
    dns: str | None = None
    uri: str | None = None
    #: SHA-256 of the certificate's DER SubjectPublicKeyInfo, lower-case hex.
    spki_sha256: str | None = None


@attrs.frozen
class BasicCredential:
    """A basic-auth user and its bcrypt hash (exporter-toolkit ``web-config.yml`` format)."""

    user: str
    bcrypt: bytes = attrs.field(repr=False)


@attrs.frozen
class JWTMatch:
    """Which verified JWTs of one identity provider name an identity.

    ``subject`` must equal the token's ``sub``; each of ``claims`` must equal the token's
    claim of that name or, when the claim is a list or a space-separated string (``scope``),
    be one of its members. At least one of the two is given.
    """

    provider: str
    subject: str | None = None
    claims: Mapping[str, str] = attrs.field(factory=dict)


#: The JWT signature algorithms an identity provider accepts unless told otherwise.
#: Symmetric (HMAC) algorithms and ``none`` are never accepted.
DEFAULT_JWT_ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")
#: Every algorithm that may be configured: asymmetric signatures only.
JWT_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)


@attrs.frozen
class IdentityProvider:
    """An OIDC issuer whose JWT bearer tokens name identities.

    Its signing keys come from ``jwks_uri``, or, when that is not given, from the
    ``jwks_uri`` of ``{issuer}/.well-known/openid-configuration``; ``ca`` is the trust
    for the issuer's TLS (the system's otherwise).
    """

    name: str
    issuer: str
    audiences: tuple[str, ...]
    ca: Path | None = None
    jwks_uri: str | None = None
    algorithms: tuple[str, ...] = DEFAULT_JWT_ALGORITHMS
    leeway: float = 30.0
    refresh: float = 3600.0


@attrs.frozen
class Identity:
    """A named caller, how to recognise it, and the roles it carries.

    Bearer tokens are kept only as SHA-256 digests, never in clear; digests and bcrypt
    hashes stay out of ``repr`` so that they never reach a log.
    """

    name: str
    cert: tuple[CertMatch, ...] = ()
    roles: frozenset[str] = frozenset()
    bearer_sha256: tuple[bytes, ...] = attrs.field(default=(), repr=False)
    basic: tuple[BasicCredential, ...] = ()
    jwt: tuple[JWTMatch, ...] = ()


@attrs.frozen
class Limits:
    """Per-route admission limits. ``rate`` is tokens per second; None means unlimited."""

    rate: float | None = None
    burst: int = 1
    per: LimitKey = "identity_target"
    max_concurrent: int | None = None


@attrs.frozen
class UpstreamIdentity:
    """The identity an ``https`` upstream's certificate must carry; exactly one field is set.

    ``dns`` is checked as a host name (service_identity); ``uri`` must equal one of the
    certificate's URI subject alternative names exactly (a SPIFFE ID, for instance).
    """

    dns: str | None = None
    uri: str | None = None


@attrs.frozen
class UpstreamTLS:
    """How the gateway verifies an ``https`` upstream, and the client certificate it shows."""

    ca: Path | None = None
    server_name: str | None = None
    cert: Path | None = None
    key: Path | None = None
    identity: UpstreamIdentity | None = None


@attrs.frozen
class UpstreamAuth:
    """Credentials the gateway presents to a route's upstream.

    ``header`` is the whole ``Authorization`` header line (CRLF included), built once when
    the configuration is loaded. It is left out of ``repr`` so that it never reaches a log.
    """

    scheme: str
    source: Path
    header: bytes = attrs.field(repr=False)


@attrs.frozen
class Target:
    """A scrape target: ``host:port`` plus the labels it carries into ``/sd``."""

    address: str
    labels: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def host(self) -> str:
        host, _ = address_parts(self.address)
        return host.strip("[]")

    @property
    def port(self) -> int:
        return int(address_parts(self.address)[1])


@attrs.frozen
class ProviderSpec:
    """One discovery provider of a route, as configured and checked.

    ``kind`` is ``file_sd``, ``dns_srv`` or ``plugin``; ``name`` is the label it carries
    in metrics and logs (the kind, or the plugin's name); ``settings`` are the provider's
    own, already validated; relative paths in them resolve against ``base``.
    """

    kind: ProviderKind
    name: str
    settings: Mapping[str, Any] = attrs.field(factory=dict)
    base: Path = Path(".")


@attrs.frozen
class Selector:
    """Which discovered targets a route takes, and how their addresses are rewritten.

    ``match`` maps a label name to a regular expression, anchored at both ends as in
    Prometheus (``__address__`` is the discovered address). ``port`` replaces the port;
    ``address`` is a template such as ``"{host}:9100"``. Static targets are taken as
    written.
    """

    match: Mapping[str, str] = attrs.field(factory=dict)
    port: int | None = None
    address: str | None = None


@attrs.frozen
class Route:
    """A named set of targets and the rules for reaching them.

    ``targets`` are the static ones; ``providers`` discover more at run time (the
    route's *current* members are kept by ``promgate.policy.Membership``).
    """

    name: str
    targets: tuple[Target, ...]
    scheme: Scheme = "http"
    metrics_path: str = "/metrics"
    paths: tuple[str, ...] = ("/metrics",)
    params: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()
    limits: Limits = Limits()
    timeout: float = DEFAULT_TIMEOUT
    max_response_size: int = DEFAULT_MAX_RESPONSE
    upstream_tls: UpstreamTLS = UpstreamTLS()
    labels: Mapping[str, str] = attrs.field(factory=dict)
    upstream_auth: UpstreamAuth | None = None
    providers: tuple[ProviderSpec, ...] = ()
    selector: Selector = Selector()
    #: Pass discovered ``__meta_*`` labels on in ``/sd`` (dropped by default).
    keep_meta_labels: bool = False
    #: The listeners that serve this route, as configured (empty: the default rule of
    #: :func:`route_listeners`).
    listeners: tuple[str, ...] = ()

    def has_target(self, address: str) -> bool:
        return any(t.address == address for t in self.targets)


@attrs.frozen
class Admin:
    """The admin listener: metrics, health and readiness."""

    endpoint: str = "tcp:9099:interface=127.0.0.1"


@attrs.frozen
class Audit:
    """Where and how audit records are written."""

    path: Path
    key_file: Path
    fsync: FsyncPolicy = "interval"
    fsync_interval: float = 1.0
    on_failure: OnAuditFailure = "deny"
    max_field_length: int = 1024
    aggregate_interval: float = 10.0


@attrs.frozen
class RedisSentinel:
    """Redis Sentinel, asked for the address of the current master of ``master`` before
    every connection: ``endpoints`` are the sentinels (host, port); ``password`` is the
    sentinels' own (the text of ``password_file``), kept out of ``repr``."""

    endpoints: tuple[tuple[str, int], ...]
    master: str
    password_file: Path | None = None
    password: str | None = attrs.field(default=None, repr=False)


@attrs.frozen
class RedisLimits:
    """The Redis that holds the limits shared by every worker and gateway using it.

    Either ``endpoint``, a Twisted client endpoint string (``tcp:HOST:PORT``, ``tls:...``,
    ``unix:PATH``), or ``sentinel``, the sentinels that name the current master.
    ``password`` is the text of ``password_file``, kept out of ``repr``.
    ``timeout`` bounds each request's wait for Redis; then ``on_unavailable`` decides.
    ``lease_ttl`` is how long a concurrency lease outlives its holder's last renewal.
    """

    endpoint: str | None
    password_file: Path | None = None
    password: str | None = attrs.field(default=None, repr=False)
    key_prefix: str = "promgate:"
    timeout: float = 0.05
    on_unavailable: OnLimitsUnavailable = "local"
    lease_ttl: float = 30.0
    sentinel: RedisSentinel | None = None

    @property
    def where(self) -> str:
        """The Redis in words, for logs."""
        if self.sentinel is None:
            return f"{self.endpoint}"
        sentinels = ",".join(f"{host}:{port}" for host, port in self.sentinel.endpoints)
        return f"master {self.sentinel.master!r} of sentinels {sentinels}"


@attrs.frozen
class SharedLimits:
    """``shared_limits``: route limits held as one budget across processes and hosts."""

    redis: RedisLimits


@attrs.frozen
class Config:
    """A whole, validated configuration."""

    source: Path
    listeners: tuple[Listener, ...]
    identities: Mapping[str, Identity]
    routes: Mapping[str, Route]
    admin: Admin
    audit: Audit
    files: tuple[Path, ...] = ()
    warnings: tuple[str, ...] = ()
    identity_providers: Mapping[str, IdentityProvider] = attrs.field(factory=dict)
    #: How many worker processes serve the listeners (``auto``: one per core); 1 is one
    #: process, as without the key.
    workers: int | Literal["auto"] = 1
    #: Limits shared through Redis; None keeps every limit per process.
    shared_limits: SharedLimits | None = None

    def routes_of(self, listener: str) -> Mapping[str, Route]:
        """The routes listener ``listener`` serves; to it, any other route does not exist."""
        served = route_listeners(self.listeners, self.routes)
        return {name: r for name, r in self.routes.items() if listener in served[name]}


def route_listeners(
    listeners: tuple[Listener, ...], routes: Mapping[str, Route]
) -> dict[str, frozenset[str]]:
    """Which listeners serve each route: the one rule ``/scrape``, ``/sd``, the forward
    proxy, ``tcp`` listeners, ``explain`` and ``test-policy`` all follow.

    A route's own ``listeners:`` decide when given. Otherwise a route that ``tcp``
    listeners name (``route:`` or ``sni:``) is served by those ``tcp`` listeners only, and
    any other route by every ``http`` and ``forward`` listener.
    """
    named: dict[str, set[str]] = {}
    for listener in listeners:
        for route_name in listener.named_routes():
            named.setdefault(route_name, set()).add(listener.name)
    http = frozenset(li.name for li in listeners if li.protocol in ("http", "forward"))
    out: dict[str, frozenset[str]] = {}
    for name, route in routes.items():
        if route.listeners:
            out[name] = frozenset(route.listeners)
        elif name in named:
            out[name] = frozenset(named[name])
        else:
            out[name] = http
    return out


#: The most worker processes one gateway runs.
MAX_WORKERS = 64


def worker_count(workers: int | Literal["auto"]) -> int:
    """How many worker processes ``workers`` means on this host: ``auto`` is one per CPU
    this process may run on, at most :data:`MAX_WORKERS`."""
    if workers != "auto":
        return workers
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))
