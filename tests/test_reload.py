"""Live reload in memory, through the real assembly (``MemoryGateway``): an invalid
configuration keeps the running one, a valid one is swapped in at once, listeners are
added and removed by diff, keep-alive connections are judged by the new snapshot, and open
tunnels the new policy no longer allows are cut and audited."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase

from promgate.testing import Bearer, MemoryGateway, TestPKI

TOKEN = "agent-token-5f1c"
OTHER = "other-token-77aa"
SCRAPE = "/scrape?route=node&target=10.0.0.5%3A9100"
METRICS = b"# TYPE up gauge\nup 1\n"

CONFIG = """\
tls: {certificate: pki/gate.pem, key: pki/gate-key.pem, client_ca: pki/ca.pem}
admin: {endpoint: "tcp:9099:interface=127.0.0.1"}
listeners:
  - {name: local, protocol: http, endpoint: "tcp:8080:interface=127.0.0.1", tls: false}
  - {name: egress, protocol: forward, endpoint: "tcp:3128:interface=127.0.0.1", tls: false}
  - {name: raw, protocol: tcp, endpoint: "tcp:9200:interface=127.0.0.1", route: secure}
identities:
  agent: {bearer_file: agent.token, roles: [scraper]}
  other: {bearer_file: other.token, roles: [other]}
  prometheus: {cert: {uri: "spiffe://promgate.local/prometheus"}, roles: [scraper]}
routes:
  node:
    allow: ["role:scraper"]
    listeners: [local, egress]
    targets: {static: ["10.0.0.5:9100"]}
  secure:
    scheme: https
    allow: ["role:scraper"]
    listeners: [egress, raw]
    targets: {static: ["10.0.0.7:9443"]}
audit: {path: audit.jsonl, key_file: pki/audit.key}
"""

_PKI: TestPKI | None = None


def _pki(base: Path) -> TestPKI:
    global _PKI
    if _PKI is None:
        _PKI = TestPKI(base)
        _PKI.client("prometheus")
    return _PKI


class ReloadTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir(parents=True)
        self.pki = _pki(self.root.parent / "pki-shared")
        (self.root / "pki").symlink_to(self.pki.directory)
        (self.root / "agent.token").write_text(TOKEN + "\n")
        (self.root / "other.token").write_text(OTHER + "\n")
        self.path = self.root / "promgate.yaml"
        self.write(CONFIG)
        self.gw = MemoryGateway.from_config_file(self.path)
        self.exporter = self.gw.upstream("10.0.0.5:9100", body=METRICS)

    def write(self, text: str) -> None:
        self.path.write_text(textwrap.dedent(text))

    def reloaded(self) -> float | None:
        return self.gw.sample("promgate_config_last_reload_successful")


class InvalidThenValidTests(ReloadTestCase):
    def test_invalid_keeps_the_running_one(self) -> None:
        """valid -> invalid -> valid: the old configuration serves throughout; the metric
        goes 1 -> 0 -> 1; each reload is audited, the refusal with its FILE:LINE."""
        self.assertEqual(self.reloaded(), 1.0)
        self.write(
            CONFIG.replace(
                'allow: ["role:scraper"]\n    listeners: [local',
                "allow: 7\n    listeners: [local",
                1,
            )
        )
        result = self.gw.reload()
        self.assertFalse(result.applied)
        self.assertTrue(
            any(f"{self.path}:" in p and "routes.node.allow" in p for p in result.problems),
            result.problems,
        )
        self.assertEqual(self.reloaded(), 0.0)
        self.assertEqual(self.gw.get(SCRAPE, identity=Bearer(TOKEN), listener="local").status, 200)
        refused = self.gw.audit_records("reload")[-1]
        self.assertEqual((refused.decision, refused.reason), ("deny", "config_invalid"))
        self.assertIn("routes.node.allow", refused.detail or "")
        self.write(CONFIG)
        self.assertTrue(self.gw.reload().applied)
        self.assertEqual(self.reloaded(), 1.0)
        applied = self.gw.audit_records("reload")[-1]
        self.assertEqual((applied.decision, applied.reason), ("allow", "ok"))

    def test_admin_reload(self) -> None:
        """POST /-/reload answers 200 when applied, 500 with the problems when not; GET is
        not a reload."""
        admin = self.gw.connect(listener="admin")
        ok = admin.request("/-/reload", method="POST")
        self.assertEqual(ok.status, 200, ok)
        self.assertIn(b"reloaded", ok.body)
        self.write("listeners: nonsense\n")
        admin = self.gw.connect(listener="admin")
        bad = admin.request("/-/reload", method="PUT")
        self.assertEqual(bad.status, 500)
        self.assertIn(str(self.path).encode(), bad.body)
        admin = self.gw.connect(listener="admin")
        self.assertEqual(admin.request("/-/reload").status, 405)

    def test_restart_needed(self) -> None:
        """Changing the audit log cannot be applied live: refused, and said so."""
        self.write(CONFIG.replace("path: audit.jsonl", "path: other.jsonl"))
        result = self.gw.reload()
        self.assertFalse(result.applied)
        self.assertIn("audit: changing the audit log takes a restart", result.problems[0])


class ListenerDiffTests(ReloadTestCase):
    def test_added_and_removed(self) -> None:
        """A listener added is bound and serves; one removed stops accepting."""
        added = CONFIG.replace(
            "  - {name: egress,",
            '  - {name: more, protocol: http, endpoint: "tcp:8081:interface=127.0.0.1",'
            " tls: false}\n  - {name: egress,",
        ).replace("listeners: [local, egress]", "listeners: [local, more, egress]")
        self.write(added)
        result = self.gw.reload()
        self.assertTrue(result.applied, result.problems)
        self.assertIn("+more", result.summary)
        self.assertEqual(self.gw.get(SCRAPE, identity=Bearer(TOKEN), listener="more").status, 200)
        raw = '  - {name: raw, protocol: tcp, endpoint: "tcp:9200:interface=127.0.0.1", '
        removed = CONFIG.replace(raw + "route: secure}\n", "").replace(
            "listeners: [egress, raw]", "listeners: [egress]"
        )
        self.write(removed)
        result = self.gw.reload()
        self.assertTrue(result.applied, result.problems)
        self.assertIn("-raw", result.summary)
        self.assertNotIn("raw", self.gw.listeners)
        port = next(s for s in self.gw.reactor.tcpServers if s[0] == 9200)
        self.assertIsNotNone(port)

    def test_unexpected_failure_unbinds_what_it_bound(self) -> None:
        """A reload that fails for a reason no check foresaw, after binding one of its new
        listeners, refuses and lets that listener go again: nothing changed, nothing bound."""
        service = self.gw.service
        made: list[Any] = []
        stopped: list[str] = []
        listener_service = service.listener_service

        def recording(listener: Any, factory: Any) -> Any:
            svc = listener_service(listener, factory)
            stop = svc.stopService

            def stop_recorded() -> Any:
                stopped.append(svc.listener_name)
                return stop()

            svc.stopService = stop_recorded
            made.append(svc)
            if listener.name == "second":
                raise RuntimeError("unforeseen")
            return svc

        self.patch(service, "listener_service", recording)
        self.write(
            CONFIG.replace(
                "  - {name: egress,",
                '  - {name: first, protocol: http, endpoint: "tcp:8081:interface=127.0.0.1",'
                " tls: false}\n  - {name: second, protocol: http, endpoint: "
                '"tcp:8082:interface=127.0.0.1", tls: false}\n  - {name: egress,',
            ).replace("listeners: [local, egress]", "listeners: [local, first, second, egress]")
        )
        result = self.gw.reload()
        self.assertFalse(result.applied)
        self.assertEqual([svc.listener_name for svc in made], ["first", "second"])
        self.assertEqual(stopped, ["first"])
        self.assertNotIn("first", self.gw.listeners)
        # The unforeseen failure is logged in full, once.
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.gw.get(SCRAPE, identity=Bearer(TOKEN), listener="local").status, 200)


class SnapshotTests(ReloadTestCase):
    def test_keep_alive_judged_by_the_new_snapshot(self) -> None:
        """An identity that loses the route: the next request on the same keep-alive
        connection is refused; other callers go on."""
        conn = self.gw.connect(Bearer(TOKEN), listener="local")
        self.assertEqual(conn.request(SCRAPE).status, 200)
        self.write(
            CONFIG.replace(
                "agent: {bearer_file: agent.token, roles: [scraper]}",
                "agent: {bearer_file: agent.token, roles: [nobody]}",
            )
        )
        self.assertTrue(self.gw.reload().applied)
        self.assertEqual(conn.request(SCRAPE).status, 403)
        self.assertEqual(self.gw.audit_records("request")[-1].reason, "authz_denied")
        # The reload record says what changed for access, as promgate diff would.
        detail = self.gw.audit_records("reload")[-1].detail or ""
        self.assertIn("newly denied", detail)
        self.assertIn("agent", detail)

    def test_listener_switched_to_tls_keeps_plain_connections_plain(self) -> None:
        """A kept listener that a reload switches to TLS: connections already open stay
        plain connections (their /sd says http), new ones are TLS (theirs says https)."""
        conn = self.gw.connect(Bearer(TOKEN), listener="local")
        self.assertIn(b'"__scheme__":"http"', conn.request("/sd").body.replace(b" ", b""))
        self.write(
            CONFIG.replace(
                'endpoint: "tcp:8080:interface=127.0.0.1", tls: false}',
                'endpoint: "tcp:8080:interface=127.0.0.1"}',
            )
        )
        self.assertTrue(self.gw.reload().applied)
        again = conn.request("/sd")
        self.assertEqual(again.status, 200)
        self.assertIn(b'"__scheme__":"http"', again.body.replace(b" ", b""))
        self.assertEqual(conn.request(SCRAPE).status, 200)
        fresh = self.gw.connect(self.pki.client("prometheus"), listener="local")
        self.assertIn(b'"__scheme__":"https"', fresh.request("/sd").body.replace(b" ", b""))

    def test_new_identity_usable_at_once(self) -> None:
        """A role granted by the reload applies to the next request."""
        self.assertEqual(self.gw.get(SCRAPE, identity=Bearer(OTHER), listener="local").status, 403)
        self.write(CONFIG.replace("roles: [other]", "roles: [scraper]"))
        self.assertTrue(self.gw.reload().applied)
        self.assertEqual(self.gw.get(SCRAPE, identity=Bearer(OTHER), listener="local").status, 200)

    def test_rate_limit_state_carries_over(self) -> None:
        """A route that still exists keeps its token bucket across a reload."""
        limited = CONFIG.replace(
            "    listeners: [local, egress]\n",
            "    listeners: [local, egress]\n    limits: {rate: 1/m, burst: 1, per: identity}\n",
        )
        self.write(limited)
        self.assertTrue(self.gw.reload().applied)
        self.assertEqual(self.gw.get(SCRAPE, identity=Bearer(TOKEN), listener="local").status, 200)
        self.assertEqual(self.gw.get(SCRAPE, identity=Bearer(TOKEN), listener="local").status, 429)
        self.assertTrue(self.gw.reload().applied)
        self.assertEqual(self.gw.get(SCRAPE, identity=Bearer(TOKEN), listener="local").status, 429)


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class RevocationTests(ReloadTestCase):
    def test_tunnel_no_longer_allowed_is_cut(self) -> None:
        """Open CONNECT tunnels whose caller the new policy no longer allows are closed
        and audited policy_revoked, one record each."""
        self.gw.upstream("10.0.0.7:9443", factory=Factory.forProtocol(_Echo))
        kept = self.gw.connect(Bearer(TOKEN), listener="egress")
        cut = self.gw.connect(Bearer(TOKEN), listener="egress")
        for conn in (kept, cut):
            conn.send("10.0.0.7:9443", method="CONNECT")
        self.assertIn(b" 200 ", kept.received)
        before = len(cut.received)
        cut.write(b"ping")
        self.assertEqual(cut.received[before:], b"ping")
        # The agent keeps its token but loses the route's role: both tunnels are its.
        self.write(CONFIG.replace("roles: [scraper]}\n  other", "roles: [nobody]}\n  other"))
        result = self.gw.reload()
        self.assertTrue(result.applied, result.problems)
        self.assertIn("revoked: 2", result.summary)
        self.assertIsNotNone(cut.lost)
        records = [r for r in self.gw.audit_records("request") if r.method == "CONNECT"]
        self.assertEqual([r.reason for r in records], ["policy_revoked", "policy_revoked"])
        self.assertIn("reload:", records[0].detail or "")


class CertificateRevocationTests(ReloadTestCase):
    def test_tunnel_whose_certificate_no_longer_names_its_caller_is_cut(self) -> None:
        """A tunnel opened by a caller recognised from its certificate is judged by who
        that certificate names under the new configuration, not by the old identity's
        name: an identity that no longer matches the certificate loses the tunnel."""
        self.write(
            CONFIG.replace(
                'endpoint: "tcp:3128:interface=127.0.0.1", tls: false}',
                'endpoint: "tcp:3128:interface=127.0.0.1"}',
            )
        )
        self.assertTrue(self.gw.reload().applied)
        self.gw.upstream("10.0.0.7:9443", factory=Factory.forProtocol(_Echo))
        conn = self.gw.connect(self.pki.client("prometheus"), listener="egress")
        conn.send("10.0.0.7:9443", method="CONNECT")
        self.assertIn(b" 200 ", conn.received)
        # Same identity name and roles, but it now names another certificate.
        self.write(
            CONFIG.replace(
                'endpoint: "tcp:3128:interface=127.0.0.1", tls: false}',
                'endpoint: "tcp:3128:interface=127.0.0.1"}',
            ).replace("promgate.local/prometheus", "promgate.local/someone-else")
        )
        result = self.gw.reload()
        self.assertTrue(result.applied, result.problems)
        self.assertIn("revoked: 1", result.summary)
        self.assertIsNotNone(conn.lost)
        records = [r for r in self.gw.audit_records("request") if r.method == "CONNECT"]
        self.assertEqual([r.reason for r in records], ["policy_revoked"])
