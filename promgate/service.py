"""Assemble a running gateway from a validated configuration."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from promgate.admin import Readiness, admin_site
from promgate.audit import AuditEvent, AuditLog, load_key
from promgate.authn import Authenticator, BcryptThreads
from promgate.config.model import Config, Listener
from promgate.discovery import Discovery
from promgate.metrics import Metrics
from promgate.proxy.forward import ForwardGateway, ForwardGatewayFactory
from promgate.proxy.http import ReverseGateway, ReverseGatewayFactory
from promgate.proxy.tcp import EndpointConnector, TCPGateway, TCPGatewayFactory
from promgate.proxy.upstream import UpstreamPool
from promgate.ratelimit import RateLimiter
from promgate.tls import server_tls

#: How long SIGTERM waits for in-flight scrapes before cutting what is left.
DRAIN_TIMEOUT = 10.0


class GatewayService(MultiService):
    """The whole gateway: audit log, listeners, upstream pool and admin listener.

    The audit log starts first and stops last, so the ``start`` and ``stop`` records
    bracket every request record.
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
        self._factories: list[tuple[str, str, Any]] = []
        self.gateways: list[ReverseGateway | TCPGateway] = []
        # One authenticator (and one bcrypt cache) for every listener, with bcrypt on a
        # thread pool of its own.
        self.bcrypt_threads = BcryptThreads(reactor)
        self.authenticator = Authenticator(config.identities, run_in_thread=self.bcrypt_threads)
        for listener in config.listeners:
            if listener.protocol == "tcp":
                self._add_tcp_listener(listener)
                continue
            shared: dict[str, Any] = dict(
                clock=reactor,
                limiter=self.limiter,
                audit=self.audit,
                metrics=self.metrics,
                pool=self.pool,
                authenticator=self.authenticator,
                membership=self.discovery.membership,
            )
            factory: Any
            if listener.protocol == "forward":
                forward = ForwardGateway(listener, config, reactor=reactor, **shared)
                gateway: ReverseGateway = forward
                factory = ForwardGatewayFactory(forward)
            else:
                gateway = ReverseGateway(listener, config, **shared)
                factory = ReverseGatewayFactory(gateway)
            self.gateways.append(gateway)
            if listener.tls is not None:
                factory = TLSMemoryBIOFactory(server_tls(listener.tls), False, factory)
            factory.noisy = False
            self._factories.append((listener.name, listener.endpoint, factory))
        self._factories.append(
            ("admin", config.admin.endpoint, admin_site(self.metrics.registry, self.readiness))
        )
        self.ports: dict[str, IListeningPort] = {}
        self._previous_sighup: Any = None

    def _add_tcp_listener(self, listener: Listener) -> None:
        gateway = TCPGateway(
            listener,
            self.config,
            clock=self.reactor,
            limiter=self.limiter,
            audit=self.audit,
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
        self._factories.append((listener.name, listener.endpoint, factory))

    def startService(self) -> None:
        for warning in self.config.warnings:
            self.log.warn("configuration: {warning}", warning=warning)
        super().startService()  # type: ignore[no-untyped-call]
        self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
        self.pool.start()
        self.bcrypt_threads.start()
        for name, description, factory in self._factories:
            endpoint = serverFromString(self.reactor, description)
            result: list[Any] = []
            endpoint.listen(factory).addBoth(result.append)
            if not result:
                raise RuntimeError(f"listener {name}: {description} did not start synchronously")
            if isinstance(result[0], Failure):
                result[0].raiseException()
            self.ports[name] = result[0]
            self.log.info("listener {name} on {address}", name=name, address=_where(result[0]))
        self.metrics.config_last_reload_successful.set(1)
        self.metrics.config_last_reload_success_timestamp.set(self.reactor.seconds())
        self.readiness.ready = True
        if self.ready_file is not None:
            self._write_ready_file(self.ready_file)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.readiness.ready = False
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        ports = list(self.ports.values())
        self.ports.clear()
        for port in ports:
            await maybeDeferred(port.stopListening)
        await self._drain()
        await self._close_connections()
        self.pool.stop()
        self.bcrypt_threads.stop()
        await maybeDeferred(super().stopService)

    def _on_sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self._sighup)

    def _sighup(self) -> None:
        # SIGHUP's default action would kill the gateway without a stop record.
        self.log.warn(
            "SIGHUP received: configuration reload is not available in this version; "
            "the running configuration stays in force"
        )
        self.audit.record(AuditEvent(event="reload", decision="deny", reason="reload_unsupported"))

    async def _drain(self) -> None:
        """Let in-flight scrapes finish, up to DRAIN_TIMEOUT, before the pool closes."""
        deadline = self.reactor.seconds() + DRAIN_TIMEOUT
        pending = self._in_flight()
        if pending:
            self.log.info("draining {count} in-flight request(s)", count=pending)
        while pending and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.05)
            pending = self._in_flight()
        if pending:
            self.log.warn("{count} request(s) still in flight at shutdown", count=pending)

    async def _close_connections(self) -> None:
        """Close what is left before the audit log stops, so that it is audited too."""
        left = sum(gw.shut_down_connections() for gw in self.gateways)
        deadline = self.reactor.seconds() + 2.0
        while left and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.01)
            left = sum(len(gw.open) for gw in self.gateways)

    def _in_flight(self) -> int:
        """Relayed HTTP requests still running. Tunnels and TCP connections live as long as
        their clients want, so they are not waited for: they are cut, and audited, next."""
        return sum(gw.exchanges for gw in self.gateways if isinstance(gw, ReverseGateway))

    def addresses(self) -> dict[str, str]:
        return {name: _where(port) for name, port in self.ports.items()}

    def _write_ready_file(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "listeners": self.addresses()}) + "\n")
        tmp.replace(path)


def _where(port: IListeningPort) -> str:
    host: Any = port.getHost()
    h = getattr(host, "host", None)
    if h is None:
        return str(getattr(host, "name", ""))
    return f"[{h}]:{host.port}" if ":" in h else f"{h}:{host.port}"
