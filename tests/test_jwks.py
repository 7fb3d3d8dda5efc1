"""Fetching identity providers' keys over real HTTP on 127.0.0.1: discovery then JWKS, and
an issuer that is down, slow, or answers garbage (the keys held are kept)."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from promgate.config.model import IdentityProvider
from promgate.jwks import HTTPFetcher, ProviderKeys
from promgate.metrics import Metrics
from promgate.testing import TestIssuer

reactor: Any = _reactor


class _Slow(Resource):
    """Answers nothing, ever (until the test ends)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render_GET(self, request: Request) -> Any:
        self.requests.append(request)
        return NOT_DONE_YET


class _Fixed(Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request: Request) -> bytes:
        return self.body


class FetchTests(TestCase):
    """ProviderKeys with the HTTP fetcher, against servers on loopback."""

    def serve(self, resource: Resource) -> str:
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    def keys(self, issuer: str, *, timeout: float = 5.0, **kw: Any) -> ProviderKeys:
        provider = IdentityProvider("idp", issuer, ("promgate",), **kw)
        self.metrics = Metrics()
        keys = ProviderKeys(
            provider,
            reactor,
            HTTPFetcher(reactor, timeout=timeout),
            metrics=self.metrics.identity_providers,
        )
        return keys

    def failures(self) -> float | None:
        return self.metrics.registry.get_sample_value(
            "promgate_identity_provider_refresh_failures_total", {"provider": "idp"}
        )

    async def test_discovery_then_jwks(self) -> None:
        """The discovery document names the JWKS; its key is held."""
        issuer = TestIssuer("http://127.0.0.1:1")  # the port is set below
        url = self.serve(issuer.resource())
        issuer.issuer = url
        issuer.jwks_uri = url + "/keys"
        keys = self.keys(url)
        await keys.refresh()
        self.assertEqual([k.kid for k in keys.keys], [issuer.kid])
        self.assertEqual(issuer.fetched, [url + "/.well-known/openid-configuration", url + "/keys"])
        keys.stop()

    async def test_down(self) -> None:
        """Nothing listens: the fetch fails, is counted, and nothing is held."""
        port = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        url = f"http://127.0.0.1:{port.getHost().port}"
        await port.stopListening()
        keys = self.keys(url, jwks_uri=url + "/keys")
        await keys.refresh()
        self.assertEqual(keys.keys, ())
        self.assertEqual(self.failures(), 1)

    async def test_slow(self) -> None:
        """An issuer that never answers is given up after the fetch deadline."""
        slow = _Slow()
        url = self.serve(slow)
        keys = self.keys(url, jwks_uri=url + "/keys", timeout=0.2)
        started = reactor.seconds()
        await keys.refresh()
        self.assertLess(reactor.seconds() - started, 3)
        self.assertEqual(self.failures(), 1)
        for request in slow.requests:
            request.channel.transport.abortConnection()

    async def test_garbage_keeps_keys(self) -> None:
        """Keys held survive a JWKS that is not one, a huge body, a 500."""
        issuer = TestIssuer("http://127.0.0.1")
        root = Resource()
        good = _Fixed(issuer.jwks())
        root.putChild(b"keys", good)
        url = self.serve(root)
        keys = self.keys(url, jwks_uri=url + "/keys")
        await keys.refresh()
        self.assertEqual(len(keys.keys), 1)
        for body in [
            b"<html>oops</html>",
            b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}',
            b"{" * (2 * 1024 * 1024),
        ]:
            good.body = body
            await keys.refresh()
            self.assertEqual(len(keys.keys), 1)
        self.assertEqual(self.failures(), 3)
        keys.stop()

    async def test_wrong_issuer_in_discovery(self) -> None:
        """A discovery document about another issuer is not trusted."""
        other = TestIssuer("https://elsewhere.example.org")
        root = Resource()
        root.putChild(b".well-known", Resource())
        root.children[b".well-known"].putChild(b"openid-configuration", _Fixed(other.discovery()))
        url = self.serve(root)
        keys = self.keys(url)
        await keys.refresh()
        self.assertEqual((keys.keys, self.failures()), ((), 1))
