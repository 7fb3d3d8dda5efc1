"""The forward proxy's ``Authorization: Bearer`` JWT (Prometheus's ``oauth2`` through a
``proxy_url``) on a mutual-TLS connection: the token and the client certificate combine as
a ``/scrape`` request's ``Authorization`` and certificate do, ``Proxy-Authorization`` comes
first when both headers are sent, and no client header is forwarded. In memory."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from promgate.jwt_authn import TOKEN_ERRORS
from promgate.testing import MemoryGateway, Response, TestIssuer, TestPKI

ISSUER = "https://idp.example.org/oauth2/default"
TARGET = "http://10.0.0.5:9100/metrics"
METRICS = b"up 1\n"

CONFIG = """\
tls: {certificate: pki/gate.pem, key: pki/gate-key.pem, client_ca: pki/ca.pem}
admin: {endpoint: "tcp:9099:interface=127.0.0.1"}
listeners:
  - {name: egress, protocol: forward, endpoint: "tcp:3128:interface=127.0.0.1"}
identity_providers:
  okta: {issuer: "%(issuer)s", audiences: [promgate]}
identities:
  prometheus:
    cert: {uri: "spiffe://promgate.local/prometheus"}
    roles: [scraper]
  prometheus-okta:
    jwt: {provider: okta, subject: prometheus-client}
    roles: [scraper]
  both:
    cert: {uri: "spiffe://promgate.local/both"}
    jwt: {provider: okta, subject: both-client}
    roles: [scraper]
routes:
  node:
    allow: ["role:scraper"]
    targets: {static: ["10.0.0.5:9100"]}
audit: {path: audit.jsonl, key_file: pki/audit.key}
"""


class ForwardJWTWithCertificateTests(SynchronousTestCase):
    """A forward listener with mutual TLS, an identity provider, and identities named by
    certificate (``prometheus``), by token (``prometheus-okta``) or by both (``both``)."""

    def setUp(self) -> None:
        root = Path(self.mktemp()).resolve()
        root.mkdir(parents=True)
        self.pki = TestPKI(root / "pki")
        path = root / "promgate.yaml"
        path.write_text(textwrap.dedent(CONFIG % {"issuer": ISSUER}))
        self.issuer = TestIssuer(ISSUER)
        self.gw = MemoryGateway.from_config_file(path, fetch_keys=self.issuer.fetch)
        self.addCleanup(self.gw.stop)
        self.exporter = self.gw.upstream("10.0.0.5:9100", body=METRICS)

    def token(self, sub: str, **kw: Any) -> str:
        return self.issuer.token(sub, now=self.gw.reactor.seconds(), **kw).decode()

    def get(self, client: str, **headers: str) -> Response:
        """One absolute-form GET on a connection presenting ``client``'s certificate."""
        conn = self.gw.connect(self.pki.client(client), listener="egress")
        try:
            return conn.request(
                TARGET, headers={k.replace("_", "-"): v for k, v in headers.items()}
            )
        finally:
            conn.close()

    def record(self) -> Any:
        return self.gw.audit_records("request")[-1]

    def assertServedAs(self, response: Response, identity: str) -> None:
        """200 from the exporter, audited as ``identity``, and no credential forwarded."""
        self.assertEqual((response.status, response.body), (200, METRICS), response)
        record = self.record()
        self.assertEqual((record.identity, record.decision), (identity, "allow"))
        sent = {name.lower() for name, _ in self.exporter.requests[-1].headers}
        self.assertFalse(sent & {"authorization", "proxy-authorization"}, sent)

    def test_certificate_alone(self) -> None:
        """No header: the certificate names the caller, as before."""
        self.assertServedAs(self.get("prometheus"), "prometheus")

    def test_certificate_names_nobody(self) -> None:
        """A certificate that names no identity, and a JWT that does: the token's identity
        (what Prometheus with a client certificate the gateway does not know sends)."""
        response = self.get("stranger", Authorization="Bearer " + self.token("prometheus-client"))
        self.assertServedAs(response, "prometheus-okta")

    def test_both_name_the_same_identity(self) -> None:
        """Certificate and JWT naming the same identity: that identity."""
        response = self.get("both", Authorization="Bearer " + self.token("both-client"))
        self.assertServedAs(response, "both")

    def test_conflict(self) -> None:
        """Certificate and JWT naming two identities: 403 authn_conflict, before routing,
        and nothing reaches the exporter."""
        response = self.get("prometheus", Authorization="Bearer " + self.token("prometheus-client"))
        self.assertEqual(response.status, 403, response)
        record = self.record()
        self.assertEqual((record.reason, record.identity), ("authn_conflict", None))
        self.assertIn("certificate names 'prometheus'", record.detail)
        self.assertIn("Authorization names 'prometheus-okta'", record.detail)
        self.assertEqual(self.exporter.requests, [])

    def test_refused_token_is_not_ignored(self) -> None:
        """A JWT that does not verify is refused (407 with the RFC 6750 challenge), even
        though the certificate names an identity."""
        expired = self.token("prometheus-client", lifetime=-3600)
        response = self.get("prometheus", Authorization="Bearer " + expired)
        self.assertEqual(response.status, 407, response)
        self.assertEqual(
            response.headers["proxy-authenticate"],
            'Bearer realm="promgate", error="invalid_token", '
            f'error_description="{TOKEN_ERRORS["expired"]}"',
        )
        self.assertEqual(self.record().reason, "authn_failed")
        self.assertEqual(self.exporter.requests, [])

    def test_token_of_the_certificates_identity_with_other_key(self) -> None:
        """A JWT signed with a key the issuer does not publish: 407, whatever the
        certificate said."""
        other = TestIssuer(ISSUER)
        forged = other.token("both-client", now=self.gw.reactor.seconds(), kid=self.issuer.kid)
        response = self.get("both", Authorization="Bearer " + forged.decode())
        self.assertEqual(response.status, 407, response)
        self.assertEqual(self.record().reason, "authn_failed")

    def test_proxy_authorization_comes_first(self) -> None:
        """With both headers, Proxy-Authorization is the credential and Authorization is
        not looked at: a valid Proxy-Authorization token for the certificate's identity
        is served as it, whatever JWT Authorization carries."""
        response = self.get(
            "both",
            Proxy_Authorization="Bearer " + self.token("both-client"),
            Authorization="Bearer " + self.token("prometheus-client"),
        )
        self.assertServedAs(response, "both")

    def test_bad_proxy_authorization_is_not_rescued(self) -> None:
        """A Proxy-Authorization that does not verify is refused, even with a valid JWT
        in Authorization."""
        response = self.get(
            "stranger",
            Proxy_Authorization="Bearer " + self.token("prometheus-client", aud="someone-else"),
            Authorization="Bearer " + self.token("prometheus-client"),
        )
        self.assertEqual(response.status, 407, response)
        self.assertIn(TOKEN_ERRORS["audience"], response.headers["proxy-authenticate"])

    def test_per_request(self) -> None:
        """The token is per request: the next request on the same connection without it
        is the certificate's again."""
        conn = self.gw.connect(self.pki.client("stranger"), listener="egress")
        self.addCleanup(conn.close)
        bearer = {"Authorization": "Bearer " + self.token("prometheus-client")}
        self.assertEqual(conn.request(TARGET, headers=bearer).status, 200)
        self.assertEqual(self.record().identity, "prometheus-okta")
        response = conn.request(TARGET)
        self.assertEqual(response.status, 407, response)
        self.assertEqual(self.record().reason, "authn_missing")
