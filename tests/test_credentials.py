"""Tests for credentials, in memory: bearer tokens, basic auth with bcrypt (run through an
injected, synchronous or hand-driven thread runner), SPKI pins, the clientAuth extended key
usage, how a certificate and an Authorization header combine, the gateway's 401/403
answers, and loading all of it (web-config.yml included) from configuration files."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import io
import os
import queue
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from promgate import authn, cli
from promgate.audit import AuditEvent, MemoryAuditSink
from promgate.authn import Authenticator, BcryptThreads, combine, parse_basic
from promgate.config.errors import Problem
from promgate.config.loader import check_config
from promgate.config.model import (
    Admin,
    Audit,
    BasicCredential,
    CertMatch,
    Config,
    Identity,
    Listener,
    Route,
    Target,
    TLSFiles,
)
from promgate.http.server import DownstreamProtocol, HTTPListenerFactory
from promgate.http.upstream import UpstreamPool
from promgate.identity import Recognition, cert_matches
from promgate.listeners.scrape import ReverseGateway
from promgate.metrics import Metrics
from promgate.ratelimit import RateLimiter
from promgate.testing import Collector, PendingUpstreams, TestPKI, server_transport
from promgate.testing import request_head as get
from promgate.tls import PeerCertificate, allows_client_auth, server_tls

NODE = Target("10.0.0.5:9100")
SCRAPE = b"/scrape?route=node&target=10.0.0.5%3A9100"
UPSTREAM_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: 10.0.0.5:9100\r\n\r\n"
METRICS = b"up 1\n"
OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(METRICS) + METRICS

PROM_TOKEN = b"prometheus-token-7f3a9c"
AGENT_TOKEN = b"agent-token-51d0e2"
AGENT_SECOND_TOKEN = b"agent-token-rotated-88aa"
OPS_PASSWORD = b"correct horse battery staple"
#: Cost 4: the cheapest bcrypt, so that a real check costs about a millisecond here.
OPS_HASH = bcrypt.hashpw(OPS_PASSWORD, bcrypt.gensalt(rounds=4))
VIEWER_HASH = bcrypt.hashpw(b"viewer-pass", bcrypt.gensalt(rounds=4))


def sha(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def basic(user: str, password: bytes) -> bytes:
    return b"Basic " + base64.b64encode(user.encode() + b":" + password)


PROMETHEUS = Identity(
    "prometheus",
    cert=(CertMatch(uri="spiffe://promgate.local/prometheus"),),
    roles=frozenset({"scraper"}),
    bearer_sha256=(sha(PROM_TOKEN),),
)
AGENT = Identity(
    "agent", roles=frozenset({"scraper"}), bearer_sha256=(sha(AGENT_TOKEN), sha(AGENT_SECOND_TOKEN))
)
OPS = Identity(
    "ops",
    cert=(CertMatch(cn="ops"),),
    roles=frozenset({"admin"}),
    basic=(BasicCredential("ops", OPS_HASH),),
)
VIEWER = Identity(
    "viewer", roles=frozenset({"scraper"}), basic=(BasicCredential("viewer", VIEWER_HASH),)
)
IDENTITIES = {i.name: i for i in (PROMETHEUS, AGENT, OPS, VIEWER)}
ROUTES = {
    "node": Route("node", (NODE,), allow=("role:scraper",)),
    "admin": Route("admin", (Target("127.0.0.1:9099"),), allow=("ops",)),
}
CHALLENGES = [
    b'Bearer realm="promgate"',
    b'Basic realm="promgate", charset="UTF-8"',
]


class ThreadRunner:
    """Stands in for ``deferToThread``: counts the work, and runs it at once (synchronous)
    or when the test says (``run``), so the test decides when bcrypt "finishes"."""

    def __init__(self, synchronous: bool = True) -> None:
        self.synchronous = synchronous
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.pending: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.calls.append((f, args))
        if self.synchronous:
            return defer.execute(f, *args)
        d: Deferred[Any] = Deferred()
        self.pending.append((d, f, args))
        return d

    def run(self) -> None:
        """Finish every pending piece of work, in order."""
        while self.pending:
            d, f, args = self.pending.pop(0)
            try:
                result = f(*args)
            except Exception as e:  # handed to the Deferred, as a thread's would be
                d.errback(e)
            else:
                d.callback(result)


def parse_responses(data: bytes) -> list[tuple[int, list[tuple[bytes, bytes]], bytes]]:
    """Split Content-Length framed responses: (status, headers in order, body); repeated
    headers (WWW-Authenticate) are kept."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data
        lines = head.split(b"\r\n")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.lower(), value.strip()))
        length = int(dict(headers)[b"content-length"])
        out.append((int(lines[0].split(b" ")[1]), headers, rest[:length]))
        data = rest[length:]
    return out


def header_values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


# -- the authenticator alone -------------------------------------------------------------------


class BearerTests(SynchronousTestCase):
    """Bearer tokens: compared as SHA-256 digests, in constant time, against every digest."""

    def setUp(self) -> None:
        self.runner = ThreadRunner()
        self.authn = Authenticator(IDENTITIES, run_in_thread=self.runner)
        self.nobody = self.authn.for_connection(None)

    def test_token_names_identity(self) -> None:
        """Each configured token names its identity; an identity may have several."""
        for token, identity in [
            (PROM_TOKEN, PROMETHEUS),
            (AGENT_TOKEN, AGENT),
            (AGENT_SECOND_TOKEN, AGENT),
        ]:
            found = self.authn.authenticate(self.nobody, b"Bearer " + token)
            self.assertEqual(found, Recognition(identity, "ok"))
        self.assertEqual(self.runner.calls, [], "a token never needs a thread")

    def test_scheme_case_insensitive(self) -> None:
        """The scheme name is case-insensitive (RFC 9110); the token is not."""
        found = self.authn.authenticate(self.nobody, b"bEaReR " + AGENT_TOKEN)
        self.assertEqual(found, Recognition(AGENT, "ok"))
        found = self.authn.authenticate(self.nobody, b"Bearer " + AGENT_TOKEN.upper())
        self.assertEqual(found, Recognition(None, "authn_failed", found.detail))  # type: ignore[union-attr]

    def test_wrong_token(self) -> None:
        """A token that matches nothing is authn_failed, whatever the certificate said."""
        cert = Recognition(PROMETHEUS, "ok")
        for header in [b"Bearer nope", b"Bearer " + PROM_TOKEN + b"x"]:
            found = self.authn.authenticate(cert, header)
            assert isinstance(found, Recognition)
            self.assertEqual((found.identity, found.reason), (None, "authn_failed"))
            self.assertEqual(found.detail, "bearer token matches no identity")

    def test_malformed(self) -> None:
        """An empty token, a token with a space in it, or a bare scheme is authn_failed."""
        for header in [b"Bearer", b"Bearer ", b"Bearer a b", b"Bearer\t" + AGENT_TOKEN]:
            found = self.authn.authenticate(self.nobody, header)
            assert isinstance(found, Recognition)
            self.assertEqual(found.reason, "authn_failed", header)

    def test_unsupported_scheme(self) -> None:
        """Any other scheme (Digest, Negotiate, a raw token) is authn_failed."""
        for header in [
            b"Digest username=x",
            b"Negotiate abc",
            AGENT_TOKEN,
            b"Token " + AGENT_TOKEN,
        ]:
            found = self.authn.authenticate(self.nobody, header)
            assert isinstance(found, Recognition)
            self.assertEqual(found.reason, "authn_failed", header)
            self.assertIn("not accepted", found.detail or "")

    def test_scheme_not_configured(self) -> None:
        """Bearer is refused where no identity has a token (and Basic where none has a user)."""
        only_basic = Authenticator({"ops": OPS}, run_in_thread=self.runner)
        found = only_basic.authenticate(Recognition(None, "authn_missing"), b"Bearer x")
        self.assertEqual(getattr(found, "reason", None), "authn_failed")
        only_bearer = Authenticator({"agent": AGENT}, run_in_thread=self.runner)
        found = only_bearer.authenticate(Recognition(None, "authn_missing"), basic("ops", b"x"))
        self.assertEqual(getattr(found, "reason", None), "authn_failed")
        self.assertEqual(self.runner.calls, [])

    def test_constant_time_every_digest(self) -> None:
        """hmac.compare_digest checks the presented digest against every configured one,
        even after a match: no early exit to time."""
        calls: list[tuple[bytes, bytes]] = []
        compare = hmac.compare_digest

        def recording(a: bytes, b: bytes) -> bool:
            calls.append((a, b))
            return compare(a, b)

        self.patch(authn.hmac, "compare_digest", recording)
        configured = [sha(PROM_TOKEN), sha(AGENT_TOKEN), sha(AGENT_SECOND_TOKEN)]
        for token in (PROM_TOKEN, AGENT_SECOND_TOKEN, b"wrong"):
            calls.clear()
            self.authn.authenticate(self.nobody, b"Bearer " + token)
            self.assertEqual(sorted(a for a, _ in calls), sorted(configured))
            self.assertEqual({b for _, b in calls}, {sha(token)})


class BasicAuthTests(SynchronousTestCase):
    """Basic auth: bcrypt in a thread, a cache of successes, and no user-name oracle."""

    def setUp(self) -> None:
        self.runner = ThreadRunner()
        self.authn = Authenticator(IDENTITIES, run_in_thread=self.runner)
        self.nobody = self.authn.for_connection(None)

    def check(self, header: bytes, connection: Recognition | None = None) -> Recognition:
        result = self.authn.authenticate(connection or self.nobody, header)
        if isinstance(result, Deferred):
            return self.successResultOf(result)
        return result

    def test_password_names_identity(self) -> None:
        """The right password names the user's identity, checked by bcrypt in a thread."""
        self.assertEqual(self.check(basic("ops", OPS_PASSWORD)), Recognition(OPS, "ok"))
        ((f, args),) = self.runner.calls
        self.assertIs(f, bcrypt.checkpw)
        self.assertEqual(args, (OPS_PASSWORD, OPS_HASH))

    def test_wrong_password(self) -> None:
        """A wrong password is authn_failed; the audit detail names the user, not the password."""
        found = self.check(basic("ops", b"guess"))
        self.assertEqual((found.identity, found.reason), (None, "authn_failed"))
        self.assertEqual(found.detail, "basic auth user 'ops': wrong password")

    def test_unknown_user_costs_a_bcrypt(self) -> None:
        """An unknown user is refused only after a bcrypt against a configured hash, so that
        timing does not reveal which users exist."""
        found = self.check(basic("mallory", OPS_PASSWORD))
        self.assertEqual(found.reason, "authn_failed")
        self.assertEqual(len(self.runner.calls), 1)
        self.assertIn(self.runner.calls[0][1][1], (OPS_HASH, VIEWER_HASH))

    def test_cache_hit_avoids_bcrypt(self) -> None:
        """A steady scrape costs one bcrypt: later checks of the same password are cached."""
        for _ in range(5):
            self.assertEqual(self.check(basic("ops", OPS_PASSWORD)), Recognition(OPS, "ok"))
        self.assertEqual(len(self.runner.calls), 1)
        self.assertIsInstance(
            self.authn.authenticate(self.nobody, basic("ops", OPS_PASSWORD)), Recognition
        )

    def test_failures_not_cached(self) -> None:
        """Wrong passwords cost a bcrypt every time (they are never cached)."""
        for _ in range(3):
            self.check(basic("ops", b"guess"))
        self.assertEqual(len(self.runner.calls), 3)

    def test_cache_bounded_lru(self) -> None:
        """The cache holds at most cache_size entries, dropping the least recently used."""
        small = Authenticator(IDENTITIES, run_in_thread=self.runner, cache_size=1)
        for header in [basic("ops", OPS_PASSWORD), basic("viewer", b"viewer-pass")] * 2:
            self.successResultOf(small.authenticate(self.nobody, header))  # type: ignore[arg-type]
        self.assertEqual(len(self.runner.calls), 4)
        self.assertIsInstance(
            small.authenticate(self.nobody, basic("viewer", b"viewer-pass")), Recognition
        )

    def test_cache_keyed_by_user_and_password(self) -> None:
        """A cached success for one password says nothing about another, or another user."""
        self.check(basic("ops", OPS_PASSWORD))
        self.assertEqual(self.check(basic("ops", OPS_PASSWORD + b"!")).reason, "authn_failed")
        self.assertEqual(self.check(basic("viewer", OPS_PASSWORD)).reason, "authn_failed")
        self.assertEqual(len(self.runner.calls), 3)

    def test_pending_until_bcrypt_answers(self) -> None:
        """With a real (asynchronous) runner the answer is a Deferred fired by the thread."""
        runner = ThreadRunner(synchronous=False)
        authn_ = Authenticator(IDENTITIES, run_in_thread=runner)
        d = authn_.authenticate(self.nobody, basic("ops", OPS_PASSWORD))
        assert isinstance(d, Deferred)
        self.assertNoResult(d)
        runner.run()
        self.assertEqual(self.successResultOf(d), Recognition(OPS, "ok"))

    def test_bcrypt_error_is_a_failure(self) -> None:
        """An exception in the thread becomes authn_failed (and is logged), never a hang."""

        def broken(*args: Any) -> Deferred[Any]:
            return defer.fail(ValueError("Invalid salt"))

        authn_ = Authenticator(IDENTITIES, run_in_thread=broken)
        d = authn_.authenticate(self.nobody, basic("ops", OPS_PASSWORD))
        assert isinstance(d, Deferred)
        self.assertEqual(self.successResultOf(d).reason, "authn_failed")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_malformed(self) -> None:
        """Bad base64, no colon, an empty user or non-UTF-8 user is authn_failed at once."""
        for header in [
            b"Basic",
            b"Basic !!!",
            b"Basic " + base64.b64encode(b"no-colon"),
            b"Basic " + base64.b64encode(b":password"),
            b"Basic " + base64.b64encode(b"\xff\xfe:password"),
        ]:
            self.assertEqual(self.check(header).reason, "authn_failed", header)
        self.assertEqual(self.runner.calls, [])

    def test_password_too_long(self) -> None:
        """bcrypt uses at most 72 bytes: a longer password is refused without a thread."""
        self.assertEqual(self.check(basic("ops", b"x" * 73)).reason, "authn_failed")
        self.assertEqual(self.runner.calls, [])

    def test_utf8_user_and_password(self) -> None:
        """User and password are UTF-8 (the challenge says charset="UTF-8")."""
        password = "pässwörd".encode()
        who = Identity(
            "jose", basic=(BasicCredential("josé", bcrypt.hashpw(password, bcrypt.gensalt(4))),)
        )
        authn_ = Authenticator({"jose": who}, run_in_thread=self.runner)
        d = authn_.authenticate(Recognition(None, "authn_missing"), basic("josé", password))
        self.assertEqual(self.successResultOf(d), Recognition(who, "ok"))  # type: ignore[arg-type]

    def test_parse_basic(self) -> None:
        """parse_basic splits at the first colon: passwords may contain colons."""
        self.assertEqual(parse_basic(base64.b64encode(b"u:p:q")), ("u", b"p:q"))


class FakeReactorFromThreads:
    """Collects what pool threads hand back to the reactor thread."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.Queue()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.put((f, args))


class BcryptThreadsTests(SynchronousTestCase):
    """The gateway's own bcrypt pool runs checks off the calling thread."""

    def test_runs_in_another_thread(self) -> None:
        """A check runs on a pool thread; its result comes back through callFromThread."""
        reactor = FakeReactorFromThreads()
        threads = BcryptThreads(reactor, size=1)  # type: ignore[arg-type]
        threads.start()
        self.addCleanup(threads.stop)
        d = threads(lambda: (bcrypt.checkpw(OPS_PASSWORD, OPS_HASH), threading.get_ident()))
        self.assertNoResult(d)
        f, args = reactor.calls.get(timeout=10)
        f(*args)
        ok, ident = self.successResultOf(d)
        self.assertTrue(ok)
        self.assertNotEqual(ident, threading.get_ident())


class CombineTests(SynchronousTestCase):
    """How the certificate's answer and the header's answer make one recognition."""

    def setUp(self) -> None:
        self.authn = Authenticator(IDENTITIES, run_in_thread=ThreadRunner())

    def test_header_only(self) -> None:
        """No certificate identity: the header decides."""
        self.assertEqual(
            self.authn.authenticate(Recognition(None, "authn_missing"), b"Bearer " + AGENT_TOKEN),
            Recognition(AGENT, "ok"),
        )

    def test_same_identity(self) -> None:
        """Certificate and header naming the same identity agree."""
        self.assertEqual(
            self.authn.authenticate(Recognition(PROMETHEUS, "ok"), b"Bearer " + PROM_TOKEN),
            Recognition(PROMETHEUS, "ok"),
        )

    def test_conflict(self) -> None:
        """Certificate and header naming different identities: authn_conflict, no identity."""
        found = self.authn.authenticate(Recognition(PROMETHEUS, "ok"), b"Bearer " + AGENT_TOKEN)
        self.assertEqual(
            found,
            Recognition(
                None,
                "authn_conflict",
                "certificate names 'prometheus', Authorization names 'agent'",
            ),
        )

    def test_conflict_after_bcrypt_and_from_cache(self) -> None:
        """A basic-auth user of another identity conflicts too, cached or not."""
        for _ in range(2):
            found = self.authn.authenticate(
                Recognition(PROMETHEUS, "ok"), basic("ops", OPS_PASSWORD)
            )
            if isinstance(found, Deferred):
                found = self.successResultOf(found)
            self.assertEqual(found.reason, "authn_conflict")

    def test_ambiguous_certificate_stays_refused(self) -> None:
        """A certificate two identities claim is refused even with a valid token."""
        ambiguous = Recognition(None, "identity_ambiguous")
        self.assertEqual(combine(ambiguous, Recognition(AGENT, "ok")), ambiguous)

    def test_failure_wins(self) -> None:
        """A header that fails refuses the request even if the certificate was good."""
        failed = Recognition(None, "authn_failed", "x")
        self.assertEqual(combine(Recognition(PROMETHEUS, "ok"), failed), failed)

    def test_for_connection(self) -> None:
        """A certificate naming nobody (or none at all) is authn_missing when any identity
        has a header credential, and stays as it was otherwise."""
        stranger = PeerCertificate("00" * 32, "CN=stranger", ("stranger",), (), ())
        self.assertEqual(self.authn.for_connection(stranger).reason, "authn_missing")
        self.assertEqual(self.authn.for_connection(None).reason, "authn_missing")
        certs_only = Authenticator(
            {"p": Identity("p", cert=(CertMatch(cn="p"),))}, run_in_thread=ThreadRunner()
        )
        self.assertEqual(certs_only.for_connection(stranger).reason, "unknown_identity")
        self.assertEqual(certs_only.for_connection(None).reason, "no_credentials")
        self.assertEqual(certs_only.challenges, ())

    def test_challenges(self) -> None:
        """WWW-Authenticate lists the schemes configured, and only those."""
        self.assertEqual([v for _, v in self.authn.challenges], CHALLENGES)
        only_bearer = Authenticator({"agent": AGENT}, run_in_thread=ThreadRunner())
        self.assertEqual([v for _, v in only_bearer.challenges], CHALLENGES[:1])


# -- the gateway, plain text, in memory --------------------------------------------------------


def make_gateway(
    clock: MemoryReactorClock,
    audit: MemoryAuditSink,
    metrics: Metrics,
    pool: UpstreamPool,
    runner: ThreadRunner,
    *,
    identities: dict[str, Identity] = IDENTITIES,
    tls: TLSFiles | None = None,
) -> ReverseGateway:
    listener = Listener("scrape", "http", "tcp:9443", tls)
    config = Config(
        source=Path("promgate.yaml"),
        listeners=(listener,),
        identities=identities,
        routes=ROUTES,
        admin=Admin(),
        audit=Audit(Path("audit.jsonl"), Path("audit.key")),
    )
    return ReverseGateway(
        listener,
        config,
        clock=clock,
        limiter=RateLimiter(clock),
        audit=audit,
        metrics=metrics,
        pool=pool,
        authenticator=Authenticator(identities, run_in_thread=runner),
    )


class GatewayCredentialTests(SynchronousTestCase):
    """The reverse gateway answers for every credential outcome, and audits who it was."""

    synchronous = True

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.audit = MemoryAuditSink()
        self.metrics = Metrics()
        self.pool = UpstreamPool(self.clock)
        self.upstreams = PendingUpstreams(self.clock)
        self.runner = ThreadRunner(self.synchronous)
        self.gateway = make_gateway(self.clock, self.audit, self.metrics, self.pool, self.runner)

    def client(
        self, cert_identity: Identity | None = None
    ) -> tuple[DownstreamProtocol, StringTransport]:
        """A plain-text connection; ``cert_identity`` stands for what a certificate said."""
        proto = HTTPListenerFactory(self.gateway.http).buildProtocol(None)
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "192.0.2.1", 9443),
            peerAddress=IPv4Address("TCP", "198.51.100.7", 40000),
        )
        proto.makeConnection(transport)
        if cert_identity is not None:
            proto.recognition = Recognition(cert_identity, "ok")
        return proto, transport

    def requests(self) -> list[AuditEvent]:
        return [e for e in self.audit.events if e.event == "request"]

    def failures(self, reason: str) -> float | None:
        return self.metrics.registry.get_sample_value(
            "promgate_authn_failures_total", {"listener": "scrape", "reason": reason}
        )

    def assertAnswered(
        self, transport: StringTransport, status: int, reason: str, identity: str | None
    ) -> list[tuple[bytes, bytes]]:
        """One response with ``status``; its audit record says ``reason`` and ``identity``."""
        ((got, headers, _),) = parse_responses(transport.value())
        self.assertEqual(got, status)
        (event,) = self.requests()
        self.assertEqual((event.status, event.reason, event.identity), (status, reason, identity))
        return headers

    def test_bearer_scrape_header_not_forwarded(self) -> None:
        """A token-authenticated scrape reaches the upstream without the Authorization
        header (nor any trace of the token); the audit names the token's identity."""
        proto, transport = self.client()
        proto.dataReceived(get(SCRAPE, b"Authorization: Bearer " + AGENT_TOKEN))
        upstream, upstream_transport = self.upstreams.accept()
        self.assertEqual(upstream_transport.value(), UPSTREAM_REQUEST)
        self.assertNotIn(AGENT_TOKEN, upstream_transport.value())
        upstream.dataReceived(OK_RESPONSE)
        self.assertAnswered(transport, 200, "ok", "agent")

    def test_wrong_token_401(self) -> None:
        """A wrong token is 401 authn_failed with a WWW-Authenticate per configured scheme,
        counted in promgate_authn_failures_total; the connection stays open."""
        proto, transport = self.client()
        proto.dataReceived(get(SCRAPE, b"Authorization: Bearer wrong"))
        headers = self.assertAnswered(transport, 401, "authn_failed", None)
        self.assertEqual(header_values(headers, b"www-authenticate"), CHALLENGES)
        self.assertEqual(header_values(headers, b"connection"), [b"keep-alive"])
        self.assertEqual(self.upstreams.pending, [])
        self.assertEqual(self.failures("authn_failed"), 1.0)
        self.assertEqual(self.requests()[0].detail, "bearer token matches no identity")

    def test_missing_401(self) -> None:
        """No credential at all, with header credentials configured: 401 authn_missing."""
        proto, transport = self.client()
        proto.dataReceived(get(SCRAPE))
        headers = self.assertAnswered(transport, 401, "authn_missing", None)
        self.assertEqual(header_values(headers, b"www-authenticate"), CHALLENGES)
        self.assertEqual(self.failures("authn_missing"), 1.0)

    def test_missing_before_routing(self) -> None:
        """An unauthenticated caller learns nothing about routes: 401 even for a bad one."""
        proto, transport = self.client()
        proto.dataReceived(get(b"/scrape?route=nope&target=x%3A1"))
        self.assertAnswered(transport, 401, "authn_missing", None)

    def test_no_header_credentials_configured(self) -> None:
        """With certificate identities only, a plain-text caller is refused as before
        (403 no_credentials) and no challenge is sent."""
        gateway = make_gateway(
            self.clock,
            self.audit,
            self.metrics,
            self.pool,
            self.runner,
            identities={"p": Identity("p", cert=(CertMatch(cn="p"),))},
        )
        self.gateway = gateway
        proto, transport = self.client()
        proto.dataReceived(get(SCRAPE))
        headers = self.assertAnswered(transport, 403, "no_credentials", None)
        self.assertEqual(header_values(headers, b"www-authenticate"), [])
        self.assertEqual(self.failures("no_credentials"), 1.0)

    def test_unsupported_scheme_401(self) -> None:
        """An unsupported scheme is 401 authn_failed."""
        proto, transport = self.client()
        proto.dataReceived(get(SCRAPE, b"Authorization: Digest username=agent"))
        self.assertAnswered(transport, 401, "authn_failed", None)

    def test_conflict_403(self) -> None:
        """A certificate of one identity with a token of another: 403 authn_conflict."""
        proto, transport = self.client(PROMETHEUS)
        proto.dataReceived(get(SCRAPE, b"Authorization: Bearer " + AGENT_TOKEN))
        headers = self.assertAnswered(transport, 403, "authn_conflict", None)
        self.assertEqual(header_values(headers, b"www-authenticate"), [])
        self.assertEqual(self.failures("authn_conflict"), 1.0)
        self.assertIn("'agent'", self.requests()[0].detail or "")

    def test_certificate_and_own_token(self) -> None:
        """A certificate with its own identity's token is served."""
        proto, transport = self.client(PROMETHEUS)
        proto.dataReceived(get(SCRAPE, b"Authorization: Bearer " + PROM_TOKEN))
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(OK_RESPONSE)
        self.assertAnswered(transport, 200, "ok", "prometheus")

    def test_authz_denied_names_token_identity(self) -> None:
        """A token that authenticates but may not reach the route: 403 authz_denied,
        audited with the token's identity; not counted as an authentication failure."""
        proto, transport = self.client()
        proto.dataReceived(
            get(
                b"/scrape?route=admin&target=127.0.0.1%3A9099",
                b"Authorization: Bearer " + AGENT_TOKEN,
            )
        )
        self.assertAnswered(transport, 403, "authz_denied", "agent")
        self.assertIsNone(self.failures("authz_denied"))

    def test_per_request(self) -> None:
        """Credentials are per request: a token on one request does not carry over to the
        next request on the same connection."""
        proto, transport = self.client()
        proto.dataReceived(get(SCRAPE, b"Authorization: Bearer " + AGENT_TOKEN))
        upstream, _ = self.upstreams.accept()
        upstream.dataReceived(OK_RESPONSE)
        proto.dataReceived(get(SCRAPE))
        statuses = [s for s, _, _ in parse_responses(transport.value())]
        self.assertEqual(statuses, [200, 401])
        self.assertEqual([e.identity for e in self.requests()], ["agent", None])

    def test_sd_with_token(self) -> None:
        """/sd authenticates the same way and lists what the token's identity may scrape."""
        proto, transport = self.client()
        proto.dataReceived(get(b"/sd", b"Authorization: Bearer " + AGENT_TOKEN))
        ((status, _, body),) = parse_responses(transport.value())
        self.assertEqual(status, 200)
        self.assertIn(b'"__param_route":"node"', body.replace(b" ", b""))
        self.assertNotIn(b"admin", body)
        self.assertEqual(self.requests()[0].identity, "agent")

    def test_sd_refused(self) -> None:
        """/sd with a wrong password is 401 too."""
        proto, transport = self.client()
        proto.dataReceived(get(b"/sd", b"Authorization: " + basic("ops", b"guess")))
        self.runner.run()
        self.assertAnswered(transport, 401, "authn_failed", None)

    def test_basic_scrape(self) -> None:
        """Basic auth reaches the route its identity may; the header is not forwarded."""
        proto, transport = self.client()
        proto.dataReceived(
            get(
                b"/scrape?route=admin&target=127.0.0.1%3A9099",
                b"Authorization: " + basic("ops", OPS_PASSWORD),
            )
        )
        self.runner.run()
        upstream, upstream_transport = self.upstreams.accept()
        self.assertNotIn(b"uthorization", upstream_transport.value())
        upstream.dataReceived(OK_RESPONSE)
        self.assertAnswered(transport, 200, "ok", "ops")


class PendingAuthenticationTests(GatewayCredentialTests):
    """The same, with bcrypt finishing only when the test says: while a password is being
    checked the connection serves nothing else, and a loss meanwhile is audited."""

    synchronous = False

    def test_pipelined_request_waits(self) -> None:
        """A pipelined request is not read while the first one's password is checked;
        afterwards both are answered, in order, with one bcrypt between them."""
        proto, transport = self.client()
        header = b"Authorization: " + basic("viewer", b"viewer-pass")
        proto.dataReceived(get(b"/sd", header) + get(b"/sd", header))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(self.runner.pending), 1)
        self.runner.run()
        statuses = [s for s, _, _ in parse_responses(transport.value())]
        self.assertEqual(statuses, [200, 200])
        self.assertEqual(len(self.runner.calls), 1, "the second request hit the cache")
        self.assertEqual([e.identity for e in self.requests()], ["viewer", "viewer"])

    def test_bytes_arriving_meanwhile_wait(self) -> None:
        """Bytes that arrive during the check are kept, and served after it."""
        proto, transport = self.client()
        proto.dataReceived(get(b"/sd", b"Authorization: " + basic("viewer", b"viewer-pass")))
        proto.dataReceived(get(b"/nope"))
        self.assertEqual(transport.value(), b"")
        self.runner.run()
        self.assertEqual([s for s, _, _ in parse_responses(transport.value())], [200, 404])

    def test_connection_lost_meanwhile(self) -> None:
        """A client gone during the check is audited at once (client_aborted); when bcrypt
        answers later nothing is written and nothing more is audited."""
        proto, transport = self.client()
        proto.dataReceived(get(SCRAPE, b"Authorization: " + basic("viewer", b"viewer-pass")))
        self.clock.advance(0.25)
        proto.connectionLost()
        (event,) = self.requests()
        self.assertEqual(
            (
                event.status,
                event.reason,
                event.decision,
                event.identity,
                event.path,
                event.duration,
            ),
            (None, "client_aborted", "deny", None, SCRAPE.decode(), 0.25),
        )
        written: list[bytes] = []
        self.patch(transport, "write", written.append)
        self.runner.run()
        self.assertEqual(written, [])
        self.assertEqual(len(self.requests()), 1)
        self.assertEqual(self.upstreams.pending, [])

    def test_gateway_shutdown_meanwhile(self) -> None:
        """Shutting down during the check audits the request as gateway_shutdown."""
        proto, _ = self.client()
        proto.dataReceived(get(SCRAPE, b"Authorization: " + basic("viewer", b"viewer-pass")))
        self.assertEqual(self.gateway.http.shut_down_connections(), 1)
        proto.connectionLost()
        self.runner.run()
        (event,) = self.requests()
        self.assertEqual(event.reason, "gateway_shutdown")

    def test_no_deadline_fires_during_check(self) -> None:
        """The request-head deadline is off while a password is checked (bcrypt is ours)."""
        proto, transport = self.client()
        proto.dataReceived(get(b"/sd", b"Authorization: " + basic("viewer", b"viewer-pass")))
        self.clock.advance(30)
        self.assertFalse(transport.disconnecting)
        self.runner.run()
        self.assertEqual([s for s, _, _ in parse_responses(transport.value())], [200])


# -- certificates: SPKI pins, the clientAuth usage, over real TLS in memory --------------------

_PKI: TestPKI | None = None


def _pki(base: Path) -> TestPKI:
    """One test PKI for the module, with the certificates these tests need."""
    global _PKI
    if _PKI is None:
        _PKI = TestPKI(base)
        _PKI.client("prometheus")
        _PKI.client("stranger")
        _PKI.ca.issue_client("noeku", client_auth=False).write(
            _PKI.directory / "client-noeku.pem", _PKI.directory / "client-noeku-key.pem"
        )
        _PKI.ca.issue_server(["server.example.org"], []).write(
            _PKI.directory / "server-only.pem", _PKI.directory / "server-only-key.pem"
        )
    return _PKI


def spki_of(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


class CertificateTests(SynchronousTestCase):
    """SPKI pins and the clientAuth extended key usage."""

    def setUp(self) -> None:
        self.pki = _pki(Path(self.mktemp()).resolve())

    def test_peer_spki(self) -> None:
        """PeerCertificate carries the SHA-256 of the certificate's SubjectPublicKeyInfo."""
        cert_path, _ = self.pki.client("prometheus")
        peer = PeerCertificate.from_x509(x509.load_pem_x509_certificate(cert_path.read_bytes()))
        self.assertEqual(peer.spki_sha256, spki_of(cert_path))
        self.assertNotEqual(peer.spki_sha256, peer.sha256)

    def test_pin_matches(self) -> None:
        """An spki_sha256 rule matches the certificate whose key it pins, and no other."""
        pin = CertMatch(spki_sha256=spki_of(self.pki.client("prometheus")[0]))
        for name, expected in [("prometheus", True), ("stranger", False)]:
            path = self.pki.client(name)[0]
            peer = PeerCertificate.from_x509(x509.load_pem_x509_certificate(path.read_bytes()))
            self.assertEqual(cert_matches(pin, peer), expected, name)

    def test_allows_client_auth(self) -> None:
        """clientAuth is required; no EKU or serverAuth is not enough."""

        def load(name: str) -> x509.Certificate:
            return x509.load_pem_x509_certificate((self.pki.directory / name).read_bytes())

        self.assertTrue(allows_client_auth(load("client-prometheus.pem")))
        self.assertFalse(allows_client_auth(load("client-noeku.pem")))
        self.assertFalse(allows_client_auth(load("server-only.pem")))


class TLSCredentialTests(SynchronousTestCase):
    """Real TLS handshakes in memory (iosim): pins, EKU refusal, certificate + header."""

    def setUp(self) -> None:
        self.pki = _pki(Path(self.mktemp()).resolve())
        self.clock = MemoryReactorClock()
        self.audit = MemoryAuditSink()
        self.metrics = Metrics()
        self.pool = UpstreamPool(self.clock)
        self.upstreams = PendingUpstreams(self.clock)
        self.pinned = Identity(
            "pinned",
            cert=(CertMatch(spki_sha256=spki_of(self.pki.client("stranger")[0])),),
            roles=frozenset({"scraper"}),
        )
        identities = dict(IDENTITIES, pinned=self.pinned)
        self.tls = TLSFiles(self.pki.gate_cert, self.pki.gate_key, self.pki.ca_cert)
        self.gateway = make_gateway(
            self.clock,
            self.audit,
            self.metrics,
            self.pool,
            ThreadRunner(),
            identities=identities,
            tls=self.tls,
        )
        self.server_factory = TLSMemoryBIOFactory(
            server_tls(self.tls), False, HTTPListenerFactory(self.gateway.http), clock=self.clock
        )

    def connect(self, cert: tuple[Path, Path]) -> tuple[Collector, Any, iosim.IOPump]:
        client = Collector()
        trust = Certificate.loadPEM(self.pki.ca_cert.read_bytes())
        creator = optionsForClientTLS(
            "localhost",
            trustRoot=trust,
            clientCertificate=PrivateCertificate.loadPEM(
                cert[0].read_bytes() + cert[1].read_bytes()
            ),
        )
        client_factory = TLSMemoryBIOFactory(
            creator, True, ClientFactory.forProtocol(lambda: client), clock=self.clock
        )
        client_wire, server_wire, pump = iosim.connectedServerAndClient(
            lambda: self.server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            serverTransportFactory=server_transport,
            greet=False,
            clock=self.clock,
        )
        self.client_wire = client_wire
        pump.flush()
        return client, server_wire.wrappedProtocol, pump

    def request(
        self, cert: tuple[Path, Path], *headers: bytes, target: bytes = b"/sd"
    ) -> tuple[int, AuditEvent]:
        client, _, pump = self.connect(cert)
        self.client_wire.write(get(target, *headers))
        pump.flush()
        ((status, _, _),) = parse_responses(client.data)
        (event,) = [e for e in self.audit.events if e.event == "request"]
        return status, event

    def test_spki_pin_recognised(self) -> None:
        """A certificate whose key is pinned is recognised at the handshake, once."""
        _, server, _ = self.connect(self.pki.client("stranger"))
        self.assertEqual(server.recognition, Recognition(self.pinned, "ok"))

    def test_certificate_without_client_auth_refused(self) -> None:
        """A client certificate without the clientAuth usage fails the handshake; it is
        audited as tls_handshake_failed, reason certificate_purpose, with its subject."""
        for name, subject in [
            ("client-noeku", "CN=noeku"),
            ("server-only", "CN=server.example.org"),
        ]:
            self.audit.events.clear()
            d = self.pki.directory
            client, _, pump = self.connect((d / f"{name}.pem", d / f"{name}-key.pem"))
            if client.lost is None:
                # With TLS 1.3 the client may think the handshake done; its first write finds out.
                self.client_wire.write(get(b"/sd"))
                pump.flush()
            self.assertIsNotNone(client.lost)
            self.assertEqual(client.data, b"")
            (event,) = self.audit.events
            self.assertEqual(
                (event.event, event.reason, event.decision, event.cert_subject),
                ("tls_handshake_failed", "certificate_purpose", "deny", subject),
            )
            self.assertEqual(len(event.cert_sha256 or ""), 64)
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "promgate_tls_handshake_failures_total",
                {"listener": "scrape", "reason": "certificate_purpose"},
            ),
            2.0,
        )

    def test_unknown_certificate_needs_credentials(self) -> None:
        """A valid certificate naming nobody, with no header: 401 authn_missing."""
        status, event = self.request(self.pki.client("other"))
        self.assertEqual((status, event.reason), (401, "authn_missing"))
        self.assertEqual(event.detail, "unknown_identity")

    def test_unknown_certificate_with_token(self) -> None:
        """A certificate naming nobody plus a valid token: served as the token's identity."""
        status, event = self.request(
            self.pki.client("other"), b"Authorization: Bearer " + AGENT_TOKEN
        )
        self.assertEqual((status, event.identity, event.cert_subject), (200, "agent", "CN=other"))

    def test_certificate_and_other_token_conflict(self) -> None:
        """prometheus's certificate with agent's token: 403 authn_conflict."""
        status, event = self.request(
            self.pki.client("prometheus"), b"Authorization: Bearer " + AGENT_TOKEN
        )
        self.assertEqual((status, event.reason, event.identity), (403, "authn_conflict", None))
        self.assertEqual(event.cert_subject, "CN=prometheus")


# -- configuration -----------------------------------------------------------------------------

BASE = """\
listeners:
  - {name: scrape, endpoint: "tcp:9443", tls: false}
audit: {path: audit.jsonl, key_file: audit.key}
"""
OPS_HASH_TEXT = OPS_HASH.decode()
AGENT_HEX = hashlib.sha256(AGENT_TOKEN).hexdigest()


class ConfigTests(SynchronousTestCase):
    """Loading credentials: every key, every error with FILE:LINE: key: message."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        (self.dir / "audit.key").write_text("k" * 64)
        os.chmod(self.dir / "audit.key", 0o600)

    def write(self, name: str, text: str | bytes, mode: int = 0o600) -> Path:
        path = self.dir / name
        if isinstance(text, str):
            text = textwrap.dedent(text)
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        os.chmod(path, mode)
        return path

    def load(
        self, identities: str, extra: str = ""
    ) -> tuple[Config | None, list[Problem], list[Problem]]:
        main = self.write(
            "promgate.yaml", BASE + textwrap.dedent(identities) + textwrap.dedent(extra)
        )
        return check_config(main)

    def assertOneProblem(
        self, problems: list[Problem], file: str, line: int, key: str, message: str
    ) -> None:
        """Exactly one problem with ``key``: in ``file`` at ``line``, saying ``message``."""
        matching = [p for p in problems if p.key == key]
        self.assertEqual(len(matching), 1, f"{key}: {[str(p) for p in problems]}")
        (p,) = matching
        self.assertEqual((p.file, p.line), (self.dir / file, line), str(p))
        self.assertIn(message, p.message)
        self.assertTrue(str(p).startswith(f"{self.dir / file}:{line}: {key}: "), str(p))

    def test_all_credentials(self) -> None:
        """cert rules (an SPKI pin too), bearer digests and files, basic: all in one identity."""
        self.write("agent.token", b"  " + AGENT_SECOND_TOKEN + b"\n")
        pin = "AB" * 32
        config, errors, warnings = self.load(
            f"""\
            identities:
              agent:
                cert: [{{cn: agent}}, {{spki_sha256: "{pin}"}}]
                bearer_sha256: "{AGENT_HEX.upper()}"
                bearer_file: agent.token
                basic: {{user: agent, bcrypt: "{OPS_HASH_TEXT}"}}
                roles: [scraper]
              two:
                bearer_sha256: ["{"1" * 64}", "{"2" * 64}"]
            """
        )
        self.assertEqual(errors, [])
        assert config is not None
        agent = config.identities["agent"]
        self.assertEqual(agent.cert, (CertMatch(cn="agent"), CertMatch(spki_sha256="ab" * 32)))
        self.assertEqual(agent.bearer_sha256, (sha(AGENT_TOKEN), sha(AGENT_SECOND_TOKEN)))
        self.assertEqual(agent.basic, (BasicCredential("agent", OPS_HASH),))
        self.assertEqual(len(config.identities["two"].bearer_sha256), 2)
        self.assertEqual([p.key for p in warnings], ["listeners[0].tls"])  # tls: false

    def test_token_never_kept(self) -> None:
        """A token file's token is hashed at load: nothing in the configuration holds it,
        and no hash shows in a repr."""
        self.write("agent.token", AGENT_TOKEN)
        config, errors, _ = self.load("identities:\n  agent: {bearer_file: agent.token}\n")
        assert config is not None, errors
        self.assertNotIn(AGENT_TOKEN.decode(), repr(config))
        self.assertNotIn(AGENT_HEX, repr(config))
        self.assertNotIn(AGENT_TOKEN, repr(config.identities["agent"].bearer_sha256).encode())

    def test_bad_hex(self) -> None:
        """A digest of the wrong length, or not hex, is an error at its line."""
        _, errors, _ = self.load(
            f"""\
            identities:
              a: {{bearer_sha256: "{AGENT_HEX[:-1]}"}}
              b:
                bearer_sha256: ["{AGENT_HEX}", "{"g" * 64}"]
              c: {{cert: {{spki_sha256: abc}}}}
            """
        )
        self.assertOneProblem(
            errors,
            "promgate.yaml",
            5,
            "identities.a.bearer_sha256",
            "64 hexadecimal characters (this has 63)",
        )
        self.assertOneProblem(
            errors, "promgate.yaml", 7, "identities.b.bearer_sha256[1]", "SHA-256 digest"
        )
        self.assertOneProblem(
            errors, "promgate.yaml", 8, "identities.c.cert.spki_sha256", "SHA-256 digest"
        )

    def test_token_file_problems(self) -> None:
        """A missing or empty token file is an error; one readable by others is a warning."""
        self.write("empty.token", b" \n")
        self.write("open.token", AGENT_TOKEN, mode=0o644)
        self.write("spaced.token", b"two words")
        _, errors, warnings = self.load(
            """\
            identities:
              a: {bearer_file: missing.token}
              b: {bearer_file: empty.token}
              c: {bearer_file: open.token}
              d: {bearer_file: spaced.token}
            """
        )
        self.assertOneProblem(
            errors, "promgate.yaml", 5, "identities.a.bearer_file", "does not exist"
        )
        self.assertOneProblem(errors, "promgate.yaml", 6, "identities.b.bearer_file", "is empty")
        self.assertOneProblem(
            errors, "promgate.yaml", 8, "identities.d.bearer_file", "visible ASCII"
        )
        self.assertOneProblem(
            warnings, "promgate.yaml", 7, "identities.c.bearer_file", "readable by group or others"
        )

    def test_same_token_twice(self) -> None:
        """One token naming two identities is an error naming both places."""
        self.write("agent.token", AGENT_TOKEN)
        _, errors, _ = self.load(
            f"""\
            identities:
              a: {{bearer_sha256: "{AGENT_HEX}"}}
              b: {{bearer_file: agent.token}}
            """
        )
        self.assertOneProblem(
            errors,
            "promgate.yaml",
            6,
            "identities.b.bearer_file",
            f"configured for identity 'a' (at {self.dir / 'promgate.yaml'}:5)",
        )

    def test_bad_bcrypt(self) -> None:
        """A basic-auth hash that is not bcrypt (or misses a key) is an error."""
        _, errors, _ = self.load(
            """\
            identities:
              a: {basic: {user: a, bcrypt: "$1$md5crypt$notbcrypt"}}
              b: {basic: {user: b}}
              c: {basic: {user: "c:d", bcrypt: "HASH"}}
            """.replace("HASH", OPS_HASH_TEXT)
        )
        self.assertOneProblem(
            errors, "promgate.yaml", 5, "identities.a.basic.bcrypt", "must be a bcrypt hash"
        )
        self.assertOneProblem(
            errors, "promgate.yaml", 6, "identities.b.basic", "missing required key 'bcrypt'"
        )
        self.assertOneProblem(
            errors, "promgate.yaml", 7, "identities.c.basic.user", "cannot contain ':'"
        )

    def test_same_user_twice(self) -> None:
        """One basic-auth user in two identities is an error."""
        _, errors, _ = self.load(
            f"""\
            identities:
              a: {{basic: {{user: ops, bcrypt: "{OPS_HASH_TEXT}"}}}}
              b: {{basic: [{{user: ops, bcrypt: "{OPS_HASH_TEXT}"}}]}}
            """
        )
        self.assertOneProblem(
            errors,
            "promgate.yaml",
            6,
            "identities.b.basic[0].user",
            "already configured for identity 'a'",
        )

    def test_web_config(self) -> None:
        """Each user of a web-config.yml becomes an identity of that name, with the roles the
        web_configs entry gives; routes may allow them by name."""
        self.write(
            "web-config.yml",
            f"""\
            # exporter-toolkit format
            basic_auth_users:
              ops: {OPS_HASH_TEXT}
              viewer: "{VIEWER_HASH.decode()}"
            """,
        )
        config, errors, _ = self.load(
            "",
            """\
            web_configs:
              - {path: web-config.yml, roles: [scraper]}
            routes:
              node: {allow: [ops, "role:scraper"], targets: {static: ["10.0.0.5:9100"]}}
            """,
        )
        self.assertEqual(errors, [])
        assert config is not None
        self.assertEqual(
            config.identities["ops"],
            Identity(
                "ops", roles=frozenset({"scraper"}), basic=(BasicCredential("ops", OPS_HASH),)
            ),
        )
        self.assertEqual(config.identities["viewer"].basic[0].bcrypt, VIEWER_HASH)
        self.assertIn(self.dir / "web-config.yml", config.files)

    def test_web_config_name_clash(self) -> None:
        """A web-config user named like another identity is an error naming both places."""
        self.write("web-config.yml", f"basic_auth_users:\n  ops: {OPS_HASH_TEXT}\n")
        self.write("more.yml", f"\nbasic_auth_users:\n  ops: {OPS_HASH_TEXT}\n")
        _, errors, _ = self.load(
            "identities:\n  ops: {cert: {cn: ops}}\n",
            "web_configs:\n  - {path: web-config.yml}\n  - {path: more.yml}\n",
        )
        clashes = [p for p in errors if p.key == "basic_auth_users.ops"]
        self.assertEqual(
            [str(p) for p in clashes],
            [
                f"{self.dir / 'web-config.yml'}:2: basic_auth_users.ops: identity 'ops' defined "
                f"twice (first at {self.dir / 'promgate.yaml'}:5)",
                f"{self.dir / 'more.yml'}:3: basic_auth_users.ops: identity 'ops' defined "
                f"twice (first at {self.dir / 'promgate.yaml'}:5)",
            ],
        )

    def test_web_config_problems(self) -> None:
        """Errors inside a web-config.yml point into that file; its TLS settings are ignored
        with a warning; a missing file is an error at the web_configs entry."""
        self.write(
            "web-config.yml",
            """\
            tls_server_config: {cert_file: x.pem}
            basic_auth_users:
              good: "HASH"
              bad: "not-a-hash"
              "no spaces": "HASH"
            colour: blue
            """.replace("HASH", OPS_HASH_TEXT),
        )
        _, errors, warnings = self.load(
            "",
            "web_configs:\n  - {path: web-config.yml}\n  - {path: nowhere.yml, roles: [x]}\n",
        )
        self.assertOneProblem(errors, "web-config.yml", 4, "basic_auth_users.bad", "bcrypt hash")
        self.assertOneProblem(
            errors, "web-config.yml", 5, "basic_auth_users.no spaces", "identity of that name"
        )
        self.assertOneProblem(errors, "web-config.yml", 6, "colour", "unknown key")
        self.assertOneProblem(errors, "promgate.yaml", 6, "web_configs[1].path", "does not exist")
        self.assertOneProblem(warnings, "web-config.yml", 1, "tls_server_config", "ignored")

    def test_slow_bcrypt_cost_warns(self) -> None:
        """A bcrypt cost above 14 is accepted with a warning: each new login is slow."""
        slow = "$2b$15$" + OPS_HASH_TEXT[7:]
        _, errors, warnings = self.load(
            f'identities:\n  a: {{basic: {{user: a, bcrypt: "{slow}"}}}}\n'
        )
        self.assertEqual(errors, [])
        self.assertOneProblem(warnings, "promgate.yaml", 5, "identities.a.basic.bcrypt", "cost 15")

    def test_plain_text_warning(self) -> None:
        """A tls: false listener warns that tokens and passwords would cross in clear text."""
        _, _, warnings = self.load("")
        (w,) = [p for p in warnings if p.key == "listeners[0].tls"]
        self.assertIn("clear text", w.message)

    def test_identity_with_only_a_token_is_fine(self) -> None:
        """An identity with a token and no certificate rule draws no 'never match' warning."""
        _, errors, warnings = self.load(f'identities:\n  a: {{bearer_sha256: "{AGENT_HEX}"}}\n')
        self.assertEqual((errors, [p for p in warnings if "never match" in p.message]), ([], []))

    def test_check_config_prints_locations(self) -> None:
        """``promgate check-config`` prints each credential error as FILE:LINE: key: message."""
        main = self.write(
            "promgate.yaml",
            BASE + 'identities:\n  a: {bearer_sha256: "abc"}\n',
        )
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["check-config", str(main)])
        self.assertEqual(code, 1)
        self.assertIn(
            f"{main}:5: identities.a.bearer_sha256: must be a SHA-256 digest", err.getvalue()
        )
