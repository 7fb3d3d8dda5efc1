"""Assemble a running gateway from a validated configuration."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from promgate.admin import Readiness, admin_site
from promgate.audit import AuditEvent, AuditLog, IAuditSink
from promgate.audit_aggregate import AggregatingSink
from promgate.audit_chains import chain_path, worker_note
from promgate.authn import Authenticator, BcryptThreads, ThreadRunner
from promgate.config.model import Config, Listener
from promgate.core.reasons import Reason
from promgate.discovery import Discovery
from promgate.errors import StartupError, os_error_text
from promgate.http.listener import HTTPListener
from promgate.http.upstream import UpstreamPool
from promgate.jwks import Fetch, IdentityProviderKeys
from promgate.jwt_authn import JWTVerifier
from promgate.listener_factory import Gateway, Pipeline, listener_tls, protocol_factory
from promgate.listeners.tcp import TCPGateway
from promgate.listening import ListenerService
from promgate.metrics import Metrics, SharedLimitsMetrics
from promgate.ratelimit import RateLimiter
from promgate.reactors import IGatewayReactor
from promgate.reload import ReloadResult, reload_gateway
from promgate.shared_limits import SharedLimiter, shared_limiter
from promgate.systemd import SystemdNotifier
from promgate.tls_reload import CertificateWatch, TLSFilesError
from promgate.tls_reload import ReloadResult as TLSReloadResult
from promgate.worker_slot import WorkerSlot

__all__ = ["ABORT_GRACE", "DRAIN_TIMEOUT", "GatewayService", "Pipeline"]

#: How long SIGTERM waits for in-flight scrapes, and then for the connections that carried
#: their answers to close, before cutting what is left.
DRAIN_TIMEOUT = 10.0
#: How long connections cut at the end of the drain may take to be gone (and audited).
ABORT_GRACE = 2.0


class GatewayService(MultiService):
    """The whole gateway: audit log, listeners, upstream pool and admin listener.

    Start-up reads the key and certificate files and binds every listener first (in
    ``privilegedStartService``, before ``twistd --uid`` drops privileges), then opens the
    audit log and writes ``start``, then the ready file: a start-up that fails writes
    nothing. The audit log stops last, so ``start`` and ``stop`` bracket every request
    record. On stop, the listeners close, ``/-/ready`` answers 503 while in-flight work
    drains and the connections that carried it close, then the admin listener closes.

    The constructor reads no file. What the gateway takes from the process that runs it can
    be replaced, as the in-memory test kit (:mod:`promgate.testing.memory`) does:
    ``audit_sink`` stands in for the configured audit log file (a service, if it is one,
    started and stopped with the gateway), ``run_in_thread`` for bcrypt's own thread pool,
    ``install_signal_handlers=False`` leaves the process's SIGHUP and SIGUSR1 (audit log
    rotation) alone, ``fetch_keys`` answers the identity providers' discovery and JWKS
    requests instead of HTTP, and ``notifier`` tells systemd (``$NOTIFY_SOCKET``, if set)
    when it is ready, reloading and stopping.

    As one of its supervisor's worker processes (``worker``, see :mod:`promgate.workers`),
    it writes that slot's audit chain (:mod:`promgate.audit_chains`), listens on the
    sockets it was handed (``descriptors``, by listener name) instead of binding, and has
    no admin listener, signal handlers or systemd notifications of its own: the supervisor
    does those for every worker.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: IGatewayReactor,
        *,
        ready_file: Path | None = None,
        audit_sink: IAuditSink | None = None,
        run_in_thread: ThreadRunner | None = None,
        install_signal_handlers: bool = True,
        fetch_keys: Fetch | None = None,
        notifier: SystemdNotifier | None = None,
        worker: WorkerSlot | None = None,
        descriptors: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.reactor = reactor
        self.ready_file = ready_file
        #: Which of its supervisor's workers this gateway is (None: the only process).
        self.worker = worker
        #: Listening sockets bound for it, by listener name, listened on instead of
        #: binding; each is used once (a reload hands over new ones for what moved).
        self.descriptors: dict[str, int] = dict(descriptors or {})
        self.install_signal_handlers = install_signal_handlers and worker is None
        if worker is not None:  # its supervisor speaks to systemd
            notifier = SystemdNotifier(None)
        self.notifier = notifier if notifier is not None else SystemdNotifier.from_environment()
        self.metrics = Metrics()
        audit_cfg = config.audit
        self.audit: IAuditSink
        if audit_sink is None:
            self.audit = AuditLog(
                chain_path(audit_cfg.path, worker),  # each worker its own chain
                audit_cfg.key_file,  # read when start-up begins
                reactor,
                fsync=audit_cfg.fsync,
                fsync_interval=audit_cfg.fsync_interval,
                max_field_length=audit_cfg.max_field_length,
                on_result=self.metrics.audit_result,
                on_reopen=self.metrics.audit_reopens.inc,
                on_head=self.metrics.audit_head.update,
                batch=True,
                note=worker_note(worker),
            )
        else:
            self.audit = audit_sink
        if IService.providedBy(self.audit):
            IService(self.audit).setServiceParent(self)
        # What the listeners write to: refusals of unauthenticated peers are counted, not
        # written one by one. Stopped before the audit log, so pending counts come before
        # its ``stop`` record.
        self.records = AggregatingSink(
            self.audit,
            reactor,
            audit_cfg.aggregate_interval,
            on_aggregated=self.metrics.audit_records_aggregated.inc,
        )
        self.records.setServiceParent(self)  # type: ignore[no-untyped-call]
        # Discovery starts before the listeners (file_sd is read at once), and keeps the
        # routes' current targets in one Membership that every listener checks.
        self.discovery = Discovery(config.routes, reactor, metrics=self.metrics)
        self.discovery.setServiceParent(self)  # type: ignore[no-untyped-call]
        deny = audit_cfg.on_failure == "deny"
        self.readiness = Readiness(
            lambda: bool(self.audit.healthy) or not deny, lambda: self.discovery.settled()
        )
        self.limiter = RateLimiter(reactor)
        # Limits shared through Redis: connected before the listeners start, closed
        # after they have drained.
        self.shared_limiter: SharedLimiter | None = None
        if config.shared_limits is not None:
            self.shared_limiter = shared_limiter(
                config.shared_limits.redis,
                reactor,
                self.limiter,
                SharedLimitsMetrics(self.metrics.registry),
            )
            self.shared_limiter.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.pool = UpstreamPool(
            reactor,
            on_connect=lambda route: self.metrics.upstream_connections.labels(route).inc(),
        )
        # One authenticator (and one bcrypt cache) for every listener, with bcrypt on a
        # thread pool of its own unless a runner is given.
        self.bcrypt_threads: BcryptThreads | None = None
        if run_in_thread is None:
            self.bcrypt_threads = run_in_thread = BcryptThreads(reactor)
        self.run_in_thread = run_in_thread
        self.bcrypt_concurrency = self.bcrypt_threads.size if self.bcrypt_threads is not None else 2
        self.fetch_keys = fetch_keys
        # Identity providers' keys are fetched while the gateway runs; readiness never
        # waits for them (an issuer that is down must not take scrapes down).
        self.provider_keys = IdentityProviderKeys(
            config.identity_providers,
            reactor,
            fetch=fetch_keys,
            metrics=self.metrics.identity_providers,
        )
        self.provider_keys.setServiceParent(self)  # type: ignore[no-untyped-call]
        jwt = (
            JWTVerifier(
                config.identity_providers,
                config.identities,
                self.provider_keys.keys,
                reactor,
                metrics=self.metrics.identity_providers,
            )
            if config.identity_providers
            else None
        )
        self.authenticator = Authenticator(
            config.identities,
            jwt=jwt,
            run_in_thread=run_in_thread,
            clock=reactor,
            metrics=self.metrics,
            concurrency=self.bcrypt_concurrency,
        )
        self.pipeline = Pipeline(
            reactor=reactor,
            limiter=self.limiter,
            audit=self.records,
            metrics=self.metrics,
            pool=self.pool,
            authenticator=self.authenticator,
            membership=self.discovery.membership,
            shared=self.shared_limiter,
        )
        #: One gateway per configured listener, in the configuration's order.
        self.gateways: list[Gateway] = [
            self.pipeline.gateway(listener, config) for listener in config.listeners
        ]
        #: The configured listeners as services; made (certificate files read) when
        #: start-up begins.
        self.listeners: list[ListenerService] = []
        #: Gateways a reload took out of service, whose connections may still be open.
        self.retired: list[Gateway] = []
        #: Watches the TLS listeners' files; made with the listeners.
        self.certificates: CertificateWatch | None = None
        #: Last to close: it answers /-/ready with 503 while the others drain. A worker
        #: has none: its supervisor answers for every worker.
        self.admin: ListenerService | None = None
        if worker is None:
            self.admin = ListenerService(
                "admin",
                config.admin.endpoint,
                admin_site(
                    self.metrics.registry, self.readiness, reactor, reload=self._admin_reload
                ),
                reactor,
                clock=reactor,
            )
        self._bound = False
        self._previous_sighup: Any = None
        self._previous_sigusr1: Any = None

    def _listener_services(self) -> list[ListenerService]:
        services = []
        watched = []
        for listener, gateway in zip(self.config.listeners, self.gateways, strict=True):
            try:
                tls = listener_tls(listener, self.reactor, self.metrics)
            except OSError as e:
                where = f"{e.filename}: " if e.filename else ""
                raise StartupError(f"listener {listener.name}: {where}{os_error_text(e)}") from e
            except TLSFilesError as e:
                raise StartupError(f"listener {listener.name}: {e}") from e
            if tls is not None:
                watched.append(tls)
            factory: IProtocolFactory = protocol_factory(listener, gateway, self.reactor, tls)
            services.append(self.listener_service(listener, factory))
        self.certificates = CertificateWatch(watched, self.reactor, on_reload=self._tls_reloaded)
        self.certificates.setServiceParent(self)  # type: ignore[no-untyped-call]
        return services

    def _tls_reloaded(self, result: TLSReloadResult) -> None:
        """A listener's TLS files, changed on disk, were loaded (or could not be): a change
        of what the gateway presents, or trusts, is in the audit trail."""
        self.audit.record(
            AuditEvent(
                event="tls_reload",
                decision="allow" if result.ok else "deny",
                reason=Reason.OK if result.ok else Reason.CONFIG_INVALID,
                detail=result.message,
            )
        )

    def listener_service(self, listener: Listener, factory: IProtocolFactory) -> ListenerService:
        """A listener as a service: on the socket handed over for it, if there is one."""
        return ListenerService(
            listener.name,
            listener.endpoint,
            factory,
            self.reactor,
            clock=self.reactor,
            descriptor=self.descriptors.pop(listener.name, None),
        )

    def own_listeners(self) -> list[ListenerService]:
        """The configured listeners, and the admin listener if this process has one."""
        return [*self.listeners, *([self.admin] if self.admin is not None else [])]

    def privilegedStartService(self) -> None:
        """Read the certificate and key files and bind every listener, before twistd drops
        privileges and before anything is written; a listener that cannot bind is a
        StartupError, and none stays bound."""
        if not self.listeners:
            self.listeners = self._listener_services()
        bound: list[ListenerService] = []
        try:
            for listener in self.own_listeners():
                listener.privilegedStartService()
                bound.append(listener)
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except StartupError:
            for listener in bound:
                listener.stopService()
            raise
        self._bound = True

    def startService(self) -> None:
        """Open the audit log (``start``), start the rest, then write the ready file."""
        if not self._bound:  # started without privilegedStartService
            self.privilegedStartService()
        try:
            super().startService()  # type: ignore[no-untyped-call]
        except StartupError:
            self._unbind()
            raise
        except OSError as e:
            self._unbind()
            if not isinstance(self.audit, AuditLog) or self.audit.running:
                raise
            raise StartupError(f"audit log {self.audit.path}: {os_error_text(e)}") from e
        for warning in self.config.warnings:
            # Not ``warning=``: legacy log observers take that key for a warnings.warn().
            self.log.warn("configuration: {problem}", problem=warning)
        for listener in self.own_listeners():
            listener.startService()
            self.log.info(
                "listener {name} on {address}",
                name=listener.listener_name,
                address=listener.address(),
            )
        if self.install_signal_handlers:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
            self._previous_sigusr1 = signal.signal(signal.SIGUSR1, self._on_sigusr1)
        self.pool.start()
        if self.bcrypt_threads is not None:
            self.bcrypt_threads.start()
        self.metrics.process.loaded(self.reactor.seconds())
        self.readiness.ready = True
        if self.ready_file is not None:
            self._write_ready_file(self.ready_file)
        self.notifier.notify_ready(self._serving())

    def _unbind(self) -> None:
        for listener in self.own_listeners():
            listener.stopService()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.readiness.ready = False
        self.notifier.notify_stopping("stopping: draining in-flight requests")
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        if self._previous_sigusr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_sigusr1)
            self._previous_sigusr1 = None
        deadline = self.reactor.seconds() + DRAIN_TIMEOUT
        await DeferredList([listener.stopService() for listener in self.listeners])
        await self._drain(deadline)
        await self._close_connections(deadline)
        if self.admin is not None:
            await self.admin.stopService()
        self.pool.stop()
        if self.bcrypt_threads is not None:
            self.bcrypt_threads.stop()
        await super().stopService()  # type: ignore[no-untyped-call]

    def _on_sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self._sighup)

    def _on_sigusr1(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.rotate_audit_log)

    def rotate_audit_log(self) -> None:
        """Reopen the audit log's path after logrotate renamed the file (SIGUSR1); a worker
        reopens its own chain's file."""
        if isinstance(self.audit, AuditLog):
            self.audit.rotate()

    def _sighup(self) -> None:
        self.reload("SIGHUP")

    def reload(self, trigger: str) -> ReloadResult:
        """Reload the configuration file (``SIGHUP``, ``/-/reload``): see promgate.reload.
        systemd hears ``RELOADING=1`` before and ``READY=1`` after, applied or not."""
        self.notifier.notify_reloading()
        try:
            return reload_gateway(self, trigger)
        finally:
            self.notifier.notify_ready(self._serving())

    def _admin_reload(self) -> tuple[bool, str]:
        result = self.reload("/-/reload")
        if result.applied:
            return True, f"reloaded: {result.summary}\n"
        return False, "".join(f"{problem}\n" for problem in result.problems)

    async def _drain(self, deadline: float) -> None:
        """Let relayed requests finish, up to ``deadline``, before connections close.

        Idle keep-alive connections close at once, and every other one closes once its
        answer is written. Tunnels and TCP connections live as long as their clients
        want, so they are not waited for: they are cut, and audited, next.
        """
        relaying = [gw for gw in self._connections() if isinstance(gw, HTTPListener)]
        for gw in relaying:
            gw.begin_drain()
        pending = sum(gw.exchanges for gw in relaying)
        if not pending:
            return
        self.log.info("draining {count} in-flight request(s)", count=pending)
        if not await self._within([gw.in_flight.when_idle() for gw in relaying], deadline):
            self.log.warn(
                "{count} request(s) still in flight at shutdown",
                count=sum(gw.exchanges for gw in relaying),
            )

    async def _close_connections(self, deadline: float) -> None:
        """Close every connection before the audit log stops, so that each is audited.

        A connection whose answers are all written closes once they have been sent (over
        TLS, with a close_notify), up to ``deadline``; what is cut (requests still in
        flight, tunnels, TCP connections) or left at the deadline is aborted.
        """
        for gw in self._connections():
            gw.shut_down_connections()
        if await self._within(self._all_closed(), deadline):
            return
        left = sum(len(gw.open) for gw in self._connections())
        self.log.warn("{count} connection(s) cut at the shutdown deadline", count=left)
        for gw in self._connections():
            gw.abort_connections()
        await self._within(self._all_closed(), self.reactor.seconds() + ABORT_GRACE)

    def _all_closed(self) -> list[Deferred[None]]:
        return [gw.open.when_empty() for gw in self._connections()]

    def _connections(self) -> list[HTTPListener | TCPGateway]:
        """What holds each listener's open connections, retired ones included."""
        return [
            gw if isinstance(gw, TCPGateway) else gw.http for gw in [*self.gateways, *self.retired]
        ]

    async def _within(self, waits: list[Deferred[None]], deadline: float) -> bool:
        """Wait for every one of ``waits`` until ``deadline``; whether they all fired."""

        def give_up() -> None:
            for d in waits:
                d.cancel()
                d.addErrback(_ignore_cancelled)

        timer = self.reactor.callLater(max(0.0, deadline - self.reactor.seconds()), give_up)
        try:
            for d in waits:
                await d
        except CancelledError:
            return False
        finally:
            if timer.active():
                timer.cancel()
            give_up()  # forget the ones still waiting (a fired Deferred ignores this)
        return True

    def addresses(self) -> dict[str, str]:
        return {listener.listener_name: listener.address() for listener in self.own_listeners()}

    def _serving(self) -> str:
        """What ``systemctl status`` shows once the gateway is ready."""
        listeners = ", ".join(f"{name} {where}" for name, where in self.addresses().items())
        return f"serving: {listeners}"

    def _write_ready_file(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "listeners": self.addresses()}) + "\n")
        tmp.replace(path)


def _ignore_cancelled(failure: Failure) -> None:
    failure.trap(CancelledError)
