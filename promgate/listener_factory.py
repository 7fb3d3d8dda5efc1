"""What a listener accepts connections with: its gateway's protocol factory, behind the
listener's server TLS (read from its files, reloaded when they change)."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.protocols.tls import TLSMemoryBIOFactory

from promgate.audit import IAuditSink
from promgate.authn import Authenticator
from promgate.config.model import Config, Listener
from promgate.http.listener import HTTPListener
from promgate.http.server import HTTPListenerFactory
from promgate.http.upstream import UpstreamPool
from promgate.listeners.forward import ForwardGateway
from promgate.listeners.scrape import ReverseGateway
from promgate.listeners.tcp import TCPGateway, TCPGatewayFactory
from promgate.metrics import Metrics
from promgate.net.relay_upstream import EndpointConnector
from promgate.policy import Membership
from promgate.ratelimit import RateLimiter, SharedAdmission
from promgate.reactors import IGatewayReactor
from promgate.tls_reload import ReloadingServerTLS

#: The gateway behind one listener, by listener kind.
Gateway = ReverseGateway | ForwardGateway | TCPGateway


@attrs.frozen
class Pipeline:
    """What every listener's gateway shares: one clock, limiter, audit sink, metrics
    registry, upstream pool, authenticator, and the routes' current targets."""

    reactor: IGatewayReactor
    limiter: RateLimiter
    audit: IAuditSink
    metrics: Metrics
    pool: UpstreamPool
    authenticator: Authenticator
    membership: Membership
    #: The limits shared through Redis (``shared_limits``), if configured.
    shared: SharedAdmission | None = None

    def gateway(
        self, listener: Listener, config: Config, reuse: HTTPListener | None = None
    ) -> Gateway:
        """The gateway (routing, policy, limits, audit) behind ``listener``; on a reload,
        ``reuse`` is the running HTTP listener whose connections it takes over."""
        if listener.protocol == "tcp":
            return TCPGateway(
                listener,
                config,
                clock=self.reactor,
                limiter=self.limiter,
                audit=self.audit,
                metrics=self.metrics,
                connector=EndpointConnector(
                    self.reactor, connect_timeout=listener.deadlines.upstream_connect
                ),
                shared=self.shared,
            )
        if listener.protocol == "forward":
            return ForwardGateway(
                listener,
                config,
                reactor=self.reactor,
                clock=self.reactor,
                limiter=self.limiter,
                audit=self.audit,
                metrics=self.metrics,
                pool=self.pool,
                authenticator=self.authenticator,
                membership=self.membership,
                reuse=reuse,
                shared=self.shared,
            )
        return ReverseGateway(
            listener,
            config,
            clock=self.reactor,
            limiter=self.limiter,
            audit=self.audit,
            metrics=self.metrics,
            pool=self.pool,
            authenticator=self.authenticator,
            membership=self.membership,
            reuse=reuse,
            shared=self.shared,
        )


def protocol_factory(
    listener: Listener,
    gateway: Gateway,
    clock: IReactorTime,
    tls: ReloadingServerTLS | None = None,
) -> Any:
    """What ``listener`` accepts connections with: its gateway's protocols, behind TLS
    unless the listener is plain (or a ``tcp`` listener passes TLS through). The TLS is
    ``tls``, or one made from the listener's certificate and key files (read now)."""
    factory: Any
    if isinstance(gateway, TCPGateway):
        factory = TCPGatewayFactory(gateway)
    else:
        factory = HTTPListenerFactory(gateway.http)
    if tls is None:
        tls = listener_tls(listener, clock)
    if tls is not None:
        factory = TLSMemoryBIOFactory(tls, False, factory, clock=clock)
    factory.noisy = False
    return factory


def listener_tls(
    listener: Listener, clock: IReactorTime, metrics: Metrics | None = None
) -> ReloadingServerTLS | None:
    """The server TLS of a listener that terminates TLS (None for the others), read from
    its files now."""
    if listener.tls is None:
        return None
    if listener.tcp is not None and listener.tcp.mode != "terminate":
        return None
    # No ALPN on tcp listeners: the relayed protocol is the client's business.
    return ReloadingServerTLS.load(
        listener.name,
        listener.tls,
        clock=clock,
        alpn=None if listener.protocol == "tcp" else (b"http/1.1",),
        metrics=metrics.tls if metrics is not None else None,
    )


__all__ = ["Gateway", "Pipeline", "listener_tls", "protocol_factory"]
