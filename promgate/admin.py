"""The admin listener: ``/metrics``, ``/-/healthy`` and ``/-/ready``, Prometheus style."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource
from twisted.web.server import Request, Site


class Readiness:
    """Ready to serve: every listener is accepting, and every further check holds (the
    audit log is writable when unaudited traffic is refused; discovery has made its first
    round, so a new process does not answer 404 for targets it has not looked up yet)."""

    def __init__(self, *checks: Callable[[], bool]) -> None:
        self.ready = False
        self._checks = checks

    def is_ready(self) -> bool:
        return self.ready and all(check() for check in self._checks)


class _Health(Resource):
    isLeaf = True

    def __init__(self, readiness: Readiness | None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._readiness = readiness

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if self._readiness is None:
            return b"promgate is Healthy.\n"
        if self._readiness.is_ready():
            return b"promgate is Ready.\n"
        request.setResponseCode(503)
        return b"promgate is not ready.\n"

    render_HEAD = render_GET


def admin_site(registry: CollectorRegistry, readiness: Readiness) -> Site:
    """The admin web site over promgate's own metrics registry."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))  # type: ignore[no-untyped-call]
    dash = Resource()
    dash.putChild(b"healthy", _Health(None))
    dash.putChild(b"ready", _Health(readiness))
    root.putChild(b"-", dash)
    site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
