"""promgate's own metrics as Prometheus tooling sees them: the process and interpreter
metrics every client exports, no ``_created`` series, ``HEAD /metrics``, callers counted by
a bounded ``identity`` label, and ``promtool check metrics`` on a running gateway."""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from promgate.admin import Readiness, ReadinessMetric, admin_site
from promgate.metrics import Metrics, exposed_registry, identity_label
from promgate.testing.integration import metric_samples
from promgate.testing.monitoring import PROMTOOL, MonitoredGateway, executable, promtool


def _require_promtool() -> None:
    if not executable(PROMTOOL):
        message = f"promtool not installed at {PROMTOOL} (Debian package prometheus)"
        if os.environ.get("CI"):
            raise AssertionError(f"{message}; CI installs it")
        raise SkipTest(message)


class OwnMetricsTests(SynchronousTestCase):
    """What the registry holds and what the admin listener serves of it."""

    def test_process_and_python(self) -> None:
        """``process_*`` and ``python_*`` are on promgate's own registry."""
        text = generate_latest(exposed_registry(Metrics().registry)).decode()
        self.assertTrue(metric_samples(text, "python_info"))
        self.assertTrue(metric_samples(text, "python_gc_collections_total"))
        if Path("/proc/self/stat").exists():
            self.assertTrue(metric_samples(text, "process_cpu_seconds_total"))
            self.assertTrue(metric_samples(text, "process_resident_memory_bytes"))

    def test_no_created_series(self) -> None:
        """Counters and histograms are served without their ``_created`` series, and the
        switch is the admin registry's, not the process's."""
        metrics = Metrics()
        metrics.requests.labels("scrape", "node", "none", "200").inc()
        metrics.request_duration.labels("scrape", "node").observe(0.1)
        text = generate_latest(exposed_registry(metrics.registry)).decode()
        self.assertIn('promgate_requests_total{code="200"', text)
        self.assertIn("promgate_request_duration_seconds_bucket", text)
        self.assertNotIn("_created", text)
        self.assertIn("_created", generate_latest(metrics.registry).decode())

    def test_ready_gauge(self) -> None:
        """``promgate_ready`` says what ``/-/ready`` would answer."""
        readiness = Readiness()
        registry = CollectorRegistry()
        registry.register(ReadinessMetric(readiness))
        self.assertEqual(registry.get_sample_value("promgate_ready"), 0.0)
        readiness.ready = True
        self.assertEqual(registry.get_sample_value("promgate_ready"), 1.0)

    def test_head_metrics(self) -> None:
        """``HEAD /metrics`` answers 200 with the content type a GET would have."""
        site = admin_site(Metrics().registry, Readiness(), MemoryReactorClock())
        request = DummyRequest([b"metrics"])
        request.method = b"HEAD"
        resource = site.getResourceFor(request)
        body = resource.render(request)
        self.assertEqual(body, b"")
        self.assertEqual(request.responseCode or 200, 200)
        (content_type,) = request.responseHeaders.getRawHeaders(b"content-type")
        self.assertTrue(content_type.startswith(b"text/plain"))


class IdentityLabelTests(SynchronousTestCase):
    """The ``identity`` label takes configured names and two fixed values only."""

    def test_values(self) -> None:
        """A name when one was established; ``unrecognised`` when credentials matched no
        identity; ``none`` when none were presented."""
        self.assertEqual(identity_label("prometheus", "ok"), "prometheus")
        for reason in ("unknown_identity", "identity_ambiguous", "authn_failed", "authn_conflict"):
            self.assertEqual(identity_label(None, reason), "unrecognised")
        for reason in ("no_credentials", "authn_missing", "client_closed", "ok"):
            self.assertEqual(identity_label(None, reason), "none")


class PromtoolCheckMetricsTests(SynchronousTestCase):
    """``promtool check metrics`` accepts what a running gateway serves."""

    def setUp(self) -> None:
        _require_promtool()
        self.world = MonitoredGateway(Path(self.mktemp()).absolute())
        self.addCleanup(self.world.stop)
        self.world.start()

    def test_check_metrics(self) -> None:
        """After traffic of every kind, the admin ``/metrics`` passes the linter, carries
        the identity label, and ``HEAD /metrics`` answers 200."""
        self.world.traffic()
        text = self.world.metrics_text()
        code, output = promtool("check", "metrics", stdin=text)
        self.assertEqual((code, output), (0, ""), output)
        identities = {
            labels["identity"]
            for labels, _ in metric_samples(text.decode(), "promgate_requests_total")
        }
        self.assertEqual(identities, {"prometheus", "unrecognised"})
        self.assertEqual(metric_samples(text.decode(), "promgate_ready"), [({}, 1.0)])
        self.assertEqual(self.world.gate.get("admin", "/metrics", None, method="HEAD").status, 200)
