"""Helpers for testing a promgate setup with trial: a test PKI, fake exporters, an
in-memory audit sink, and a harness that runs the real ``twistd promgate`` on loopback.

Integrators use these in their own trial suites::

    from promgate.testing import TestPKI, FakeExporter, GatewayProcess

The harness waits on the gateway's own readiness (its ``--ready-file``), never on sleeps.
"""

from __future__ import annotations

from promgate.audit import MemoryAuditSink
from promgate.testing.clients import Response, https_connection, https_get, request
from promgate.testing.fakes import FakeExporter
from promgate.testing.pki import TestPKI
from promgate.testing.process import GatewayProcess, StartFailure, run_twistd

__all__ = [
    "FakeExporter",
    "GatewayProcess",
    "MemoryAuditSink",
    "Response",
    "StartFailure",
    "TestPKI",
    "https_connection",
    "https_get",
    "request",
    "run_twistd",
]
