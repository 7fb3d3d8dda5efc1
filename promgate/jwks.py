"""The signing keys of each identity provider: fetched from its JWKS, kept, fetched again.

Keys are fetched asynchronously (never blocking the reactor) when the gateway starts, then
every ``refresh``; a token signed with a key not held yet (an unknown ``kid``) asks for
them again at once, but at most once per :data:`MIN_REFETCH` seconds per provider, so that
made-up key ids cannot make the gateway hammer its issuer. A fetch that fails (the issuer
down, slow past :data:`FETCH_TIMEOUT`, or answering anything but a JWKS with a usable key)
changes nothing: the keys already held keep verifying tokens, the failure is counted and
logged, and the next attempt comes sooner (:data:`RETRY_AFTER_FAILURE`). A key set that is
fetched replaces the one held: a key the issuer no longer publishes is no longer trusted.

Where the keys are: the provider's ``jwks_uri`` when configured, otherwise the ``jwks_uri``
of its OpenID discovery document (``{issuer}/.well-known/openid-configuration``), whose
``issuer`` must be the configured one exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
from jwt import PyJWK
from jwt.exceptions import InvalidKeyError, PyJWKError, PyJWTError
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from promgate.config.model import IdentityProvider

if TYPE_CHECKING:
    from promgate.metrics import IdentityProviderMetrics
    from promgate.reactors import IConnectReactor

__all__ = [
    "FETCH_TIMEOUT",
    "MIN_REFETCH",
    "FetchError",
    "HTTPFetcher",
    "IdentityProviderKeys",
    "ProviderKeys",
    "SigningKey",
]

#: One fetch (discovery document or JWKS) is given up after this many seconds.
FETCH_TIMEOUT = 10.0
#: A JWKS or discovery document larger than this is not one.
MAX_DOCUMENT = 1024 * 1024
#: An unknown ``kid`` asks for the keys again at most this often, per provider.
MIN_REFETCH = 5.0
#: After a failed fetch, the next comes this soon (or at ``refresh``, if sooner).
RETRY_AFTER_FAILURE = 30.0
#: Key types that sign asymmetrically; ``oct`` (a shared secret) is never a verification key.
_ASYMMETRIC = frozenset({"RSA", "EC", "OKP"})

#: GET one URL: the body of a 200 answer, or a failure.
Fetch = Callable[[str], "Deferred[bytes]"]


class FetchError(Exception):
    """A fetch did not give a usable document; the message says why (no secrets)."""


@attrs.frozen
class SigningKey:
    """One verification key of a provider: its ``kid``, the algorithm its JWK names
    (None: any the provider accepts for its type) and the key itself."""

    kid: str | None
    alg: str | None
    jwk: PyJWK = attrs.field(eq=False)


_DONE = Failure(ResponseDone())


class _Body(Protocol):
    """Collects a response body, up to a size; more is a failure."""

    def __init__(self, done: Deferred[bytes], limit: int) -> None:
        self.done = done
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(FetchError(f"document larger than {self.limit} bytes"))
            assert self.transport is not None
            self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(FetchError(f"body cut short: {reason.getErrorMessage()}"))


class HTTPFetcher:
    """GETs documents with Twisted's ``Agent``: TLS verified against ``ca`` (the system's
    trust when None), a deadline of ``timeout`` seconds for the whole exchange, and a cap
    on the size of what is read. The CA file is read at the first fetch."""

    def __init__(
        self,
        reactor: IConnectReactor,
        ca: Path | None = None,
        *,
        timeout: float = FETCH_TIMEOUT,
        max_size: int = MAX_DOCUMENT,
    ) -> None:
        self.reactor = reactor
        self.ca = ca
        self.timeout = timeout
        self.max_size = max_size
        self._agent: Agent | None = None

    def agent(self) -> Agent:
        if self._agent is None:
            policy = BrowserLikePolicyForHTTPS()
            if self.ca is not None:
                pem = self.ca.read_bytes()
                certs = [
                    Certificate.loadPEM(b"-----BEGIN CERTIFICATE-----" + part)
                    for part in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]
                ]
                policy = BrowserLikePolicyForHTTPS(trustRoot=trustRootFromCertificates(certs))
            self._agent = Agent(self.reactor, policy, connectTimeout=self.timeout)
        return self._agent

    def __call__(self, url: str) -> Deferred[bytes]:
        d = Deferred.fromCoroutine(self._get(url))
        return d.addTimeout(self.timeout, self.reactor)

    async def _get(self, url: str) -> bytes:
        headers = Headers({b"Accept": [b"application/json"], b"User-Agent": [b"promgate"]})
        response: IResponse = await self.agent().request(b"GET", url.encode("ascii"), headers)
        if response.code != 200:
            response.deliverBody(Protocol())  # read and drop: frees the connection
            raise FetchError(f"HTTP status {response.code}")
        done: Deferred[bytes] = Deferred(lambda _: response.deliverBody(Protocol()))
        response.deliverBody(_Body(done, self.max_size))
        return await done


def parse_jwks(body: bytes, algorithms: tuple[str, ...]) -> tuple[SigningKey, ...]:
    """The usable verification keys of a JWKS document: asymmetric keys meant for
    signatures whose algorithm (if they name one) is accepted. Raises FetchError when the
    document is not a JWKS or holds no such key."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise FetchError(f"JWKS is not JSON ({e})") from None
    raw = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        raise FetchError("JWKS has no 'keys' list")
    keys: list[SigningKey] = []
    for jwk in raw[:100]:
        if not isinstance(jwk, dict) or jwk.get("kty") not in _ASYMMETRIC:
            continue
        if jwk.get("use", "sig") != "sig":
            continue
        alg = jwk.get("alg")
        if alg is not None and alg not in algorithms:
            continue
        kid = jwk.get("kid")
        try:
            key = PyJWK(jwk)
        except (PyJWKError, InvalidKeyError, PyJWTError, ValueError, TypeError):
            continue
        keys.append(SigningKey(kid if isinstance(kid, str) else None, alg, key))
    if not keys:
        raise FetchError("JWKS holds no usable signature key")
    return tuple(keys)


def discovered_jwks_uri(body: bytes, issuer: str) -> str:
    """The ``jwks_uri`` of an OpenID discovery document, which must be about ``issuer``."""
    from promgate.config.identity_providers import url_error

    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise FetchError(f"discovery document is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise FetchError("discovery document is not a JSON object")
    if data.get("issuer") != issuer:
        raise FetchError(f"discovery document names issuer {str(data.get('issuer'))[:200]!r}")
    uri = data.get("jwks_uri")
    if not isinstance(uri, str):
        raise FetchError("discovery document has no jwks_uri")
    error = url_error(uri)
    if error is not None:
        raise FetchError(f"discovery document's jwks_uri {uri[:200]!r}: {error}")
    return uri


class ProviderKeys:
    """The keys of one identity provider, as last fetched, and their refreshing."""

    log = Logger()

    def __init__(
        self,
        provider: IdentityProvider,
        clock: IReactorTime,
        fetch: Fetch,
        *,
        metrics: IdentityProviderMetrics | None = None,
    ) -> None:
        self.provider = provider
        self.clock = clock
        self.fetch = fetch
        self.metrics = metrics
        self.keys: tuple[SigningKey, ...] = ()
        self._by_kid: Mapping[str, SigningKey] = {}
        self._jwks_uri: str | None = provider.jwks_uri
        self._in_flight: Deferred[tuple[SigningKey, ...]] | None = None
        #: When an unknown ``kid`` last made the keys be fetched again.
        self._last_unknown: float | None = None
        self._timer: IDelayedCall | None = None
        self._running = False
        self._waiters: list[Deferred[None]] = []

    # -- life ------------------------------------------------------------------------------

    def start(self) -> None:
        """Fetch the keys now, then every ``refresh``."""
        self._running = True
        self.refresh()

    def stop(self) -> None:
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._in_flight is not None:
            self._in_flight.cancel()

    # -- keys ------------------------------------------------------------------------------

    def key_for(self, kid: str | None, alg: str) -> SigningKey | None:
        """The key a token names with ``kid`` (and may use with ``alg``); without a
        ``kid``, the one key held, if there is only one."""
        if kid is not None:
            key = self._by_kid.get(kid)
        elif len(self.keys) == 1:
            key = self.keys[0]
        else:
            key = None
        if key is None or (key.alg is not None and key.alg != alg):
            return None
        return key

    def holds(self, key: SigningKey) -> bool:
        """Is ``key`` still one of the keys held (not rotated away)?"""
        return any(k is key for k in self.keys)

    def unknown_key(self) -> Deferred[None] | None:
        """A token names a key not held: fetch the keys again, unless that was tried less
        than MIN_REFETCH seconds ago. The Deferred fires when the fetch has ended."""
        if self._in_flight is not None:
            return self._wait()
        now = self.clock.seconds()
        if self._last_unknown is not None and now - self._last_unknown < MIN_REFETCH:
            return None
        self._last_unknown = now
        return self.refresh()

    def refresh(self) -> Deferred[None]:
        """Fetch the keys (or join the fetch under way); the Deferred never fails."""
        waiter = self._wait()
        if self._in_flight is None:
            d = Deferred.fromCoroutine(self._fetch())
            self._in_flight = d
            d.addBoth(self._fetched)  # at once, if the fetch already ended
        return waiter

    def _wait(self) -> Deferred[None]:
        """A Deferred of its own for each caller: cancelling one (its client went away)
        leaves the fetch and the other callers alone."""
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    async def _fetch(self) -> tuple[SigningKey, ...]:
        uri = self._jwks_uri
        if uri is None:
            base = self.provider.issuer.rstrip("/")
            document = await self.fetch(base + "/.well-known/openid-configuration")
            uri = discovered_jwks_uri(document, self.provider.issuer)
        try:
            keys = parse_jwks(await self.fetch(uri), self.provider.algorithms)
        except BaseException:
            if self.provider.jwks_uri is None:
                self._jwks_uri = None  # discover again next time
            raise
        self._jwks_uri = uri
        return keys

    def _fetched(self, result: tuple[SigningKey, ...] | Failure) -> None:
        self._in_flight = None
        name = self.provider.name
        if isinstance(result, Failure):
            if not (result.check(CancelledError) and not self._running):  # not stop()
                if result.check(TimeoutError, CancelledError):
                    why = f"no answer within {FETCH_TIMEOUT:g}s"
                else:
                    why = result.getErrorMessage() or str(result.type)
                self.log.warn(
                    "identity provider {provider}: fetching keys failed ({why}); "
                    "{count} key(s) kept",
                    provider=name,
                    why=why,
                    count=len(self.keys),
                )
                if self.metrics is not None:
                    self.metrics.refresh_failures.labels(name).inc()
            delay = min(RETRY_AFTER_FAILURE, self.provider.refresh)
        else:
            added = {k.kid for k in result} - {k.kid for k in self.keys}
            self.keys = result
            self._by_kid = {k.kid: k for k in result if k.kid is not None}
            if added:
                self.log.info(
                    "identity provider {provider}: {count} key(s) held",
                    provider=name,
                    count=len(result),
                )
            if self.metrics is not None:
                self.metrics.keys.labels(name).set(len(result))
                self.metrics.last_refresh.labels(name).set(self.clock.seconds())
            delay = self.provider.refresh
        waiters, self._waiters = self._waiters, []
        if self._running:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = self.clock.callLater(delay, self.refresh)
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)


class IdentityProviderKeys(Service):
    """The key sets of every configured identity provider, fetched while the gateway runs.

    ``fetch`` stands in for HTTP (tests, the in-memory kit); by default each provider
    fetches with an :class:`HTTPFetcher` trusting its own ``ca``. Readiness never waits
    for these: a gateway whose issuer is down still serves every other caller.
    """

    def __init__(
        self,
        providers: Mapping[str, IdentityProvider],
        reactor: IConnectReactor,
        *,
        fetch: Fetch | None = None,
        metrics: IdentityProviderMetrics | None = None,
    ) -> None:
        super().__init__()
        self.metrics = metrics
        self.keys: dict[str, ProviderKeys] = {
            name: ProviderKeys(
                provider,
                reactor,
                fetch if fetch is not None else HTTPFetcher(reactor, provider.ca),
                metrics=metrics,
            )
            for name, provider in providers.items()
        }

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        for name, keys in self.keys.items():
            if self.metrics is not None:
                self.metrics.provider(name)
            keys.start()

    def stopService(self) -> None:
        for keys in self.keys.values():
            keys.stop()
        super().stopService()  # type: ignore[no-untyped-call]
