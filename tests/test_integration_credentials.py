"""Integration: credentials through the real ``twistd promgate`` on 127.0.0.1.

One gateway with a mutual-TLS listener and a plain-text one, a bearer token file, a
web-config.yml with a real bcrypt hash (cost 4, to stay fast), and a fake exporter. The
scenario runs once (trial has no class-level fixtures), records what every client saw,
reads the gateway's metrics, stops it, and then the tests check answers, audit records
and that the audit log verifies. Every wait is bounded and waits on the gateway itself.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
from typing import Any

import bcrypt
from twisted.trial.unittest import SynchronousTestCase

from promgate.testing import FakeExporter, GatewayProcess, TestPKI, https_get
from promgate.testing.integration import (
    Shared,
    attempt_handshake,
    cert_sha256,
    cleanups,
    metric_samples,
    q,
    refused_handshake_from,
    run_cli,
    scrape_path,
    tls_section,
    workdir,
)

AGENT_TOKEN = "agent-" + "7c1e" * 8
OPS_PASSWORD = "correct horse battery staple"


class Seen:
    """What one client request got back: status, every WWW-Authenticate, body."""

    def __init__(self, resp: http.client.HTTPResponse) -> None:
        self.status = resp.status
        self.challenges = resp.headers.get_all("WWW-Authenticate") or []
        self.body = resp.read()


def fetch(
    address: str,
    path: str,
    context: ssl.SSLContext | None,
    headers: dict[str, str] | None = None,
    *,
    conn: http.client.HTTPConnection | None = None,
) -> Seen:
    """One GET (on ``conn`` if given, kept open), with every challenge header kept."""
    host, _, port = address.rpartition(":")
    own = conn is None
    if conn is None:
        if context is None:
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
        else:
            conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        return Seen(conn.getresponse())
    finally:
        if own:
            conn.close()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + token}


class CredentialScenario:
    """The gateway, the requests made to it, its metrics, then its audit log."""

    def __init__(self) -> None:
        self.dir = workdir("credentials")
        self.pki = TestPKI(self.dir / "pki")
        noeku_cert, noeku_key = self.dir / "pki" / "noeku.pem", self.dir / "pki" / "noeku-key.pem"
        self.pki.ca.issue_client("noeku", client_auth=False).write(noeku_cert, noeku_key)
        self.noeku_sha256 = cert_sha256(noeku_cert)
        self.body = os.urandom(2048)
        self.exporter = FakeExporter({"/metrics": self.body})
        cleanups.append(self.exporter.stop)
        token_file = self.dir / "agent.token"
        token_file.write_text(AGENT_TOKEN + "\n")
        os.chmod(token_file, 0o600)
        hashed = bcrypt.hashpw(OPS_PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
        (self.dir / "web-config.yml").write_text(f"basic_auth_users:\n  ops: {hashed}\n")
        self.audit_log = self.dir / "audit.jsonl"
        ex = self.exporter.address
        config = (
            tls_section(self.pki)
            + 'admin: {endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + "listeners:\n"
            + '  - {name: scrape, endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + '  - {name: plain, endpoint: "tcp:0:interface=127.0.0.1", tls: false}\n'
            + f"""
identities:
  prometheus: {{cert: {{uri: "spiffe://promgate.local/prometheus"}}, roles: [scraper]}}
  agent: {{bearer_file: {q(token_file)}, roles: [scraper]}}
web_configs:
  - {{path: {q(self.dir / "web-config.yml")}, roles: [scraper]}}
routes:
  node: {{allow: ["role:scraper"], targets: {{static: ["{ex}"]}}}}
audit: {{path: {q(self.audit_log)}, key_file: {q(self.pki.audit_key)}}}
"""
        )
        gateway = self.gateway = GatewayProcess(self.dir / "gateway", config)
        self.config_path = gateway.config_path
        cleanups.append(gateway.stop)
        gateway.start()
        plain, scrape = gateway.address("plain"), gateway.address("scrape")
        node = scrape_path("node", ex)
        prometheus = self.pki.client_context("prometheus")
        stranger = self.pki.client_context("stranger")

        self.token_ok = fetch(plain, node, None, bearer(AGENT_TOKEN))
        self.exporter_headers = [h for _, h in self.exporter.requests]
        self.token_sd = fetch(plain, "/sd", None, bearer(AGENT_TOKEN))
        self.token_wrong = fetch(plain, node, None, bearer(AGENT_TOKEN + "x"))
        self.missing = fetch(plain, node, None)
        keep_alive = http.client.HTTPConnection(*_split(plain), timeout=30)
        self.basic_ok = [
            fetch(plain, node, None, basic("ops", OPS_PASSWORD), conn=keep_alive) for _ in range(3)
        ]
        keep_alive.close()
        self.basic_wrong = fetch(plain, node, None, basic("ops", "guess"))
        self.conflict = fetch(scrape, node, prometheus, bearer(AGENT_TOKEN))
        self.stranger_token = fetch(scrape, node, stranger, bearer(AGENT_TOKEN))
        self.stranger_bare = fetch(scrape, node, stranger)
        noeku = self.pki.client_context(None)
        noeku.load_cert_chain(str(noeku_cert), str(noeku_key))
        self.noeku_local, self.noeku_received, self.noeku_error = attempt_handshake(scrape, noeku)
        gateway.wait_for_audit_record(self.audit_log, refused_handshake_from(self.noeku_local))
        metrics = https_get(gateway.address("admin"), "/metrics", None).body.decode()
        self.authn_failures = {
            (labels["listener"], labels["reason"]): value
            for labels, value in metric_samples(metrics, "promgate_authn_failures_total")
        }
        self.handshake_failures = {
            (labels["listener"], labels["reason"]): value
            for labels, value in metric_samples(metrics, "promgate_tls_handshake_failures_total")
        }
        self.exit_code = gateway.stop()
        self.records: list[dict[str, Any]] = gateway.audit_records(self.audit_log)
        self.requests = [r for r in self.records if r["event"] == "request"]


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


SCENARIO = Shared(CredentialScenario)


class CredentialIntegrationTests(SynchronousTestCase):
    """Tokens, passwords and certificates, end to end through the real gateway."""

    def setUp(self) -> None:
        self.s = SCENARIO.get()

    def reasons(self) -> list[tuple[str, int | None, str | None, str]]:
        return [
            (r["listener"], r.get("status"), r.get("identity"), r["reason"])
            for r in self.s.requests
        ]

    def test_bearer_token(self) -> None:
        """A bearer token from a token file is accepted; the exporter never sees it."""
        self.assertEqual((self.s.token_ok.status, self.s.token_ok.body), (200, self.s.body))
        self.assertEqual(len(self.s.exporter_headers), 1)
        self.assertNotIn("authorization", self.s.exporter_headers[0])
        self.assertNotIn(AGENT_TOKEN, json.dumps(self.s.exporter_headers))

    def test_sd_with_token(self) -> None:
        """/sd answers a token holder with its targets, to be scraped over plain http."""
        self.assertEqual(self.s.token_sd.status, 200)
        (group,) = json.loads(self.s.token_sd.body)
        self.assertEqual(group["labels"]["__param_route"], "node")
        self.assertEqual(group["labels"]["__scheme__"], "http")

    def test_wrong_token(self) -> None:
        """A wrong token is 401 with a WWW-Authenticate per configured scheme."""
        self.assertEqual(self.s.token_wrong.status, 401)
        self.assertEqual(
            self.s.token_wrong.challenges,
            ['Bearer realm="promgate"', 'Basic realm="promgate", charset="UTF-8"'],
        )

    def test_missing(self) -> None:
        """No credential at all on the plain-text listener: 401 authn_missing, challenged."""
        self.assertEqual(self.s.missing.status, 401)
        self.assertEqual(len(self.s.missing.challenges), 2)

    def test_basic_auth(self) -> None:
        """The web-config.yml user and password are accepted, request after request on one
        connection (bcrypt in a thread, then the cache)."""
        self.assertEqual([r.status for r in self.s.basic_ok], [200, 200, 200])
        self.assertEqual(self.s.basic_wrong.status, 401)

    def test_conflict(self) -> None:
        """prometheus's certificate with agent's token: 403 authn_conflict."""
        self.assertEqual(self.s.conflict.status, 403)
        self.assertEqual(self.s.conflict.challenges, [])

    def test_certificate_naming_nobody(self) -> None:
        """A valid certificate no identity names: served with a token (as the token's
        identity), 401 authn_missing without one."""
        self.assertEqual(self.s.stranger_token.status, 200)
        self.assertEqual(self.s.stranger_bare.status, 401)

    def test_no_client_auth_usage_refused_at_handshake(self) -> None:
        """A certificate without the clientAuth usage never gets an HTTP answer; the refusal
        is audited with reason certificate_purpose and counted."""
        self.assertEqual(self.s.noeku_received, b"")
        (record,) = [
            r
            for r in self.s.records
            if r["event"] == "tls_handshake_failed" and r.get("peer") == self.s.noeku_local
        ]
        self.assertEqual(
            (record["listener"], record["decision"], record["reason"], record["cert_subject"]),
            ("scrape", "deny", "certificate_purpose", "CN=noeku"),
        )
        self.assertEqual(record["cert_sha256"], self.s.noeku_sha256)
        self.assertEqual(self.s.handshake_failures[("scrape", "certificate_purpose")], 1.0)

    def test_audit_records(self) -> None:
        """Each request is audited with its listener, status, identity and reason."""
        self.assertEqual(
            self.reasons(),
            [
                ("plain", 200, "agent", "ok"),
                ("plain", 200, "agent", "ok"),
                ("plain", 401, None, "authn_failed"),
                ("plain", 401, None, "authn_missing"),
                ("plain", 200, "ops", "ok"),
                ("plain", 200, "ops", "ok"),
                ("plain", 200, "ops", "ok"),
                ("plain", 401, None, "authn_failed"),
                ("scrape", 403, None, "authn_conflict"),
                ("scrape", 200, "agent", "ok"),
                ("scrape", 401, None, "authn_missing"),
            ],
        )
        wrong_password = self.s.requests[7]
        self.assertEqual(wrong_password["detail"], "basic auth user 'ops': wrong password")
        for record in self.s.requests:
            self.assertNotIn(AGENT_TOKEN, json.dumps(record))
            self.assertNotIn(OPS_PASSWORD, json.dumps(record))

    def test_authn_failures_metric(self) -> None:
        """promgate_authn_failures_total counts each refusal by listener and reason."""
        self.assertEqual(
            {k: v for k, v in self.s.authn_failures.items() if v},
            {
                ("plain", "authn_failed"): 2.0,
                ("plain", "authn_missing"): 1.0,
                ("scrape", "authn_conflict"): 1.0,
                ("scrape", "authn_missing"): 1.0,
            },
        )

    def test_audit_log_verifies(self) -> None:
        """After the stop, ``promgate audit verify`` accepts the whole log."""
        self.assertIsNotNone(self.s.exit_code)
        code, out, err = run_cli("audit", "verify", "--config", str(self.s.config_path))
        self.assertEqual(code, 0, err)
        self.assertIn(f"OK: {len(self.s.records)} record(s) verified", out)
        self.assertIn("clean stop", out)

    def test_check_config(self) -> None:
        """``promgate check-config`` accepts the configuration, counting the web-config
        user as an identity, and warns about the plain-text listener."""
        code, out, err = run_cli("check-config", str(self.s.config_path))
        self.assertEqual(code, 0, err)
        self.assertIn("3 identities", out)
        self.assertIn("clear text", err)
