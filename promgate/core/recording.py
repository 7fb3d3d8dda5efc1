"""The one place an outcome becomes an audit record and metrics, for every listener."""

from __future__ import annotations

import attrs

from promgate.audit import AuditEvent, IAuditSink
from promgate.authn import AUTHN_FAILURES
from promgate.core.context import ConnectionInfo, Outcome, RequestContext, TLSInfo
from promgate.metrics import NO_IDENTITY, UNRECOGNISED, Metrics, identity_label
from promgate.tls import PeerCertificate


def connection_event(
    event: str,
    connection: ConnectionInfo,
    identity: str | None,
    outcome: Outcome,
    *,
    bytes_in: int,
    duration: float,
    method: str | None = None,
    path: str | None = None,
    server_name: str | None = None,
) -> AuditEvent:
    """The audit event of what happened on a client connection: who, how, and the outcome."""
    tls = connection.tls
    cert = tls.peer
    return AuditEvent(
        event=event,
        listener=connection.listener,
        peer=connection.peer,
        tls_version=tls.version,
        tls_cipher=tls.cipher,
        cert_sha256=cert.sha256 if cert is not None else None,
        cert_subject=cert.subject if cert is not None else None,
        identity=identity,
        route=outcome.route,
        target=outcome.target,
        method=method,
        path=path,
        decision=outcome.decision,
        reason=outcome.reason,
        status=outcome.status,
        bytes_in=bytes_in,
        bytes_out=outcome.bytes_out,
        duration=duration,
        detail=outcome.detail,
        server_name=server_name,
    )


def handshake_failure_event(
    listener: str, peer: str, reason: str, detail: str, cert: PeerCertificate | None
) -> AuditEvent:
    """The audit event of a refused or failed TLS handshake."""
    return AuditEvent(
        event="tls_handshake_failed",
        listener=listener,
        peer=peer,
        cert_sha256=cert.sha256 if cert is not None else None,
        cert_subject=cert.subject if cert is not None else None,
        decision="deny",
        reason=reason,
        detail=detail,
    )


class Recorder:
    """One listener's audit records and metrics.

    Each method takes what is known (a request's or connection's context) and how it ended
    (an ``Outcome``), and writes the one record and the counters that go with it.
    """

    def __init__(self, listener: str, audit: IAuditSink, metrics: Metrics) -> None:
        self.listener = listener
        self.audit = audit
        self.metrics = metrics

    def refused(self, route: str | None, reason: str) -> None:
        """Count a refusal the gateway answered itself (``promgate_denied_total``, and
        ``promgate_authn_failures_total`` for the caller-recognition reasons)."""
        self.metrics.denied.labels(self.listener, route or "", reason).inc()
        if reason in AUTHN_FAILURES:
            self.metrics.authn_failures.labels(self.listener, reason).inc()

    def request(self, ctx: RequestContext, outcome: Outcome, now: float) -> None:
        """Audit and count one answered (or abandoned) request."""
        duration = now - ctx.start
        counters = self.metrics.route(self.listener, outcome.route or "")
        recognition = ctx.recognition
        identity = recognition.identity
        if outcome.status is not None:
            name = identity.name if identity is not None else None
            counters.answered(outcome.status, identity_label(name, recognition.reason))
        counters.duration.observe(duration)
        bytes_in = ctx.size if outcome.bytes_in is None else outcome.bytes_in
        counters.bytes_in.inc(bytes_in)
        counters.bytes_out.inc(outcome.bytes_out)
        self.audit.record(
            connection_event(
                "request",
                ctx.connection,
                identity.name if identity is not None else None,
                outcome,
                bytes_in=bytes_in,
                duration=duration,
                method=ctx.method,
                path=outcome.path if outcome.path is not None else ctx.path,
            )
        )

    def tunnel(self, ctx: RequestContext, outcome: Outcome, now: float) -> None:
        """Audit and count one CONNECT tunnel, at its end: one record for its whole life."""
        duration = now - ctx.start
        route = outcome.route or ""
        self.metrics.tunnel_duration.labels(self.listener, route).observe(duration)
        # A tunnel carries no path: its record names only the target.
        self.request(attrs.evolve(ctx, path=None), outcome, now)

    def connection(
        self,
        connection: ConnectionInfo,
        identity: str | None,
        outcome: Outcome,
        *,
        duration: float,
        server_name: str | None,
        relayed: bool,
    ) -> None:
        """The one audit record of a ``tcp`` listener's connection, and its metrics.

        ``identity`` is the name of the identity established, if any. Without one, a
        connection that presented a certificate (the only credential a ``tcp`` listener
        takes) or was refused for matching no identity counts as ``unrecognised``.
        """
        route = outcome.route or ""
        who = identity_label(identity, outcome.reason)
        if identity is None and connection.tls.peer is not None:
            who = UNRECOGNISED
        self.metrics.tcp_connections.labels(self.listener, route, who, outcome.reason).inc()
        if relayed:
            self.metrics.tcp_duration.labels(self.listener, route).observe(duration)
        self.audit.record(
            connection_event(
                "connection",
                connection,
                identity,
                outcome,
                bytes_in=outcome.bytes_in or 0,
                duration=duration,
                server_name=server_name,
            )
        )

    def tcp_handshake_failed(
        self, peer: str, reason: str, detail: str, cert: PeerCertificate | None
    ) -> None:
        """A ``tcp`` listener's refused handshake: a connection that ended with no route and
        no identity (``unrecognised`` when it presented a certificate), then as below."""
        who = UNRECOGNISED if cert is not None else NO_IDENTITY
        self.metrics.tcp_connections.labels(self.listener, "", who, reason).inc()
        self.handshake_failed(peer, reason, detail, cert)

    def handshake_failed(
        self, peer: str, reason: str, detail: str, cert: PeerCertificate | None
    ) -> None:
        """Audit and count a TLS handshake that failed or was refused."""
        self.metrics.tls_handshake_failures.labels(self.listener, reason).inc()
        self.audit.record(handshake_failure_event(self.listener, peer, reason, detail, cert))


__all__ = [
    "ConnectionInfo",
    "Outcome",
    "Recorder",
    "RequestContext",
    "TLSInfo",
    "connection_event",
    "handshake_failure_event",
]
