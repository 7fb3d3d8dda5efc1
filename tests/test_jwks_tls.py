"""An identity provider over HTTPS with its own ``ca``: a real twisted.web HTTPS server on
127.0.0.1, with a certificate from a test CA, serves discovery and the JWKS. Trusted through
the provider's ``ca`` key, its keys verify tokens; a certificate that CA did not issue makes
the fetch fail, and the keys already held stay."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.ssl import PrivateCertificate
from twisted.trial.unittest import TestCase
from twisted.web.server import Site
from zope.interface import implementer

from promgate.config.loader import load_config
from promgate.config.model import Config
from promgate.identity import Recognition
from promgate.jwks import IdentityProviderKeys
from promgate.jwt_authn import JWTVerifier
from promgate.metrics import Metrics
from promgate.testing import TestIssuer, TestPKI

reactor: Any = _reactor

AUDIT_KEY = "0123456789abcdef" * 4

CONFIG = """\
admin: {endpoint: "tcp:0:interface=127.0.0.1"}
listeners:
  - {name: local, protocol: http, endpoint: "tcp:0:interface=127.0.0.1", tls: false}
identity_providers:
  idp:
    issuer: %(issuer)s
    audiences: [promgate]
    ca: %(ca)s
identities:
  prometheus-idp:
    jwt: {provider: idp, subject: prometheus-client}
    roles: [scraper]
routes:
  node:
    allow: ["role:scraper"]
    targets: {static: ["127.0.0.1:9100"]}
audit: {path: audit.jsonl, key_file: audit.key}
"""


@implementer(IOpenSSLContextFactory)
class _Switchable:
    """A server TLS context factory whose certificate can be swapped between
    connections: the issuer moving to a certificate the gateway does not trust."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.use(cert, key)

    def use(self, cert: Path, key: Path) -> None:
        pem = cert.read_bytes() + key.read_bytes()
        self.options = PrivateCertificate.loadPEM(pem).options()

    def getContext(self) -> Any:
        return self.options.getContext()


class HTTPSIssuerTests(TestCase):
    """Keys fetched over HTTPS, trusted through the provider's ``ca``."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir(parents=True)
        (self.root / "audit.key").write_text(AUDIT_KEY + "\n")
        self.pki = TestPKI(self.root / "pki")  # the issuer's CA and certificate
        self.other = TestPKI(self.root / "other")  # a CA the provider does not trust
        self.tls = _Switchable(self.pki.gate_cert, self.pki.gate_key)
        self.issuer = TestIssuer("https://127.0.0.1:1")  # the port is set below
        port = reactor.listenSSL(0, Site(self.issuer.resource()), self.tls, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"https://127.0.0.1:{port.getHost().port}"
        self.issuer.issuer = url
        self.issuer.jwks_uri = url + "/keys"

    def gateway_keys(self, ca: str) -> tuple[Config, IdentityProviderKeys]:
        """The configuration (``ca`` relative to it) and the keys service it makes,
        started: its first fetch is under way."""
        path = self.root / "promgate.yaml"
        path.write_text(textwrap.dedent(CONFIG % {"issuer": self.issuer.issuer, "ca": ca}))
        config = load_config(path)
        self.metrics = Metrics()
        service = IdentityProviderKeys(
            config.identity_providers, reactor, metrics=self.metrics.identity_providers
        )
        service.startService()
        self.addCleanup(service.stopService)
        return config, service

    def verifier(self, config: Config, service: IdentityProviderKeys) -> JWTVerifier:
        return JWTVerifier(config.identity_providers, config.identities, service.keys, reactor)

    def sample(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"provider": "idp"})

    def failures(self) -> float | None:
        return self.sample("promgate_identity_provider_refresh_failures_total")

    def token(self) -> bytes:
        return self.issuer.token("prometheus-client", now=reactor.seconds())

    async def recognise(self, verifier: JWTVerifier) -> Recognition:
        """A fresh token, verified (waiting for a fetch of the keys, if it asks one)."""
        result = verifier.verify(self.token())
        if isinstance(result, Deferred):
            return await result
        return result

    async def test_trusted_through_ca(self) -> None:
        """Discovery then JWKS over HTTPS, the certificate checked against ``ca``: the
        key is held and a token verifies as the identity its sub names."""
        config, service = self.gateway_keys("pki/ca.pem")
        keys = service.keys["idp"]
        await keys.refresh()  # joins the first fetch
        self.assertEqual([k.kid for k in keys.keys], [self.issuer.kid])
        base = self.issuer.issuer
        self.assertEqual(
            self.issuer.fetched, [base + "/.well-known/openid-configuration", base + "/keys"]
        )
        self.assertEqual(self.sample("promgate_identity_provider_keys"), 1)
        self.assertEqual(self.failures(), 0)
        verifier = self.verifier(config, service)
        recognition = verifier.verify(self.token())
        assert not isinstance(recognition, Deferred)  # the key is held: no fetch
        assert recognition.identity is not None
        self.assertEqual(recognition.identity.name, "prometheus-idp")

    async def test_wrong_ca(self) -> None:
        """A ``ca`` that did not issue the issuer's certificate: the TLS handshake fails,
        no request reaches the issuer, nothing is held, the failure is counted and a
        token is refused as signed with an unknown key."""
        config, service = self.gateway_keys("other/ca.pem")
        keys = service.keys["idp"]
        await keys.refresh()
        self.assertEqual(keys.keys, ())
        self.assertEqual(self.issuer.fetched, [])
        self.assertEqual(self.failures(), 1)
        recognition = await self.recognise(self.verifier(config, service))
        self.assertEqual(self.failures(), 2)  # the unknown kid asked once more, in vain
        self.assertIsNone(recognition.identity)
        self.assertEqual(recognition.reason, "authn_failed")
        self.assertEqual(recognition.token_error, "unknown signing key")

    async def test_certificate_changes_to_untrusted(self) -> None:
        """Keys held, then the issuer answers with a certificate another CA issued: the
        refresh fails and is counted, the keys held stay and tokens still verify."""
        config, service = self.gateway_keys("pki/ca.pem")
        keys = service.keys["idp"]
        await keys.refresh()
        self.assertEqual(len(keys.keys), 1)
        verifier = self.verifier(config, service)
        self.tls.use(self.other.gate_cert, self.other.gate_key)
        fetched = len(self.issuer.fetched)
        await keys.refresh()
        self.assertEqual(self.failures(), 1)
        self.assertEqual(len(self.issuer.fetched), fetched)  # refused at the handshake
        self.assertEqual([k.kid for k in keys.keys], [self.issuer.kid])
        self.assertEqual(self.sample("promgate_identity_provider_keys"), 1)
        recognition = verifier.verify(self.token())
        assert not isinstance(recognition, Deferred)
        assert recognition.identity is not None
        self.assertEqual(recognition.identity.name, "prometheus-idp")
        # Back to a trusted certificate: the next refresh succeeds again.
        self.tls.use(self.pki.gate_cert, self.pki.gate_key)
        await keys.refresh()
        self.assertEqual((self.failures(), len(keys.keys)), (1, 1))

    async def test_system_trust_refuses_test_ca(self) -> None:
        """Without ``ca`` the system's trust applies, which knows nothing of a test CA."""
        path = self.root / "promgate.yaml"
        text = CONFIG.replace("    ca: %(ca)s\n", "") % {"issuer": self.issuer.issuer}
        path.write_text(text)
        config = load_config(path)
        self.assertIsNone(config.identity_providers["idp"].ca)
        self.metrics = Metrics()
        service = IdentityProviderKeys(
            config.identity_providers, reactor, metrics=self.metrics.identity_providers
        )
        service.startService()
        self.addCleanup(service.stopService)
        await service.keys["idp"].refresh()
        self.assertEqual((service.keys["idp"].keys, self.failures()), ((), 1))
