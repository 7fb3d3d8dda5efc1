"""Live reload: build the next configuration snapshot and swap it in at once.

``SIGHUP`` and ``POST``/``PUT /-/reload`` both come here. The new configuration is loaded
and checked as ``promgate check-config`` does; if it is invalid (or changes what only a
restart can change: the audit log, the admin endpoint, ``shared_limits``), nothing changes
and the reasons are returned. Otherwise, in one reactor turn:

1. every listener that is new or moved to another endpoint is bound first, so a bind
   failure refuses the reload with nothing changed;
2. listeners that keep their endpoint keep their port and their open connections: the
   next request (or connection) on them is judged by the new snapshot, requests already
   admitted finish under the old one, and open tunnels and ``tcp`` connections the new
   policy no longer allows are cut and audited ``policy_revoked``;
3. listeners that were removed (or moved) stop accepting and drain;
4. discovery and identity providers restart when their part of the configuration changed.

Rate-limit state is kept per route name, so routes that still exist keep theirs. Every
reload, applied or refused, is one audit record (``event: reload``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import attrs
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger

from promgate.access_diff import access_diff
from promgate.audit import AuditEvent, IAuditSink
from promgate.authn import Authenticator, ThreadRunner
from promgate.config.loader import check_config
from promgate.config.model import Config, Listener
from promgate.core.reasons import Reason
from promgate.discovery import Discovery
from promgate.errors import StartupError, os_error_text
from promgate.jwks import Fetch, IdentityProviderKeys
from promgate.jwt_authn import JWTVerifier
from promgate.listener_factory import Gateway, Pipeline, listener_tls, protocol_factory
from promgate.listeners.forward import ForwardGateway
from promgate.listeners.tcp import TCPGateway
from promgate.listening import ListenerService
from promgate.metrics import Metrics
from promgate.reactors import IGatewayReactor
from promgate.tls_reload import CertificateWatch, ReloadingServerTLS, TLSFilesError


class Reloadable(Protocol):
    """What a reload changes of the running gateway (promgate.service.Reloadable)."""

    config: Config
    reactor: IGatewayReactor
    metrics: Metrics
    audit: IAuditSink
    discovery: Discovery
    provider_keys: IdentityProviderKeys
    fetch_keys: Fetch | None
    authenticator: Authenticator
    run_in_thread: ThreadRunner
    bcrypt_concurrency: int
    pipeline: Pipeline
    gateways: list[Gateway]
    listeners: list[ListenerService]
    retired: list[Gateway]
    certificates: CertificateWatch | None

    def listener_service(
        self, listener: Listener, factory: IProtocolFactory
    ) -> ListenerService: ...


log = Logger()

#: How many problems a refused reload's audit record names (the rest are counted).
_MAX_PROBLEMS = 5
#: How many access changes (``promgate diff``) an applied reload's audit record lists.
_MAX_ACCESS_CHANGES = 5


@attrs.frozen
class ReloadResult:
    """What a reload did: applied, or refused and why."""

    applied: bool
    #: Why it was refused, each ``FILE:LINE: key: message`` (or one line).
    problems: tuple[str, ...] = ()
    #: What changed, in one line.
    summary: str = ""


def restart_needed(old: Config, new: Config) -> list[str]:
    """What in ``new`` only a restart can apply."""
    problems = []
    if old.audit != new.audit:
        problems.append(f"{new.source}: audit: changing the audit log takes a restart")
    if old.admin != new.admin:
        problems.append(f"{new.source}: admin: changing the admin endpoint takes a restart")
    if old.workers != new.workers:
        problems.append(f"{new.source}: workers: changing the number of workers takes a restart")
    if old.shared_limits != new.shared_limits:
        problems.append(f"{new.source}: shared_limits: changing shared limits takes a restart")
    return problems


def reload_gateway(service: Reloadable, trigger: str) -> ReloadResult:
    """Reload ``service``'s configuration file; apply it, or refuse it and say why."""
    prepared = prepare_reload(service, trigger)
    if isinstance(prepared, ReloadResult):
        return prepared
    return commit_reload(service, prepared)


@attrs.frozen
class PreparedReload:
    """The next snapshot, built (new listeners bound, TLS files read) but not applied:
    :func:`commit_reload` swaps it in, :func:`abort_reload` lets it go. Until either, the
    running gateway is as it was."""

    trigger: str
    config: Config
    #: The access changes, as the audit record's detail ends.
    access: str
    next: _Next


def prepare_reload(service: Reloadable, trigger: str) -> PreparedReload | ReloadResult:
    """Load and check the configuration file and build its snapshot without applying it;
    a refusal (a ReloadResult, audited) when it cannot be applied."""
    try:
        return _prepare(service, trigger)
    except Exception:
        # Not a problem of the file (those are reported as such): logged in full, and the
        # reload refused in one line rather than lost in the reactor's error log.
        log.failure("reload ({trigger}) failed", trigger=trigger)
        return _refused(service, trigger, ("reload failed: see the gateway's log",))


def commit_reload(service: Reloadable, prepared: PreparedReload) -> ReloadResult:
    """Swap a prepared snapshot in (nothing in it can fail half-way), and audit it."""
    try:
        summary = _commit(service, prepared.next)
    except Exception:
        log.failure("reload ({trigger}) failed", trigger=prepared.trigger)
        return _refused(service, prepared.trigger, ("reload failed: see the gateway's log",))
    summary += prepared.access
    service.metrics.process.loaded(service.reactor.seconds())
    for warning in prepared.config.warnings:
        log.warn("configuration: {problem}", problem=warning)
    log.info(
        "configuration reloaded ({trigger}): {summary}", trigger=prepared.trigger, summary=summary
    )
    service.audit.record(
        AuditEvent(event="reload", decision="allow", reason=Reason.OK, detail=summary)
    )
    return ReloadResult(True, summary=summary)


def refuse_reload(service: Reloadable, trigger: str, problems: tuple[str, ...]) -> ReloadResult:
    """A reload refused before this gateway was asked to prepare it (by the supervisor of
    worker processes), logged and audited as any refusal."""
    return _refused(service, trigger, problems)


def abort_reload(service: Reloadable, prepared: PreparedReload, why: str) -> ReloadResult:
    """Let a prepared snapshot go (its new listeners unbound), nothing applied; the
    refusal, for ``why``, is audited as any other."""
    for _, svc in prepared.next.fresh.values():
        svc.stopService()
    return _refused(service, prepared.trigger, (why,))


def _prepare(service: Reloadable, trigger: str) -> PreparedReload | ReloadResult:
    config, errors, _ = check_config(service.config.source)
    if config is None:
        return _refused(service, trigger, tuple(str(e) for e in errors))
    problems = restart_needed(service.config, config)
    if problems:
        return _refused(service, trigger, tuple(problems))
    access = access_diff(service.config, config, limit=_MAX_ACCESS_CHANGES).summary(
        limit=_MAX_ACCESS_CHANGES
    )
    try:
        next_ = _build(service, config)
    except StartupError as e:
        return _refused(service, trigger, (str(e),))
    shown = (
        f"; access: {access['granted']} newly allowed, {access['revoked']} newly denied"
        + "".join(f"; {change}" for change in access["changes"])
        + (f"; and {access['more']} more" if access["more"] else "")
    )
    return PreparedReload(trigger, config, shown, next_)


def _refused(service: Reloadable, trigger: str, problems: tuple[str, ...]) -> ReloadResult:
    service.metrics.process.refused()
    for problem in problems:
        log.error("reload ({trigger}) refused: {problem}", trigger=trigger, problem=problem)
    shown = "; ".join(problems[:_MAX_PROBLEMS])
    if len(problems) > _MAX_PROBLEMS:
        shown += f"; and {len(problems) - _MAX_PROBLEMS} more"
    service.audit.record(
        AuditEvent(event="reload", decision="deny", reason=Reason.CONFIG_INVALID, detail=shown)
    )
    return ReloadResult(False, problems)


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    parts = [f"+{k}" for k in added] + [f"-{k}" for k in removed] + [f"~{k}" for k in changed]
    return " ".join(parts) or "unchanged"


@attrs.frozen
class _Next:
    """What :func:`_build` made of a configuration, for :func:`_commit` to swap in."""

    config: Config
    discovery: Discovery
    provider_keys: IdentityProviderKeys
    authenticator: Authenticator
    pipeline: Pipeline
    watch: CertificateWatch | None
    holders: dict[str, ReloadingServerTLS]
    fresh: dict[str, tuple[Any, ListenerService]]
    kept: list[Listener]
    new_tls: dict[str, ReloadingServerTLS | None]


def _build(service: Reloadable, config: Config) -> _Next:
    """The parts of ``config``'s snapshot; a listener that cannot bind raises
    StartupError, with nothing changed."""
    old = service.config
    reactor = service.reactor
    old_listeners = {li.name: li for li in old.listeners}

    # The parts a snapshot is built from: discovery and keys only when their part changed.
    discovery = service.discovery
    if old.routes != config.routes:
        discovery = Discovery(config.routes, reactor, metrics=service.metrics)
    provider_keys = service.provider_keys
    if old.identity_providers != config.identity_providers:
        provider_keys = IdentityProviderKeys(
            config.identity_providers,
            reactor,
            fetch=service.fetch_keys,
            metrics=service.metrics.identity_providers,
        )
    authenticator = _authenticator(service, config, provider_keys)
    pipeline = attrs.evolve(
        service.pipeline, authenticator=authenticator, membership=discovery.membership
    )

    # 1. Read the TLS files of what is new or changed, and bind what is new or moved,
    #    before anything running changes.
    watch = service.certificates
    holders = {h.listener: h for h in (watch.servers if watch is not None else ())}
    fresh: dict[str, tuple[Any, ListenerService]] = {}
    kept: list[Listener] = []
    new_tls: dict[str, ReloadingServerTLS | None] = {}
    try:
        for listener in config.listeners:
            before = old_listeners.get(listener.name)
            if before is not None and before.endpoint == listener.endpoint:
                kept.append(listener)
                if before.tls != listener.tls or before.protocol != listener.protocol:
                    new_tls[listener.name] = _tls(service, listener)
                continue
            gateway = pipeline.gateway(listener, config)
            tls = new_tls[listener.name] = _tls(service, listener)
            factory = protocol_factory(listener, gateway, reactor, tls)
            svc = service.listener_service(listener, factory)
            svc.privilegedStartService()
            fresh[listener.name] = (gateway, svc)
    except Exception:
        # Whatever stopped the build (a listener that cannot bind, or something no check
        # foresaw), the listeners it bound already are let go: nothing changed.
        for _, svc in fresh.values():
            svc.stopService()
        raise

    return _Next(
        config,
        discovery,
        provider_keys,
        authenticator,
        pipeline,
        watch,
        holders,
        fresh,
        kept,
        new_tls,
    )


def _commit(service: Reloadable, n: _Next) -> str:
    """Swap a built snapshot in: from here on nothing can fail half-way."""
    old, config, reactor = service.config, n.config, service.reactor
    old_listeners = {li.name: li for li in old.listeners}
    running = {
        li.name: (gw, svc)
        for li, gw, svc in zip(old.listeners, service.gateways, service.listeners, strict=True)
    }
    discovery, provider_keys, authenticator, pipeline = (
        n.discovery,
        n.provider_keys,
        n.authenticator,
        n.pipeline,
    )
    watch, holders, fresh, kept, new_tls = n.watch, n.holders, n.fresh, n.kept, n.new_tls
    gateways: list[Any] = []
    services: list[ListenerService] = []
    revoked = 0
    for listener in config.listeners:
        if listener.name in fresh:
            gateway, svc = fresh[listener.name]
            svc.startService()
            log.info("listener {name} on {address}", name=listener.name, address=svc.address())
        else:
            old_gateway, svc = running[listener.name]
            before = old_listeners[listener.name]
            gateway, cut = _reconfigure(pipeline, listener, before, config, old_gateway)
            revoked += cut
            replaced = listener.protocol != before.protocol
            if replaced:
                service.retired.append(old_gateway)
                _drain(old_gateway)
            if listener.name in new_tls or replaced:
                tls = new_tls.get(listener.name)
                _replace_factory(svc, protocol_factory(listener, gateway, reactor, tls))
        gateways.append(gateway)
        services.append(svc)
    kept_names = {li.name for li in kept}
    for name, (old_gateway, svc) in running.items():
        if name in kept_names:
            continue
        svc.stopService()
        service.retired.append(old_gateway)
        _drain(old_gateway)

    if watch is not None:
        served = {**holders, **new_tls}
        watch.watch([tls for li in config.listeners if (tls := served.get(li.name)) is not None])
        # Every file the configuration names is read again, as on a restart; a listener
        # whose new files are not usable keeps serving the ones it had.
        kept_tls = [r for r in watch.reload() if not r.ok]
        tls_note = f"; TLS files kept as served for {len(kept_tls)} listener(s)" if kept_tls else ""
    else:
        tls_note = ""
    if discovery is not service.discovery:
        _replace_child(service, service.discovery, discovery)
        service.discovery = discovery
    if provider_keys is not service.provider_keys:
        _replace_child(service, service.provider_keys, provider_keys)
        service.provider_keys = provider_keys
    # Retired gateways are kept while they still hold connections, for the shutdown.
    service.retired = [gw for gw in service.retired if _holds_connections(gw)]
    service.authenticator = authenticator
    service.pipeline = pipeline
    service.gateways = gateways
    service.listeners = services
    service.config = config
    return (
        f"listeners {_changed(old_listeners, {li.name: li for li in config.listeners})}; "
        f"identities {_changed(old.identities, config.identities)}; "
        f"routes {_changed(old.routes, config.routes)}; "
        f"open tunnels and connections revoked: {revoked}{tls_note}"
    )


def _authenticator(
    service: Reloadable, config: Config, provider_keys: IdentityProviderKeys
) -> Authenticator:
    jwt = (
        JWTVerifier(
            config.identity_providers,
            config.identities,
            provider_keys.keys,
            service.reactor,
            metrics=service.metrics.identity_providers,
        )
        if config.identity_providers
        else None
    )
    return Authenticator(
        config.identities,
        jwt=jwt,
        run_in_thread=service.run_in_thread,
        clock=service.reactor,
        metrics=service.metrics,
        concurrency=service.bcrypt_concurrency,
    )


def _reconfigure(
    pipeline: Any, listener: Listener, before: Listener, config: Config, gateway: Any
) -> tuple[Any, int]:
    """The gateway behind a listener that keeps its endpoint, under ``config``: the same
    one reconfigured (its connections kept) when its kind is unchanged, else a new one.
    Also how many open tunnels or connections the new policy cut."""
    if listener.protocol != before.protocol:
        return pipeline.gateway(listener, config), 0
    if isinstance(gateway, TCPGateway):
        return gateway, gateway.reconfigure(listener, config)
    new = pipeline.gateway(listener, config, reuse=gateway.http)
    cut = new.revoke_tunnels(config.identities) if isinstance(new, ForwardGateway) else 0
    return new, cut


def _tls(service: Reloadable, listener: Listener) -> ReloadingServerTLS | None:
    """A listener's server TLS, read from its files now; a file that cannot be used
    refuses the reload."""
    try:
        return listener_tls(listener, service.reactor, service.metrics)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise StartupError(f"listener {listener.name}: {where}{os_error_text(e)}") from e
    except TLSFilesError as e:
        raise StartupError(f"listener {listener.name}: {e}") from e


def _replace_factory(svc: ListenerService, factory: Any) -> None:
    """New connections on a running port are built by ``factory`` from now on."""
    svc.factory = factory
    port = svc.port
    if port is not None and hasattr(port, "factory"):
        port.factory = factory


def _holds_connections(gateway: Any) -> bool:
    held = gateway if isinstance(gateway, TCPGateway) else gateway.http
    return len(held.open) > 0


def _drain(gateway: Any) -> None:
    """A gateway that no longer serves: idle connections close now, the others once their
    answer is written (tunnels and tcp connections end by themselves, or at shutdown)."""
    http = getattr(gateway, "http", None)
    if http is not None:
        http.begin_drain()


def _replace_child(service: Reloadable, old: Any, new: Any) -> None:
    old.disownServiceParent()
    old.stopService()
    new.setServiceParent(service)


def retired_connections(retired: Iterable[Any]) -> list[Any]:
    """What holds the open connections of gateways a reload retired."""
    return [gw if isinstance(gw, TCPGateway) else gw.http for gw in retired]


__all__ = [
    "PreparedReload",
    "ReloadResult",
    "abort_reload",
    "commit_reload",
    "prepare_reload",
    "refuse_reload",
    "reload_gateway",
    "restart_needed",
    "retired_connections",
]
