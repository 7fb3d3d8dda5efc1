"""The admin listener: ``/metrics``, ``/-/healthy`` and ``/-/ready``, Prometheus style."""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterable
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from promgate.metrics import exposed_registry


class Readiness:
    """Ready to serve: every listener is accepting, and every further check holds (the
    audit log is writable when unaudited traffic is refused; discovery has made its first
    round, so a new process does not answer 404 for targets it has not looked up yet)."""

    def __init__(self, *checks: Callable[[], bool]) -> None:
        self.ready = False
        self._checks = checks

    def is_ready(self) -> bool:
        return self.ready and all(check() for check in self._checks)


class ReadinessMetric(Collector):
    """``promgate_ready``: what ``/-/ready`` would answer, as a gauge alerts can read."""

    def __init__(self, readiness: Readiness) -> None:
        self._readiness = readiness

    def collect(self) -> Iterable[GaugeMetricFamily]:
        ready = self._readiness.is_ready()
        yield GaugeMetricFamily(
            "promgate_ready",
            "1 when the gateway is ready to serve (/-/ready answers 200), else 0.",
            value=1.0 if ready else 0.0,
        )


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


class _Metrics(Resource):
    """``/metrics``: the registry's exposition, rendered on the reactor's thread as
    ``prometheus_client``'s WSGI app renders it (text or OpenMetrics by ``Accept``,
    gzip by ``Accept-Encoding``, ``name[]`` filters), without the global reactor's
    thread pool that ``prometheus_client.twisted.MetricsResource`` runs it on; and HEAD,
    which that app refuses with 405 (probes and load balancers use it)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        registry = self._registry
        query = (request.uri or b"").partition(b"?")[2].decode("latin-1")
        names = parse_qs(query).get("name[]")
        if names:
            registry = registry.restricted_registry(names)  # type: ignore[assignment]
        output: bytes = encoder(registry)
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        encoding = request.getHeader(b"accept-encoding")
        if gzip_accepted(encoding.decode("latin-1") if encoding else ""):
            output = gzip.compress(output)
            request.setHeader(b"content-encoding", b"gzip")
        return output

    def render_HEAD(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        _, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        request.setHeader(b"cache-control", b"no-store")
        return b""


#: What ``/-/reload`` calls: whether the reload was applied, and what to answer; or a
#: Deferred of that (a reload across worker processes).
Reload = Callable[[], "tuple[bool, str] | Deferred[tuple[bool, str]]"]


class _Reload(Resource):
    """``POST`` or ``PUT /-/reload``: reload the configuration, as ``SIGHUP`` does; 200 when
    applied, 500 with the problems (``FILE:LINE: key: message``, one a line) when not."""

    isLeaf = True

    def __init__(self, reload: Reload) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._reload = reload

    def render_POST(self, request: Request) -> bytes | int:
        outcome = self._reload()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if isinstance(outcome, Deferred):
            outcome.addCallback(self._answer_later, request)
            return NOT_DONE_YET
        return self._answer(outcome, request)

    @staticmethod
    def _answer(outcome: tuple[bool, str], request: Request) -> bytes:
        applied, text = outcome
        if not applied:
            request.setResponseCode(500)
        return text.encode("utf-8")

    def _answer_later(self, outcome: tuple[bool, str], request: Request) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.write(self._answer(outcome, request))
        request.finish()

    render_PUT = render_POST

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(405)
        request.setHeader(b"allow", b"POST, PUT")
        return b"use POST or PUT to reload\n"


def admin_site(
    registry: CollectorRegistry,
    readiness: Readiness,
    reactor: IReactorTime,
    reload: Reload | None = None,
) -> Site:
    """The admin web site over promgate's own metrics registry (served without the
    client's ``_created`` series); its timeouts and log timestamps run on ``reactor``.
    With ``reload``, ``POST``/``PUT /-/reload`` calls it."""
    root = Resource()
    exposed = exposed_registry(registry)
    exposed.register(ReadinessMetric(readiness))
    root.putChild(b"metrics", _Metrics(exposed))
    dash = Resource()
    dash.putChild(b"healthy", _Health(None))
    dash.putChild(b"ready", _Health(readiness))
    if reload is not None:
        dash.putChild(b"reload", _Reload(reload))
    root.putChild(b"-", dash)
    site = Site(root, reactor=reactor)
    site.noisy = False
    site.displayTracebacks = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
