"""Helpers for testing a promgate setup with trial, the way ``treq.testing`` serves treq:
a test PKI, fake exporters, an in-memory audit sink, the whole gateway in memory (no
sockets, real TLS over iosim), and a harness that runs the real ``twistd promgate`` on
loopback.

Integrators use these in their own trial suites::

    from promgate.testing import MemoryGateway, TestPKI

    gw = MemoryGateway.from_config_file("promgate.yaml")
    gw.upstream("10.0.0.5:9100", body=b"up 1\\n")
    response = gw.get("/scrape?route=node&target=10.0.0.5%3A9100", identity=cert)

``GatewayProcess`` waits on the gateway's own readiness (its ``--ready-file``), never on
sleeps. See ``docs/testing.md``.
"""

from __future__ import annotations

from promgate.audit import MemoryAuditSink
from promgate.testing.clients import Response, https_connection, https_get, request
from promgate.testing.fakes import FakeExporter
from promgate.testing.memory import (
    Basic,
    Bearer,
    BoundListener,
    MemoryAuditLog,
    MemoryConnection,
    MemoryGateway,
    NoResponseError,
)
from promgate.testing.oidc import TestIssuer
from promgate.testing.pki import TestPKI
from promgate.testing.process import GatewayProcess, StartFailure, run_twistd
from promgate.testing.upstreams import (
    FakeUpstream,
    PendingUpstreams,
    UpstreamNetwork,
    UpstreamRequest,
)
from promgate.testing.wire import (
    Collector,
    WireResponse,
    parse_responses,
    read_response,
    request_head,
    server_transport,
)

__all__ = [
    "Basic",
    "Bearer",
    "BoundListener",
    "Collector",
    "FakeExporter",
    "FakeUpstream",
    "GatewayProcess",
    "MemoryAuditLog",
    "MemoryAuditSink",
    "MemoryConnection",
    "MemoryGateway",
    "NoResponseError",
    "PendingUpstreams",
    "Response",
    "StartFailure",
    "TestIssuer",
    "TestPKI",
    "UpstreamNetwork",
    "UpstreamRequest",
    "WireResponse",
    "https_connection",
    "https_get",
    "parse_responses",
    "read_response",
    "request",
    "request_head",
    "run_twistd",
    "server_transport",
]
