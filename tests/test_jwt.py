"""JWT bearer tokens of identity providers, through the whole gateway in memory: every
refusal (with its RFC 6750 challenge and audit record), matching on ``sub`` and claims,
the cache of verified tokens, key rotation, clock skew on the injected clock, and an
issuer that is down. No test here opens a socket (see test_jwks.py for real HTTP)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.trial.unittest import SynchronousTestCase

from promgate.config.loader import load_config
from promgate.config.model import JWTMatch
from promgate.jwks import MIN_REFETCH
from promgate.jwt_authn import TOKEN_ERRORS, claims_match
from promgate.testing import Bearer, MemoryGateway, Response, TestIssuer
from promgate.testing.oidc import unsigned_token

ISSUER = "https://idp.example.org/oauth2/default"
SCRAPE = "/scrape?route=node&target=10.0.0.5%3A9100"
METRICS = b"up 1\n"
AUDIT_KEY = "0123456789abcdef" * 4

CONFIG = """\
admin: {endpoint: "tcp:9099:interface=127.0.0.1"}
listeners:
  - {name: local, protocol: http, endpoint: "tcp:8080:interface=127.0.0.1", tls: false}
  - {name: egress, protocol: forward, endpoint: "tcp:3128:interface=127.0.0.1", tls: false}
identity_providers:
  okta:
    issuer: %(issuer)s
    audiences: [promgate]
    algorithms: [RS256, ES256]
    leeway: 30s
    refresh: 1h
identities:
  prometheus-okta:
    jwt: {provider: okta, subject: prometheus-client}
    roles: [scraper]
  monitoring-team:
    jwt: {provider: okta, claims: {scp: metrics.read, groups: monitoring}}
    roles: [scraper]
  twin-a: {jwt: {provider: okta, subject: twin}, roles: [scraper]}
  twin-b: {jwt: {provider: okta, claims: {sub: twin}}, roles: [scraper]}
routes:
  node:
    allow: ["role:scraper"]
    targets: {static: ["10.0.0.5:9100"]}
audit: {path: audit.jsonl, key_file: audit.key}
"""


def write_config(case: SynchronousTestCase, text: str = CONFIG, **values: str) -> Path:
    root = Path(case.mktemp()).resolve()
    root.mkdir(parents=True)
    (root / "audit.key").write_text(AUDIT_KEY + "\n")
    path = root / "promgate.yaml"
    path.write_text(textwrap.dedent(text % {"issuer": ISSUER, **values}))
    return path


class GatewayCase(SynchronousTestCase):
    """A gateway in memory whose provider ``okta`` is a TestIssuer answering at once."""

    def setUp(self) -> None:
        self.issuer = TestIssuer(ISSUER)
        self.config_file = write_config(self)
        self.gw = MemoryGateway.from_config_file(self.config_file, fetch_keys=self.issuer.fetch)
        self.addCleanup(self.gw.stop)
        self.exporter = self.gw.upstream("10.0.0.5:9100", body=METRICS)

    @property
    def now(self) -> float:
        return self.gw.reactor.seconds()

    def token(self, sub: str = "prometheus-client", **kw: Any) -> bytes:
        return self.issuer.token(sub, now=self.now, **kw)

    def scrape(self, token: bytes, listener: str = "local") -> Response:
        return self.gw.get(SCRAPE, identity=Bearer(token.decode()), listener=listener)

    def assertRefused(self, response: Response, kind: str) -> None:
        """401, with the RFC 6750 challenge naming the kind of refusal."""
        self.assertEqual(response.status, 401, response)
        self.assertEqual(
            response.headers["www-authenticate"],
            'Bearer realm="promgate", error="invalid_token", '
            f'error_description="{TOKEN_ERRORS[kind]}"',
        )

    def last_record(self) -> Any:
        return self.gw.audit_records("request")[-1]


class AcceptedTests(GatewayCase):
    """Tokens that verify name the identity their ``sub`` or claims match."""

    def test_subject(self) -> None:
        """A token whose sub is the rule's subject scrapes; the audit record names the
        identity."""
        response = self.scrape(self.token())
        self.assertEqual((response.status, response.body), (200, METRICS))
        record = self.last_record()
        self.assertEqual((record.identity, record.decision), ("prometheus-okta", "allow"))
        (request,) = self.exporter.requests
        self.assertNotIn("authorization", {k.lower() for k, _ in request.headers})

    def test_claims(self) -> None:
        """Every claim listed must equal the token's or be one of its members: a list
        (groups) or a space-separated string (scp)."""
        token = self.token("someone", scp="openid metrics.read", groups=["ops", "monitoring"])
        self.assertEqual(self.scrape(token).status, 200)
        self.assertEqual(self.last_record().identity, "monitoring-team")

    def test_claims_missing_one(self) -> None:
        """A token lacking one of the claims names nobody: unknown_identity (403)."""
        token = self.token("someone", scp="metrics.read", groups=["ops"])
        response = self.scrape(token)
        self.assertEqual(response.status, 403)
        record = self.last_record()
        self.assertEqual(record.reason, "unknown_identity")
        self.assertIn("sub='someone'", record.detail)

    def test_ambiguous(self) -> None:
        """A token two identities' rules match is refused as identity_ambiguous."""
        response = self.scrape(self.token("twin"))
        self.assertEqual(response.status, 403)
        self.assertEqual(self.last_record().reason, "identity_ambiguous")

    def test_es256(self) -> None:
        """Any configured asymmetric algorithm: an EC key signs too."""
        kid = self.issuer.rotate("EC")
        self.assertEqual(self.scrape(self.token(kid=kid)).status, 200)

    def test_audience_list(self) -> None:
        """aud may be a list: one of the provider's audiences is enough."""
        self.assertEqual(self.scrape(self.token(aud=["other", "promgate"])).status, 200)

    def test_forward_proxy(self) -> None:
        """On the forward proxy the token comes in Proxy-Authorization."""
        response = self.gw.get(
            "http://10.0.0.5:9100/metrics",
            identity=Bearer(self.token().decode()),
            listener="egress",
        )
        self.assertEqual((response.status, response.body), (200, METRICS))
        self.assertEqual(self.last_record().identity, "prometheus-okta")

    def test_static_tokens_unchanged(self) -> None:
        """Without a JWT, a bearer token is matched by digest as before (here: none)."""
        response = self.scrape(b"not-a-jwt")
        self.assertEqual(response.status, 401)
        self.assertEqual(response.headers["www-authenticate"], 'Bearer realm="promgate"')
        self.assertEqual(self.last_record().reason, "authn_failed")


class RefusalTests(GatewayCase):
    """Each kind of bad token: 401 with error="invalid_token" and a constant description;
    the audit record says why and names iss, sub and jti, never the token."""

    def test_expired(self) -> None:
        token = self.issuer.token("prometheus-client", now=self.now - 400, lifetime=300)
        response = self.scrape(token)
        self.assertRefused(response, "expired")
        self.assertEqual(self.exporter.requests, [])
        record = self.last_record()
        self.assertEqual((record.reason, record.status), ("authn_failed", 401))
        self.assertIn("jwt provider okta", record.detail)
        self.assertIn(f"iss='{ISSUER}'", record.detail)
        self.assertIn("sub='prometheus-client'", record.detail)
        self.assertIn("jti=", record.detail)
        self.assertIn("token expired", record.detail)
        self.assertNotIn(token.decode(), repr(record))
        self.assertNotIn(token.decode().split(".")[2], repr(record))

    def test_wrong_audience(self) -> None:
        self.assertRefused(self.scrape(self.token(aud="someone-else")), "audience")

    def test_no_audience(self) -> None:
        self.assertRefused(self.scrape(self.token(aud=None)), "audience")

    def test_no_expiry(self) -> None:
        """A token without exp would be valid forever: refused."""
        self.assertRefused(self.scrape(self.token(exp=None)), "claims")

    def test_bad_signature(self) -> None:
        """Signed by another key under the kid of a real one."""
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.assertRefused(self.scrape(self.token(key=other)), "signature")

    def test_tampered_payload(self) -> None:
        header, _, signature = self.token().split(b".")
        forged = self.issuer.token("prometheus-client", now=self.now, lifetime=10**6)
        token = b".".join([header, forged.split(b".")[1], signature])
        self.assertRefused(self.scrape(token), "signature")

    def test_unknown_issuer(self) -> None:
        other = TestIssuer("https://evil.example.org")
        token = other.token("prometheus-client", now=self.now)
        self.assertRefused(self.scrape(token), "issuer")

    def test_alg_none(self) -> None:
        """An unsigned token (alg none) never verifies."""
        claims = {"iss": ISSUER, "sub": "prometheus-client", "aud": "promgate"}
        token = unsigned_token({"alg": "none"}, {**claims, "exp": self.now + 60})
        self.assertRefused(self.scrape(token), "algorithm")

    def test_hmac_key_confusion(self) -> None:
        """HS256 with the issuer's public key as the secret: refused, never checked with
        that key."""
        kid = self.issuer.kid
        public = self.issuer.keys[kid][1].public_key()
        pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        claims = {"iss": ISSUER, "sub": "prometheus-client", "aud": "promgate"}
        header = {"alg": "HS256", "kid": kid}
        token = unsigned_token(header, {**claims, "exp": self.now + 60}, secret=pem)
        self.assertRefused(self.scrape(token), "algorithm")

    def test_algorithm_not_configured(self) -> None:
        """PS256 is a fine algorithm, but this provider accepts RS256 and ES256 only."""
        self.assertRefused(self.scrape(self.token(alg="PS256")), "algorithm")

    def test_key_used_with_another_algorithm(self) -> None:
        """A JWK that names its algorithm (RS256) is not used for another (here ES256 is
        accepted by the provider, but the key is RSA)."""
        self.assertRefused(self.scrape(self.token(alg="PS256")), "algorithm")
        kid = self.issuer.kid
        ec_kid = self.issuer.rotate("EC")
        ec_key = self.issuer.keys[ec_kid][1]
        token = self.token(kid=kid, key=ec_key, alg="ES256")
        self.assertRefused(self.scrape(token), "key")

    def test_malformed(self) -> None:
        response = self.scrape(b"eyJhbGciOiJSUzI1NiJ9.!!!.abc")
        self.assertRefused(response, "malformed")

    def test_not_yet_valid(self) -> None:
        self.assertRefused(self.scrape(self.token(nbf=int(self.now) + 120)), "not_yet_valid")

    def test_issued_in_the_future(self) -> None:
        token = self.issuer.token("prometheus-client", now=self.now + 120)
        self.assertRefused(self.scrape(token), "not_yet_valid")

    def test_forward_proxy_challenge(self) -> None:
        """The forward proxy answers 407 with the same challenge in Proxy-Authenticate."""
        token = self.issuer.token("prometheus-client", now=self.now - 400, lifetime=300)
        response = self.gw.get(
            "http://10.0.0.5:9100/metrics", identity=Bearer(token.decode()), listener="egress"
        )
        self.assertEqual(response.status, 407)
        self.assertEqual(
            response.headers["proxy-authenticate"],
            'Bearer realm="promgate", error="invalid_token", error_description="token expired"',
        )
        self.assertEqual(self.last_record().reason, "authn_failed")

    def test_missing_credentials_challenge(self) -> None:
        """No token at all: the plain Bearer challenge (providers make one acceptable)."""
        response = self.gw.get(SCRAPE, listener="local")
        self.assertEqual(response.status, 401)
        self.assertEqual(response.headers["www-authenticate"], 'Bearer realm="promgate"')


class ClockTests(GatewayCase):
    """Times are judged on the gateway's clock, within the provider's leeway (30s)."""

    def test_expiry_within_leeway(self) -> None:
        token = self.token(lifetime=60)
        self.gw.advance(60 + 29)
        self.assertEqual(self.scrape(token).status, 200)
        self.gw.advance(2)
        self.assertRefused(self.scrape(token), "expired")

    def test_gateway_clock_behind(self) -> None:
        """An issuer whose clock is 20s ahead: iat and nbf in the future, within leeway."""
        ahead = self.now + 20
        token = self.issuer.token("prometheus-client", now=ahead, nbf=int(ahead))
        self.assertEqual(self.scrape(token).status, 200)

    def test_gateway_clock_far_behind(self) -> None:
        ahead = self.now + 45
        token = self.issuer.token("prometheus-client", now=ahead, nbf=int(ahead))
        self.assertRefused(self.scrape(token), "not_yet_valid")

    def test_cached_token_still_expires(self) -> None:
        """A token answered from the cache is refused once it has expired."""
        token = self.token(lifetime=60)
        self.assertEqual(self.scrape(token).status, 200)
        self.gw.advance(120)
        self.assertRefused(self.scrape(token), "expired")


class CacheTests(GatewayCase):
    """One token reused for many scrapes costs one signature check."""

    def test_one_check(self) -> None:
        token = self.token()
        for _ in range(5):
            self.assertEqual(self.scrape(token).status, 200)
        checks = self.gw.sample(
            "promgate_identity_provider_token_verifications_total", {"provider": "okta"}
        )
        self.assertEqual(checks, 1)


class KeyRotationTests(GatewayCase):
    """A new kid is fetched when a token names it; a retired one stops verifying."""

    def test_new_key_fetched_on_unknown_kid(self) -> None:
        fetched = len(self.issuer.fetched)
        kid = self.issuer.rotate()
        self.assertEqual(self.scrape(self.token(kid=kid)).status, 200)
        self.assertEqual(len(self.issuer.fetched), fetched + 1)  # the JWKS only
        self.assertEqual(self.gw.sample("promgate_identity_provider_keys", {"provider": "okta"}), 2)

    def test_old_key_disappears(self) -> None:
        """Once the issuer stops publishing a key, tokens it signed are refused, cached
        ones included, after the next refresh."""
        old = self.issuer.kid
        token = self.token(lifetime=7200)
        self.assertEqual(self.scrape(token).status, 200)
        self.issuer.rotate()
        self.issuer.retire(old)
        self.gw.advance(3600)  # the periodic refresh
        self.assertRefused(self.scrape(token), "key")

    def test_unknown_kid_refetch_is_rate_limited(self) -> None:
        """Made-up kids ask the issuer at most once per few seconds."""
        before = len(self.issuer.fetched)
        for i in range(5):
            self.assertRefused(self.scrape(self.token(kid=f"made-up-{i}")), "key")
        self.assertEqual(len(self.issuer.fetched), before + 1)
        self.gw.advance(MIN_REFETCH)
        kid = self.issuer.rotate()
        self.assertEqual(self.scrape(self.token(kid=kid)).status, 200)
        self.assertEqual(len(self.issuer.fetched), before + 2)


class IssuerDownTests(GatewayCase):
    """The issuer being down never takes scrapes down."""

    def test_keys_kept(self) -> None:
        self.issuer.down = True
        self.gw.advance(3600)
        self.assertEqual(self.scrape(self.token()).status, 200)
        self.assertEqual(
            self.gw.sample(
                "promgate_identity_provider_refresh_failures_total", {"provider": "okta"}
            ),
            1,
        )
        self.assertEqual(self.gw.sample("promgate_identity_provider_keys", {"provider": "okta"}), 1)
        self.assertEqual(self.gw.get("/-/ready", listener="admin").status, 200)

    def test_garbage_keeps_keys(self) -> None:
        self.issuer.garbage = b'{"keys": "no"}'
        self.gw.advance(3600)
        self.assertEqual(self.scrape(self.token()).status, 200)
        self.issuer.garbage = None
        self.gw.advance(30)  # retried sooner after a failure
        last = self.gw.sample(
            "promgate_identity_provider_last_refresh_success_timestamp_seconds",
            {"provider": "okta"},
        )
        self.assertEqual(last, self.now)

    def test_down_from_the_start(self) -> None:
        """Never reached: ready all the same, and tokens are refused (unknown key)."""
        issuer = TestIssuer(ISSUER)
        issuer.down = True
        gw = MemoryGateway.from_config_file(self.config_file, fetch_keys=issuer.fetch)
        self.addCleanup(gw.stop)
        self.assertEqual(gw.get("/-/ready", listener="admin").status, 200)
        token = issuer.token("prometheus-client", now=gw.reactor.seconds())
        response = gw.get(SCRAPE, identity=Bearer(token.decode()), listener="local")
        self.assertEqual(response.status, 401)
        self.assertIn("unknown signing key", response.headers["www-authenticate"])


class ExplainTests(GatewayCase):
    """explain asks the same policy for JWT identities (they are names like any other)."""

    def test_explain(self) -> None:
        answer = self.gw.explain("prometheus-okta", SCRAPE, listener="local")
        self.assertTrue(answer.decision.allowed)


class ClaimsMatchTests(SynchronousTestCase):
    """The rule that compares a verified token's claims with a jwt: rule."""

    def test_rules(self) -> None:
        rule = JWTMatch("p", subject="s", claims={"scp": "read", "n": "3"})
        self.assertTrue(claims_match(rule, {"sub": "s", "scp": "write read", "n": 3}))
        self.assertTrue(claims_match(rule, {"sub": "s", "scp": ["read"], "n": "3"}))
        self.assertFalse(claims_match(rule, {"sub": "s", "scp": "reader", "n": 3}))
        self.assertFalse(claims_match(rule, {"sub": "t", "scp": "read", "n": 3}))
        self.assertFalse(claims_match(rule, {"sub": "s", "scp": {"read": 1}, "n": 3}))
        self.assertFalse(claims_match(rule, {"sub": "s", "n": 3}))


class ConfigTests(SynchronousTestCase):
    """check-config: identity_providers and jwt rules, with FILE:LINE: key: message."""

    def problems(self, text: str) -> str:
        from promgate.config.loader import check_config

        path = write_config(self, text)
        _, errors, _ = check_config(path)
        return "\n".join(str(e) for e in errors)

    def test_valid(self) -> None:
        config = load_config(write_config(self))
        okta = config.identity_providers["okta"]
        self.assertEqual(
            (okta.issuer, okta.audiences, okta.algorithms, okta.leeway, okta.refresh),
            (ISSUER, ("promgate",), ("RS256", "ES256"), 30.0, 3600.0),
        )
        self.assertEqual(
            config.identities["monitoring-team"].jwt,
            (JWTMatch("okta", None, {"scp": "metrics.read", "groups": "monitoring"}),),
        )

    def test_errors(self) -> None:
        text = CONFIG.replace("algorithms: [RS256, ES256]", "algorithms: [RS256, HS256, none]")
        text = text.replace("issuer: %(issuer)s", "issuer: http://idp.example.org")
        text = text.replace("provider: okta, subject: prometheus-client", "provider: nope")
        problems = self.problems(text)
        self.assertRegex(
            problems, r"promgate.yaml:7: identity_providers.okta.issuer: must be an https"
        )
        self.assertRegex(
            problems,
            r"promgate.yaml:9: identity_providers.okta.algorithms\[1\]: symmetric and unsigned",
        )
        self.assertIn("identity_providers.okta.algorithms[2]: symmetric", problems)
        self.assertRegex(
            problems,
            r"promgate.yaml:14: identities.prometheus-okta.jwt.provider: "
            r"no identity provider 'nope'",
        )

    def test_rule_needs_subject_or_claims(self) -> None:
        text = CONFIG.replace("provider: okta, subject: prometheus-client", "provider: okta")
        self.assertIn(
            "identities.prometheus-okta.jwt: give subject, claims or both", self.problems(text)
        )

    def test_issuer_once(self) -> None:
        text = CONFIG.replace(
            "identities:\n",
            "  again: {issuer: %(issuer)s, audiences: [x]}\nidentities:\n",
        )
        self.assertIn("is already the issuer of provider 'okta'", self.problems(text))

    def test_loopback_http_allowed(self) -> None:
        text = CONFIG.replace("issuer: %(issuer)s", "issuer: http://127.0.0.1:8000/o")
        self.assertEqual(self.problems(text), "")
