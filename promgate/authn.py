"""Authentication: who is this request from? Certificate, bearer token, basic auth.

A request may carry two credentials: the TLS client certificate of its connection
(recognised once, at the handshake) and at most one ``Authorization`` header. The
``Authenticator`` checks the header and combines the two into one ``Recognition``:

- no header: what the certificate said; a caller it names nobody is ``authn_missing``
  (401) when header credentials are configured, else as before (403 ``unknown_identity``,
  or ``no_credentials`` on a plain-text listener);
- a header that does not verify (wrong token or password, unknown user, malformed,
  unsupported scheme): ``authn_failed`` (401), whatever the certificate said;
- a header naming one identity and a certificate naming another: ``authn_conflict`` (403).

A bearer token that is a configured one (by digest) names its identity, as it always has;
any other that looks like a JWT is verified against the identity providers
(:mod:`promgate.jwt_authn`), which may have to fetch keys first (a Deferred). A refused JWT
is ``authn_failed`` whose 401 carries an RFC 6750 ``invalid_token`` challenge.

Bearer tokens are compared as SHA-256 digests with ``hmac.compare_digest`` against every
configured digest (no early exit). bcrypt is slow by design, so it runs in a thread (the
runner is injected: tests pass a synchronous one) and successes are cached, keyed by user
and the SHA-256 of the password, so a steady scrape costs one hash, not one bcrypt.

What wrong passwords may cost is bounded (:mod:`promgate.authn_limits`): a password not in
the cache is refused without a bcrypt check when its peer's network (IPv4 /24, IPv6 /64)
or its user name failed too often lately, or has too many checks pending
(``auth_throttled``, 429 with ``Retry-After``), or when the bcrypt queue is full
(``auth_overloaded``, 503 with ``Retry-After``); a check whose client went away before it
started is dropped (cancel the Deferred). A cached password is never refused so.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import bcrypt
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from promgate.addresses import peer_prefix
from promgate.authn_limits import OVERLOADED_RETRY_AFTER, BcryptQueue, FailureBackoff
from promgate.config.model import Identity
from promgate.identity import IdentityResolver, Recognition
from promgate.jwt_authn import JWTVerifier, looks_like_jwt
from promgate.tls import PeerCertificate

if TYPE_CHECKING:
    from promgate.metrics import Metrics

#: Reasons that refuse a request before routing, with the status each answers.
REFUSED_AT_THE_DOOR = {
    "authn_missing": 401,
    "authn_failed": 401,
    "authn_conflict": 403,
    "auth_throttled": 429,
    "auth_overloaded": 503,
}
#: Every reason counted by ``promgate_authn_failures_total`` (a bounded label set).
AUTHN_FAILURES = frozenset(
    {
        "authn_missing",
        "authn_failed",
        "authn_conflict",
        "identity_ambiguous",
        "unknown_identity",
        "no_credentials",
    }
)
#: bcrypt ignores (and bcrypt >= 5 refuses) passwords longer than this.
_BCRYPT_MAX_PASSWORD = 72
_BEARER_CHALLENGE = (b"WWW-Authenticate", b'Bearer realm="promgate"')
_BASIC_CHALLENGE = (b"WWW-Authenticate", b'Basic realm="promgate", charset="UTF-8"')

ThreadRunner = Callable[..., "Deferred[Any]"]


class BcryptThreads:
    """A small thread pool of bcrypt's own, used as an ``Authenticator``'s runner.

    The reactor's shared pool also resolves upstream host names: a flood of wrong passwords
    (each a full bcrypt) must not starve it. With this pool a flood only delays new basic-auth
    logins; cached ones, tokens and certificates never wait for a thread.
    """

    def __init__(self, reactor: IReactorFromThreads, size: int = 2) -> None:
        self.reactor = reactor
        self.size = size
        self.pool = ThreadPool(minthreads=0, maxthreads=size, name="promgate-bcrypt")

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.pool, f, *args)

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()


def _failed(detail: str) -> Recognition:
    return Recognition(None, "authn_failed", detail)


def door_headers(
    recognition: Recognition, challenges: tuple[tuple[bytes, bytes], ...]
) -> tuple[tuple[bytes, bytes], ...]:
    """The headers of a refusal at the door: the challenges of a 401, ``Retry-After``
    of a throttled or overloaded check."""
    if recognition.retry_after is not None:
        return ((b"Retry-After", str(recognition.retry_after).encode()),)
    if REFUSED_AT_THE_DOOR.get(recognition.reason) == 401:
        return token_challenges(recognition, challenges)
    return ()


def token_challenges(
    recognition: Recognition, challenges: tuple[tuple[bytes, bytes], ...]
) -> tuple[tuple[bytes, bytes], ...]:
    """``challenges`` (``WWW-Authenticate`` or ``Proxy-Authenticate``), the Bearer one
    telling of a refused token as RFC 6750 says: ``error="invalid_token"`` and the
    refusal's constant description."""
    if recognition.token_error is None:
        return challenges
    error = (
        b'Bearer realm="promgate", error="invalid_token", error_description="'
        + recognition.token_error.encode("ascii")
        + b'"'
    )
    return tuple(
        (name, error if value.startswith(b"Bearer ") else value) for name, value in challenges
    )


def parse_basic(credentials: bytes) -> tuple[str, bytes] | None:
    """Decode ``base64(user:password)`` strictly; None if it is not that."""
    try:
        raw = base64.b64decode(credentials, validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = raw.partition(b":")
    if not sep or not user:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


class Authenticator:
    """Checks header credentials and combines them with the connection's certificate.

    ``run_in_thread(f, *args)`` runs ``f`` off the reactor thread and returns a Deferred
    of its result (``deferToThread`` by default); at most ``concurrency`` run at once.
    ``clock`` drives the failure backoff; without one there is none (tests of other
    things). ``metrics`` counts checks, the queue and refusals.
    """

    log = Logger()

    def __init__(
        self,
        identities: Mapping[str, Identity],
        *,
        run_in_thread: ThreadRunner = deferToThread,
        cache_size: int = 1024,
        clock: IReactorTime | None = None,
        metrics: Metrics | None = None,
        concurrency: int = 2,
        queue_limit: int | None = None,
        jwt: JWTVerifier | None = None,
    ) -> None:
        self.resolver = IdentityResolver(identities)
        #: Verifies JWT bearer tokens of identity providers; None when there are none.
        self.jwt = jwt
        self._metrics = metrics
        queue_kw: dict[str, Any] = {} if queue_limit is None else {"limit": queue_limit}
        self.checks = BcryptQueue(
            run_in_thread,
            concurrency=concurrency,
            on_start=metrics.auth_bcrypt_checks.inc if metrics is not None else None,
            on_length=metrics.auth_bcrypt_queue_length.set if metrics is not None else None,
            **queue_kw,
        )
        #: Per peer network: the main lever against one source guessing; at most 4
        #: checks pending, then 5 failures before a backoff of 1s, doubling up to 30s.
        self.peer_backoff = (
            FailureBackoff(clock, threshold=5, cap=30.0, max_pending=4)
            if clock is not None
            else None
        )
        #: Per user name: slows guessing from many networks, briefly (at most 5s), so
        #: that it cannot keep a user out for long; cached passwords never wait.
        self.user_backoff = (
            FailureBackoff(clock, threshold=10, cap=5.0) if clock is not None else None
        )
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, bytes], Recognition] = OrderedDict()
        bearer: list[tuple[bytes, Recognition]] = []
        basic: dict[str, tuple[bytes, Recognition]] = {}
        for identity in identities.values():
            ok = Recognition(identity, "ok")
            bearer.extend((digest, ok) for digest in identity.bearer_sha256)
            for cred in identity.basic:
                basic[cred.user] = (cred.bcrypt, ok)
        self._bearer = tuple(bearer)
        self._basic = basic
        # A wrong user name costs a bcrypt too, against a configured hash of the same
        # cost, so that timing does not tell which user names exist.
        self._decoy = next(iter(basic.values()))[0] if basic else b""
        challenges = []
        if bearer or jwt is not None:
            challenges.append(_BEARER_CHALLENGE)
        if basic:
            challenges.append(_BASIC_CHALLENGE)
        #: The ``WWW-Authenticate`` headers of a 401: the schemes configured.
        self.challenges: tuple[tuple[bytes, bytes], ...] = tuple(challenges)

    @property
    def accepts_headers(self) -> bool:
        """Does any identity have a bearer token or a basic-auth user?"""
        return bool(self.challenges)

    def for_connection(self, peer: PeerCertificate | None) -> Recognition:
        """What a connection's certificate (or its absence) says, once per connection."""
        found = self.resolver.for_certificate(peer)
        if found.identity is None and found.reason != "identity_ambiguous" and self.challenges:
            return Recognition(None, "authn_missing", found.reason)
        return found

    def authenticate(
        self, connection: Recognition, header: bytes, peer: str = ""
    ) -> Recognition | Deferred[Recognition]:
        """Check one ``Authorization`` header from ``peer`` and combine it with
        ``connection``.

        Returns at once, except for a basic-auth password not in the cache: then a
        Deferred that fires (never fails) when bcrypt has answered. Cancel it when the
        client goes away: a check that has not started then never runs.
        """
        scheme, _, credentials = header.partition(b" ")
        scheme = scheme.lower()
        credentials = credentials.strip(b" \t")
        if scheme == b"bearer" and (self._bearer or self.jwt is not None):
            found = self._bearer_token(credentials)
            if found.identity is None and self.jwt is not None and looks_like_jwt(credentials):
                verified = self.jwt.verify(credentials)
                if isinstance(verified, Deferred):
                    return verified.addCallback(lambda r: combine(connection, r))
                return combine(connection, verified)
            return combine(connection, found)
        if scheme == b"basic" and self._basic:
            return self._basic_auth(connection, credentials, peer)
        shown = scheme[:16].decode("ascii", "replace")
        return _failed(f"Authorization scheme {shown!r} not accepted")

    # -- bearer ------------------------------------------------------------------------

    def _bearer_token(self, token: bytes) -> Recognition:
        if not token or b" " in token or b"\t" in token:
            return _failed("malformed bearer token")
        digest = hashlib.sha256(token).digest()
        found: Recognition | None = None
        # Every configured digest is compared, whichever matches, so that the time taken
        # says nothing about which one did (or how close a guess came).
        for wanted, recognition in self._bearer:
            if hmac.compare_digest(wanted, digest):
                found = recognition
        return found if found is not None else _failed("bearer token matches no identity")

    # -- basic -------------------------------------------------------------------------

    def _basic_auth(
        self, connection: Recognition, credentials: bytes, peer: str
    ) -> Recognition | Deferred[Recognition]:
        parsed = parse_basic(credentials)
        if parsed is None:
            return _failed("malformed basic credentials")
        user, password = parsed
        if len(password) > _BCRYPT_MAX_PASSWORD:
            return _failed(f"basic auth user {user[:64]!r}: password too long for bcrypt")
        key = (user, hashlib.sha256(password).digest())
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return combine(connection, cached)
        network = peer_prefix(peer)
        refused = self._throttled(user, network)
        if refused is not None:
            return refused
        entry = self._basic.get(user)
        hashed = entry[0] if entry is not None else self._decoy

        def done(result: object) -> None:
            """The check ran (``result`` True, False or a Failure) or was dropped (None):
            count it for the backoff, whether or not its client is still there."""
            failed = isinstance(result, bool) and (entry is None or not result)
            self._finished(user, network, failed=failed)

        self._started(user, network)  # before submit: the check may end within it
        d: Deferred[bool] | None = self.checks.submit(
            bcrypt.checkpw, password, hashed, on_done=done
        )
        if d is None:
            self._finished(user, network, failed=False)
            self._rejected("auth_overloaded")
            return Recognition(
                None,
                "auth_overloaded",
                f"basic auth user {user[:64]!r}: bcrypt queue full",
                OVERLOADED_RETRY_AFTER,
            )

        def checked(ok: bool) -> Recognition:
            if entry is None:
                return _failed(f"basic auth: unknown user {user[:64]!r}")
            if not ok:
                return _failed(f"basic auth user {user!r}: wrong password")
            self._remember(key, entry[1])
            return combine(connection, entry[1])

        def broken(failure: Failure) -> Recognition:
            if failure.check(CancelledError):
                return _failed(f"basic auth user {user[:64]!r}: client gone, check dropped")
            self.log.failure("bcrypt check for user {user!r} failed", failure, user=user[:64])
            return _failed(f"basic auth user {user[:64]!r}: bcrypt check failed")

        return d.addCallbacks(checked, broken)

    def _throttled(self, user: str, network: str) -> Recognition | None:
        """A refusal if ``network`` or ``user`` must wait before its next check.

        A user's backoff holds back only networks that have failed themselves: otherwise a
        few wrong passwords every few seconds, spread over networks, would keep a user whose
        password is not cached yet (after a restart, say) out for good.
        """
        peers = self.peer_backoff
        clean = peers is not None and peers.failures(network) == 0
        for backoff, key, what in (
            (peers, network, f"peer network {network}"),
            (None if clean else self.user_backoff, user, f"user {user[:64]!r}"),
        ):
            if backoff is None:
                continue
            wait = backoff.retry_after(key)
            if wait:
                self._rejected("auth_throttled")
                return Recognition(
                    None,
                    "auth_throttled",
                    f"basic auth user {user[:64]!r}: {what} failed too often, "
                    f"checks held back {wait}s",
                    wait,
                )
        return None

    def _started(self, user: str, network: str) -> None:
        if self.peer_backoff is not None:
            self.peer_backoff.started(network)
        if self.user_backoff is not None:
            self.user_backoff.started(user)

    def _finished(self, user: str, network: str, *, failed: bool) -> None:
        if self.peer_backoff is not None:
            self.peer_backoff.finished(network, failed=failed)
        if self.user_backoff is not None:
            self.user_backoff.finished(user, failed=failed)

    def _rejected(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.auth_rejections.labels(reason).inc()

    def _remember(self, key: tuple[str, bytes], recognition: Recognition) -> None:
        self._cache[key] = recognition
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def combine(connection: Recognition, header: Recognition) -> Recognition:
    """One request's recognition, from its connection's and its header's."""
    if header.identity is None:
        return header
    named = connection.identity
    if named is None:
        # An ambiguous certificate stays refused: a configuration error to fix, which a
        # token must not paper over.
        return connection if connection.reason == "identity_ambiguous" else header
    if named.name == header.identity.name:
        return header
    return Recognition(
        None,
        "authn_conflict",
        f"certificate names {named.name!r}, Authorization names {header.identity.name!r}",
    )
