"""A reload in two phases, in memory: what ``prepare_reload`` builds changes nothing
until ``commit_reload`` swaps it in, and ``abort_reload`` lets it go, audited as a refusal
(the phases a worker process runs when its supervisor reloads every worker as one)."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from promgate.reload import PreparedReload, abort_reload, commit_reload, prepare_reload
from promgate.testing import Bearer, MemoryGateway

TOKEN = "agent-token-5f1c"
SCRAPE = "/scrape?route=node&target=10.0.0.5%3A9100"

CONFIG = """\
admin: {endpoint: "tcp:9099:interface=127.0.0.1"}
listeners:
  - {name: local, protocol: http, endpoint: "tcp:8080:interface=127.0.0.1", tls: false}
identities:
  agent: {bearer_file: agent.token, roles: [scraper]}
routes:
  node:
    allow: ["role:scraper"]
    targets: {static: ["10.0.0.5:9100"]}
audit: {path: audit.jsonl, key_file: audit.key}
"""

CHANGED = CONFIG.replace('allow: ["role:scraper"]', 'allow: ["role:other"]').replace(
    "listeners:\n",
    'listeners:\n  - {name: more, protocol: http, endpoint: "tcp:8081:interface=127.0.0.1",'
    " tls: false}\n",
)


class PhaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        root = Path(self.mktemp()).resolve()
        root.mkdir(parents=True)
        (root / "agent.token").write_text(TOKEN + "\n")
        (root / "audit.key").write_text("k" * 64 + "\n")
        (root / "audit.key").chmod(0o600)
        self.path = root / "promgate.yaml"
        self.path.write_text(CONFIG)
        self.gw = MemoryGateway.from_config_file(self.path)
        self.gw.upstream("10.0.0.5:9100", body=b"up 1\n")

    def status(self) -> int:
        return self.gw.get(SCRAPE, identity=Bearer(TOKEN), listener="local").status

    def prepared(self) -> PreparedReload:
        self.path.write_text(CHANGED)
        prepared = prepare_reload(self.gw.service, "test")
        assert isinstance(prepared, PreparedReload), prepared
        return prepared

    def test_prepare_changes_nothing(self) -> None:
        """Prepared, not committed: the running configuration serves, and no reload is
        audited yet."""
        prepared = self.prepared()
        self.assertEqual(set(prepared.next.fresh), {"more"})
        self.assertEqual(self.status(), 200)
        self.assertEqual([s.listener_name for s in self.gw.service.listeners], ["local"])
        self.assertEqual(self.gw.audit_records("reload"), [])
        abort_reload(self.gw.service, prepared, "test over")

    def test_commit(self) -> None:
        """Committed: the new policy answers, the new listener serves, one ``allow``."""
        result = commit_reload(self.gw.service, self.prepared())
        self.assertTrue(result.applied, result)
        self.assertEqual(self.status(), 403)
        self.assertEqual([s.listener_name for s in self.gw.service.listeners], ["more", "local"])
        (record,) = self.gw.audit_records("reload")
        self.assertEqual((record.decision, record.reason), ("allow", "ok"))

    def test_abort(self) -> None:
        """Aborted: nothing applied, and the refusal audited with why."""
        prepared = self.prepared()
        result = abort_reload(self.gw.service, prepared, "not applied: another worker")
        self.assertFalse(result.applied)
        self.assertEqual([s.listener_name for s in self.gw.service.listeners], ["local"])
        self.assertEqual(self.status(), 200)
        self.assertEqual(self.gw.sample("promgate_config_last_reload_successful"), 0.0)
        (record,) = self.gw.audit_records("reload")
        self.assertEqual((record.decision, record.detail), ("deny", "not applied: another worker"))

    def test_refused_in_prepare(self) -> None:
        """A configuration that does not load is refused by prepare itself."""
        self.path.write_text("listeners: nonsense\n")
        result = prepare_reload(self.gw.service, "test")
        self.assertNotIsInstance(result, PreparedReload)
        self.assertFalse(getattr(result, "applied", True))
