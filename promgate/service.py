"""Assemble a running gateway from a validated configuration."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from promgate.admin import Readiness, admin_site
from promgate.audit import AuditEvent, AuditLog, load_key
from promgate.audit_aggregate import AggregatingSink
from promgate.authn import Authenticator, BcryptThreads
from promgate.config.model import Config, Listener
from promgate.discovery import Discovery
from promgate.errors import StartupError, os_error_text
from promgate.http.listener import HTTPListener
from promgate.http.server import HTTPListenerFactory
from promgate.http.upstream import UpstreamPool
from promgate.listeners.forward import ForwardGateway
from promgate.listeners.scrape import ReverseGateway
from promgate.listeners.tcp import TCPGateway, TCPGatewayFactory
from promgate.listening import ListenerService
from promgate.metrics import Metrics
from promgate.net.relay_upstream import EndpointConnector
from promgate.ratelimit import RateLimiter
from promgate.tls import server_tls

#: How long SIGTERM waits for in-flight scrapes, and then for the connections that carried
#: their answers to close, before cutting what is left.
DRAIN_TIMEOUT = 10.0
#: How long connections cut at the end of the drain may take to be gone (and audited).
ABORT_GRACE = 2.0


class GatewayService(MultiService):
    """The whole gateway: audit log, listeners, upstream pool and admin listener.

    Start-up binds every listener first (in ``privilegedStartService``), then opens the
    audit log and writes ``start``, then the ready file: a start-up that fails writes
    nothing. The audit log stops last, so ``start`` and ``stop`` bracket every request
    record. On stop, the listeners close, ``/-/ready`` answers 503 while in-flight work
    drains and the connections that carried it close, then the admin listener closes.
    """

    log = Logger()

    def __init__(self, config: Config, reactor: Any, *, ready_file: Path | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.reactor = reactor
        self.ready_file = ready_file
        self.metrics = Metrics()
        audit_cfg = config.audit
        self.audit = AuditLog(
            audit_cfg.path,
            load_key(audit_cfg.key_file),
            reactor,
            fsync=audit_cfg.fsync,
            fsync_interval=audit_cfg.fsync_interval,
            max_field_length=audit_cfg.max_field_length,
            on_result=self.metrics.audit_result,
            on_reopen=self.metrics.audit_reopens.inc,
        )
        self.audit.setServiceParent(self)  # type: ignore[no-untyped-call]
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
        self.readiness = Readiness(lambda: self.audit.healthy or not deny, self.discovery.settled)
        self.limiter = RateLimiter(reactor)
        self.pool = UpstreamPool(
            reactor,
            on_connect=lambda route: self.metrics.upstream_connections.labels(route).inc(),
        )
        self.listeners: list[ListenerService] = []
        self.gateways: list[HTTPListener | TCPGateway] = []
        # One authenticator (and one bcrypt cache) for every listener, with bcrypt on a
        # thread pool of its own.
        self.bcrypt_threads = BcryptThreads(reactor)
        self.authenticator = Authenticator(
            config.identities,
            run_in_thread=self.bcrypt_threads,
            clock=reactor,
            metrics=self.metrics,
            concurrency=self.bcrypt_threads.size,
        )
        for listener in config.listeners:
            if listener.protocol == "tcp":
                self._add_tcp_listener(listener)
                continue
            handler: ReverseGateway | ForwardGateway
            if listener.protocol == "forward":
                handler = ForwardGateway(
                    listener,
                    config,
                    reactor=reactor,
                    clock=reactor,
                    limiter=self.limiter,
                    audit=self.records,
                    metrics=self.metrics,
                    pool=self.pool,
                    authenticator=self.authenticator,
                    membership=self.discovery.membership,
                )
            else:
                handler = ReverseGateway(
                    listener,
                    config,
                    clock=reactor,
                    limiter=self.limiter,
                    audit=self.records,
                    metrics=self.metrics,
                    pool=self.pool,
                    authenticator=self.authenticator,
                    membership=self.discovery.membership,
                )
            self.gateways.append(handler.http)
            factory: Any = HTTPListenerFactory(handler.http)
            if listener.tls is not None:
                factory = TLSMemoryBIOFactory(server_tls(listener.tls), False, factory)
            factory.noisy = False
            self.listeners.append(
                ListenerService(listener.name, listener.endpoint, factory, reactor)
            )
        #: Last to close: it answers /-/ready with 503 while the others drain.
        self.admin = ListenerService(
            "admin",
            config.admin.endpoint,
            admin_site(self.metrics.registry, self.readiness),
            reactor,
        )
        self._previous_sighup: Any = None

    def _add_tcp_listener(self, listener: Listener) -> None:
        gateway = TCPGateway(
            listener,
            self.config,
            clock=self.reactor,
            limiter=self.limiter,
            audit=self.records,
            metrics=self.metrics,
            connector=EndpointConnector(
                self.reactor, connect_timeout=listener.deadlines.upstream_connect
            ),
        )
        self.gateways.append(gateway)
        factory: Any = TCPGatewayFactory(gateway)
        if listener.tls is not None and gateway.settings.mode == "terminate":
            # No ALPN: the relayed protocol is the client's business, not the gateway's.
            factory = TLSMemoryBIOFactory(server_tls(listener.tls, alpn=None), False, factory)
        factory.noisy = False
        self.listeners.append(
            ListenerService(listener.name, listener.endpoint, factory, self.reactor)
        )

    def privilegedStartService(self) -> None:
        """Bind every listener, before twistd drops privileges and before anything is
        written; a listener that cannot bind is a StartupError, and none stays bound."""
        bound: list[ListenerService] = []
        try:
            for listener in [*self.listeners, self.admin]:
                listener.privilegedStartService()
                bound.append(listener)
        except StartupError:
            for listener in bound:
                listener.stopService()
            raise
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        """Open the audit log (``start``), start the rest, then write the ready file."""
        if self.admin.port is None:  # started without privilegedStartService
            self.privilegedStartService()
        try:
            super().startService()  # type: ignore[no-untyped-call]
        except StartupError:
            self._unbind()
            raise
        except OSError as e:
            self._unbind()
            if self.audit.running:
                raise
            raise StartupError(f"audit log {self.audit.path}: {os_error_text(e)}") from e
        for warning in self.config.warnings:
            self.log.warn("configuration: {warning}", warning=warning)
        for listener in [*self.listeners, self.admin]:
            listener.startService()
            self.log.info(
                "listener {name} on {address}",
                name=listener.listener_name,
                address=listener.address(),
            )
        self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
        self.pool.start()
        self.bcrypt_threads.start()
        self.metrics.config_last_reload_successful.set(1)
        self.metrics.config_last_reload_success_timestamp.set(self.reactor.seconds())
        self.readiness.ready = True
        if self.ready_file is not None:
            self._write_ready_file(self.ready_file)

    def _unbind(self) -> None:
        for listener in [*self.listeners, self.admin]:
            listener.stopService()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.readiness.ready = False
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        deadline = self.reactor.seconds() + DRAIN_TIMEOUT
        await DeferredList([listener.stopService() for listener in self.listeners])
        await self._drain(deadline)
        await self._close_connections(deadline)
        await self.admin.stopService()
        self.pool.stop()
        self.bcrypt_threads.stop()
        await super().stopService()  # type: ignore[no-untyped-call]

    def _on_sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self._sighup)

    def _sighup(self) -> None:
        # SIGHUP's default action would kill the gateway without a stop record.
        self.log.warn(
            "SIGHUP received: configuration reload is not available in this version; "
            "the running configuration stays in force"
        )
        self.audit.record(AuditEvent(event="reload", decision="deny", reason="reload_unsupported"))

    async def _drain(self, deadline: float) -> None:
        """Let relayed requests finish, up to ``deadline``, before connections close.

        Idle keep-alive connections close at once, and every other one closes once its
        answer is written. Tunnels and TCP connections live as long as their clients
        want, so they are not waited for: they are cut, and audited, next.
        """
        relaying = [gw for gw in self.gateways if isinstance(gw, HTTPListener)]
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
        for gw in self.gateways:
            gw.shut_down_connections()
        if await self._within(self._all_closed(), deadline):
            return
        left = sum(len(gw.open) for gw in self.gateways)
        self.log.warn("{count} connection(s) cut at the shutdown deadline", count=left)
        for gw in self.gateways:
            gw.abort_connections()
        await self._within(self._all_closed(), self.reactor.seconds() + ABORT_GRACE)

    def _all_closed(self) -> list[Deferred[None]]:
        return [gw.open.when_empty() for gw in self.gateways]

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
        return {
            listener.listener_name: listener.address() for listener in [*self.listeners, self.admin]
        }

    def _write_ready_file(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "listeners": self.addresses()}) + "\n")
        tmp.replace(path)


def _ignore_cancelled(failure: Failure) -> None:
    failure.trap(CancelledError)
