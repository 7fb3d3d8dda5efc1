"""Tests for per-route upstream credentials (issue #3): the gateway's own Authorization
header (bearer or basic), its client certificate for upstream mutual TLS, and the identity
it expects the upstream to prove (a DNS name, or a URI SAN such as a SPIFFE ID).

Config parsing and every error first; then the upstream request head, in memory; then real
TLS handshakes in memory (iosim); then the real ``twistd promgate`` against fake exporters
on loopback, one of which demands a client certificate.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from service_identity import VerificationError
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from promgate.audit import AuditEvent
from promgate.config.model import (
    Admin,
    Audit,
    CertMatch,
    Config,
    Identity,
    Listener,
    Route,
    Target,
    TLSFiles,
    UpstreamAuth,
    UpstreamIdentity,
    UpstreamTLS,
)
from promgate.http.upstream import UpstreamPool, UpstreamProtocol
from promgate.testing import FakeExporter, GatewayProcess, MemoryGateway, TestPKI
from promgate.testing.configs import ProblemAssertions
from promgate.testing.integration import (
    IDENTITIES,
    Shared,
    eventually,
    metric_samples,
    q,
    scrape_path,
    sha256,
    tls_section,
    workdir,
)
from promgate.tls import UpstreamTLSError, client_options, server_options

NODE = Target("10.0.0.5:9100")
PROMETHEUS = Identity(
    "prometheus",
    cert=(CertMatch(uri="spiffe://promgate.local/prometheus"),),
    roles=frozenset({"scraper"}),
)

#: RFC 7617's example: user Aladdin, password "open sesame".
ALADDIN = b"Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n"
TOKEN = "gate-to-exporter-4f9c2b7e"
SPIFFE_EXPORTER = "spiffe://promgate.local/ns/prod/sa/exporter"

# -- configuration ----------------------------------------------------------------------


class CredentialConfigTests(ProblemAssertions):
    """``authorization`` and ``basic_auth`` on routes and templates: the header built at
    load, and every way they can be wrong, each at its file, line and key path."""

    def secret(self, name: str, text: str, mode: int = 0o600) -> Path:
        """Write ``secrets/NAME``; returns it as the drop-in names it (../secrets/NAME)."""
        path = self.tree.root / "secrets" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
        path.chmod(mode)
        return self.tree.path("conf.d") / ".." / "secrets" / name

    def load(self, text: str) -> tuple[Any, list[Any], list[Any]]:
        self.tree.standard()
        self.tree.write("conf.d/upstream.yaml", text)
        return self.tree.check()

    def route(self, text: str) -> Route:
        config, errors, _ = self.load(text)
        self.assertEqual(errors, [])
        assert config is not None
        route: Route = config.routes["app"]
        return route

    def test_bearer(self) -> None:
        """A bearer token file (relative to the drop-in, whitespace stripped) becomes one
        ready-made header line; type defaults to Bearer; https gives no warning."""
        path = self.secret("app.token", f"\n  {TOKEN}\n")
        config, errors, warnings = self.load(
            """\
            routes:
              app:
                scheme: https
                allow: [ops]
                authorization: {credentials_file: ../secrets/app.token}
                targets: {static: ["app.internal:8443"]}
            """
        )
        self.assertEqual((errors, warnings), ([], []))
        assert config is not None
        self.assertEqual(
            config.routes["app"].upstream_auth,
            UpstreamAuth("Bearer", path, f"Authorization: Bearer {TOKEN}\r\n".encode()),
        )

    def test_other_scheme(self) -> None:
        """``type`` names another scheme, kept as written."""
        self.secret("t", "abc123")
        route = self.route(
            """\
            routes:
              app:
                scheme: https
                allow: [ops]
                authorization: {type: Token, credentials_file: ../secrets/t}
                targets: {static: ["app.internal:8443"]}
            """
        )
        assert route.upstream_auth is not None
        self.assertEqual(route.upstream_auth.header, b"Authorization: Token abc123\r\n")

    def test_basic(self) -> None:
        """basic_auth encodes ``username:password`` (the password file stripped), exactly."""
        path = self.secret("pw", "open sesame\n")
        route = self.route(
            """\
            routes:
              app:
                scheme: https
                allow: [ops]
                basic_auth: {username: Aladdin, password_file: ../secrets/pw}
                targets: {static: ["app.internal:8443"]}
            """
        )
        self.assertEqual(route.upstream_auth, UpstreamAuth("Basic", path, ALADDIN))

    def test_basic_utf8(self) -> None:
        """Non-ASCII user names and passwords are encoded as UTF-8 (RFC 7617 charset)."""
        self.secret("pw", "pässwörd:with:colons")
        route = self.route(
            """\
            routes:
              app:
                scheme: https
                allow: [ops]
                basic_auth: {username: jürgen, password_file: ../secrets/pw}
                targets: {static: ["app.internal:8443"]}
            """
        )
        assert route.upstream_auth is not None
        token = base64.b64encode("jürgen:pässwörd:with:colons".encode())
        self.assertEqual(route.upstream_auth.header, b"Authorization: Basic " + token + b"\r\n")

    @settings(max_examples=50)
    @given(
        username=st.text(
            st.characters(
                max_codepoint=0xFFFF,  # JSON escapes astral characters as surrogate pairs
                blacklist_categories=("Cs", "Cc"),
                blacklist_characters=":",
            ),
            min_size=1,
        ),
        password=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1).filter(
            lambda p: p.strip() != ""
        ),
    )
    def test_basic_round_trip(self, username: str, password: str) -> None:
        """Any user name and password file decode back from the header: the user name as
        written, the password with surrounding whitespace stripped."""
        self.tree.standard()
        self.secret("pw", password)
        self.tree.write(
            "conf.d/upstream.yaml",
            "routes:\n  app:\n    allow: [ops]\n    scheme: https\n"
            f"    basic_auth: {{username: {json.dumps(username)}, password_file: ../secrets/pw}}\n"
            '    targets: {static: ["app.internal:8443"]}\n',
        )
        config, errors, _ = self.tree.check()
        self.assertEqual(errors, [])
        assert config is not None
        auth = config.routes["app"].upstream_auth
        assert auth is not None
        prefix, _, rest = auth.header.partition(b"Basic ")
        self.assertEqual((prefix, rest[-2:]), (b"Authorization: ", b"\r\n"))
        decoded = base64.b64decode(rest[:-2], validate=True).decode("utf-8")
        self.assertEqual(decoded, f"{username}:{password.strip()}")

    def test_template_and_override(self) -> None:
        """A template's credentials are inherited; a route's own credentials of the other
        kind replace them (no "at most one" error)."""
        self.secret("t", TOKEN)
        self.secret("pw", "open sesame")
        self.tree.standard()
        self.tree.write(
            "conf.d/upstream.yaml",
            """\
            templates:
              authed:
                scheme: https
                allow: [ops]
                authorization: {credentials_file: ../secrets/t}
            routes:
              inherits: {template: authed, targets: {static: ["a.internal:8443"]}}
              overrides:
                template: authed
                basic_auth: {username: Aladdin, password_file: ../secrets/pw}
                targets: {static: ["b.internal:8443"]}
              plain: {allow: [ops], targets: {static: ["c.internal:9100"]}}
            """,
        )
        config, errors, _ = self.tree.check()
        self.assertEqual(errors, [])
        assert config is not None
        inherited = config.routes["inherits"].upstream_auth
        assert inherited is not None
        self.assertEqual(inherited.header, f"Authorization: Bearer {TOKEN}\r\n".encode())
        overridden = config.routes["overrides"].upstream_auth
        assert overridden is not None
        self.assertEqual(overridden.header, ALADDIN)
        self.assertIsNone(config.routes["plain"].upstream_auth)

    def test_secret_never_shown(self) -> None:
        """The header is left out of the route's repr, so it cannot reach a log."""
        self.secret("t", TOKEN)
        route = self.route(
            """\
            routes:
              app:
                scheme: https
                allow: [ops]
                authorization: {credentials_file: ../secrets/t}
                targets: {static: ["app.internal:8443"]}
            """
        )
        self.assertNotIn(TOKEN, repr(route))
        self.assertIn("UpstreamAuth(scheme='Bearer'", repr(route))

    def test_clear_text_warning(self) -> None:
        """Credentials on an ``http`` route work, with a warning that they travel in clear."""
        self.secret("t", TOKEN)
        config, errors, warnings = self.load(
            """\
            routes:
              app:
                allow: [ops]
                authorization: {credentials_file: ../secrets/t}
                targets: {static: ["10.0.0.9:9100"]}
            """
        )
        self.assertEqual(errors, [])
        assert config is not None
        self.assertIsNotNone(config.routes["app"].upstream_auth)
        self.assertProblem(
            warnings,
            "conf.d/upstream.yaml",
            self.tree.line("conf.d/upstream.yaml", "authorization:"),
            "routes.app.authorization",
            "sent in clear text unless scheme is https",
        )

    def test_readable_secret_warning(self) -> None:
        """A credentials file group or others can read is a warning."""
        self.secret("t", TOKEN, mode=0o644)
        _, errors, warnings = self.load(
            """\
            routes:
              app:
                scheme: https
                allow: [ops]
                authorization: {credentials_file: ../secrets/t}
                targets: {static: ["app.internal:8443"]}
            """
        )
        self.assertEqual(errors, [])
        self.assertProblem(
            warnings,
            "conf.d/upstream.yaml",
            self.tree.line("conf.d/upstream.yaml", "authorization:"),
            "routes.app.authorization.credentials_file",
            "is readable by others; chmod 600 it",
        )

    def assertRouteError(self, body: str, needle: str, key: str, message: str) -> None:
        """``body`` (the route's keys, indented 4) is invalid: one error at ``key``, on the
        line containing ``needle``, saying ``message``; no error or warning shows a secret."""
        text = (
            "routes:\n  app:\n    scheme: https\n    allow: [ops]\n"
            '    targets: {static: ["app.internal:8443"]}\n' + body
        )
        self.tree.standard()
        self.tree.write("conf.d/upstream.yaml", text)
        config, errors, warnings = self.tree.check()
        self.assertIsNone(config)
        self.assertProblem(
            errors,
            "conf.d/upstream.yaml",
            self.tree.line("conf.d/upstream.yaml", needle),
            key,
            message,
        )
        for problem in errors + warnings:
            self.assertNotIn(TOKEN, str(problem))
            self.assertNotIn("open sesame", str(problem))

    def test_bearer_errors(self) -> None:
        """Every way an ``authorization`` can be wrong."""
        self.secret("t", TOKEN)
        self.secret("empty", " \n\t\n")
        self.secret("spaced", f"{TOKEN} {TOKEN}")
        self.secret("two-lines", f"{TOKEN}\n{TOKEN}\n")
        (self.tree.root / "secrets" / "binary").write_bytes(b"\xff\xfe" + TOKEN.encode())
        auth = "routes.app.authorization"
        cases = [
            (
                "    authorization: {credentials_file: ../secrets/missing}\n",
                "authorization:",
                f"{auth}.credentials_file",
                "does not exist",
            ),
            (
                "    authorization: {credentials_file: ../secrets/empty}\n",
                "authorization:",
                f"{auth}.credentials_file",
                "is empty",
            ),
            (
                "    authorization: {credentials_file: ../secrets/spaced}\n",
                "authorization:",
                f"{auth}.credentials_file",
                "one line of printable ASCII without spaces",
            ),
            (
                "    authorization: {credentials_file: ../secrets/two-lines}\n",
                "authorization:",
                f"{auth}.credentials_file",
                "one line of printable ASCII without spaces",
            ),
            (
                "    authorization: {credentials_file: ../secrets/binary}\n",
                "authorization:",
                f"{auth}.credentials_file",
                "is not UTF-8 text",
            ),
            (
                "    authorization: {type: Bearer}\n",
                "authorization:",
                auth,
                "missing required key 'credentials_file'",
            ),
            (
                f"    authorization: {{credentials: {TOKEN}}}\n",
                "authorization:",
                f"{auth}.credentials",
                "put the token in a file and name it with credentials_file",
            ),
            (
                "    authorization: {type: Basic, credentials_file: ../secrets/t}\n",
                "authorization:",
                f"{auth}.type",
                "written as basic_auth",
            ),
            (
                '    authorization: {type: "Bear er", credentials_file: ../secrets/t}\n',
                "authorization:",
                f"{auth}.type",
                "must be an HTTP auth scheme",
            ),
            (
                "    authorization: {credentials_file: ../secrets/t, header: X-Token}\n",
                "authorization:",
                f"{auth}.header",
                "unknown key (expected one of: credentials, credentials_file, type)",
            ),
            ("    authorization: ../secrets/t\n", "authorization:", auth, "must be a mapping"),
        ]
        for body, needle, key, message in cases:
            with self.subTest(body=body):
                self.assertRouteError(body, needle, key, message)

    def test_basic_errors(self) -> None:
        """Every way a ``basic_auth`` can be wrong."""
        self.secret("pw", "open sesame")
        self.secret("empty", "\n")
        basic = "routes.app.basic_auth"
        cases = [
            (
                "    basic_auth: {password_file: ../secrets/pw}\n",
                basic,
                "missing required key 'username'",
            ),
            (
                "    basic_auth: {username: Aladdin}\n",
                basic,
                "missing required key 'password_file'",
            ),
            (
                '    basic_auth: {username: "a:b", password_file: ../secrets/pw}\n',
                f"{basic}.username",
                "must not contain ':' or control characters",
            ),
            (
                '    basic_auth: {username: "", password_file: ../secrets/pw}\n',
                f"{basic}.username",
                "must be a non-empty string",
            ),
            (
                '    basic_auth: {username: Aladdin, password: "open sesame"}\n',
                f"{basic}.password",
                "put the password in a file and name it with password_file",
            ),
            (
                "    basic_auth: {username: Aladdin, password_file: ../secrets/empty}\n",
                f"{basic}.password_file",
                "is empty",
            ),
            (
                "    basic_auth: {username: Aladdin, password_file: ../secrets/nope}\n",
                f"{basic}.password_file",
                "does not exist",
            ),
        ]
        for body, key, message in cases:
            with self.subTest(body=body):
                self.assertRouteError(body, "basic_auth:", key, message)

    def test_at_most_one(self) -> None:
        """``authorization`` and ``basic_auth`` together, in a route or a template, is an
        error at the second."""
        self.secret("t", TOKEN)
        self.secret("pw", "open sesame")
        self.assertRouteError(
            "    authorization: {credentials_file: ../secrets/t}\n"
            "    basic_auth: {username: Aladdin, password_file: ../secrets/pw}\n",
            "basic_auth:",
            "routes.app.basic_auth",
            "give at most one of authorization and basic_auth",
        )
        self.tree.write(
            "conf.d/upstream.yaml",
            """\
            templates:
              both:
                authorization: {credentials_file: ../secrets/t}
                basic_auth: {username: Aladdin, password_file: ../secrets/pw}
            routes:
              app: {template: both, allow: [ops], targets: {static: ["a.internal:9100"]}}
            """,
        )
        config, errors, _ = self.tree.check()
        self.assertIsNone(config)
        self.assertProblem(
            errors,
            "conf.d/upstream.yaml",
            self.tree.line("conf.d/upstream.yaml", "basic_auth:"),
            "templates.both.basic_auth",
            "give at most one of authorization and basic_auth",
        )


class UpstreamTLSConfigTests(ProblemAssertions):
    """A route's ``tls`` gains ``cert`` + ``key`` (checked like the listener's) and
    ``identity`` (one of ``dns``, ``uri``)."""

    def setUp(self) -> None:
        super().setUp()
        self.pki = self.tree.pki
        self.gw_cert, self.gw_key = self.pki.client("gateway")

    def tls_route(self, tls: str, scheme: str = "https") -> tuple[Any, list[Any], list[Any]]:
        self.tree.standard()
        self.tree.write(
            "conf.d/upstream.yaml",
            f"""\
            routes:
              app:
                scheme: {scheme}
                allow: [ops]
                tls: {tls}
                targets: {{static: ["127.0.0.1:8443"]}}
            """,
        )
        return self.tree.check()

    def test_valid(self) -> None:
        """cert, key and identity load into UpstreamTLS; no warning."""
        for identity, expected in (
            ("{dns: exporter.internal}", UpstreamIdentity(dns="exporter.internal")),
            (f"{{uri: {q(SPIFFE_EXPORTER)}}}", UpstreamIdentity(uri=SPIFFE_EXPORTER)),
        ):
            config, errors, warnings = self.tls_route(
                f"{{ca: {q(self.pki.ca_cert)}, cert: {q(self.gw_cert)}, "
                f"key: {q(self.gw_key)}, identity: {identity}}}"
            )
            self.assertEqual((errors, warnings), ([], []))
            assert config is not None
            self.assertEqual(
                config.routes["app"].upstream_tls,
                UpstreamTLS(
                    ca=self.pki.ca_cert, cert=self.gw_cert, key=self.gw_key, identity=expected
                ),
            )

    def assertTLSError(self, tls: str, key: str, message: str) -> None:
        config, errors, _ = self.tls_route(tls)
        self.assertIsNone(config)
        self.assertProblem(
            errors,
            "conf.d/upstream.yaml",
            self.tree.line("conf.d/upstream.yaml", "tls:"),
            key,
            message,
        )

    def test_errors(self) -> None:
        """A half pair, files that are missing, do not parse or do not match, and every
        malformed identity."""
        _, other_key = self.pki.client("other")
        garbage = self.tree.root / "garbage.pem"
        garbage.write_text("not PEM at all\n")
        tls = "routes.app.tls"
        cert, key = q(self.gw_cert), q(self.gw_key)
        cases = [
            (f"{{cert: {cert}}}", f"{tls}.cert", "a client certificate needs its 'key'"),
            (f"{{key: {key}}}", f"{tls}.key", "a client key needs its 'cert'"),
            (
                f"{{cert: {cert}, key: {q(other_key)}}}",
                f"{tls}.key",
                f"key {other_key} does not match certificate {self.gw_cert}",
            ),
            (f"{{cert: {q(garbage)}, key: {key}}}", f"{tls}.cert", "not a PEM certificate"),
            (
                f"{{cert: {cert}, key: {q(garbage)}}}",
                f"{tls}.key",
                "not an unencrypted PEM private key",
            ),
            (f'{{cert: "nope.pem", key: {key}}}', f"{tls}.cert", "does not exist"),
            (
                "{identity: {dns: a.example.org, uri: 'spiffe://a/b'}}",
                f"{tls}.identity",
                "give exactly one of dns, uri",
            ),
            ("{identity: {}}", f"{tls}.identity", "give exactly one of dns, uri"),
            ("{identity: {cn: exporter}}", f"{tls}.identity.cn", "unknown key"),
            ("{identity: {dns: '*.example.org'}}", f"{tls}.identity.dns", "must be a DNS name"),
            ("{identity: {dns: 10.0.0.1}}", f"{tls}.identity.dns", "must be a DNS name"),
            ("{identity: {uri: 'not a uri'}}", f"{tls}.identity.uri", "must be an absolute URI"),
            ("{identity: {uri: 42}}", f"{tls}.identity.uri", "must be a non-empty string"),
        ]
        for tls_text, key_path, message in cases:
            with self.subTest(tls=tls_text):
                self.assertTLSError(tls_text, key_path, message)

    def test_server_certificate_as_client_certificate(self) -> None:
        """A certificate without the clientAuth usage is a warning: upstreams refuse it."""
        _, errors, warnings = self.tls_route(
            f"{{cert: {q(self.pki.gate_cert)}, key: {q(self.pki.gate_key)}}}"
        )
        self.assertEqual(errors, [])
        self.assertProblem(
            warnings,
            "conf.d/upstream.yaml",
            self.tree.line("conf.d/upstream.yaml", "tls:"),
            "routes.app.tls.cert",
            "extended key usage lacks clientAuth",
        )

    def test_http_scheme_warns(self) -> None:
        """tls settings on an ``http`` route are still only a warning."""
        config, errors, warnings = self.tls_route(
            f"{{cert: {q(self.gw_cert)}, key: {q(self.gw_key)}}}", scheme="http"
        )
        self.assertEqual(errors, [])
        self.assertIsNotNone(config)
        self.assertProblem(
            warnings,
            "conf.d/upstream.yaml",
            self.tree.line("conf.d/upstream.yaml", "tls:"),
            "routes.app.tls",
            "tls settings are ignored unless scheme is https",
        )


# -- the upstream request head, in memory --------------------------------------------------

#: The client's own credential: accepted by the gateway when it knows bearer identities.
CLIENT_TOKEN = b"client-token-never-forwarded"
SECRET = b"route-secret-7d1e"
SECURED = Route(
    "secured",
    (NODE,),
    allow=("role:scraper",),
    upstream_auth=UpstreamAuth(
        "Bearer", Path("secured.token"), b"Authorization: Bearer " + SECRET + b"\r\n"
    ),
)
BASIC = Route(
    "basic",
    (NODE,),
    allow=("role:scraper",),
    upstream_auth=UpstreamAuth("Basic", Path("basic.password"), ALADDIN),
)
#: Every request header a client may send that must not reach the upstream.
CLIENT_SECRETS = (
    b"Cookie: session=client-cookie",
    b"Proxy-Authorization: Basic Y2xpZW50OnByb3h5",
    b"X-Forwarded-For: 192.0.2.99",
    b"Forwarded: for=192.0.2.99",
)
PASSED = (b"Accept: text/plain;version=0.0.4", b"User-Agent: Prometheus/2.42.0")


def _prometheus() -> Identity:
    """PROMETHEUS, also holding CLIENT_TOKEN when identities can hold bearer tokens, so
    that the client's own ``Authorization`` is accepted, and still must not travel on."""
    if "bearer_sha256" in attrs.fields_dict(Identity):
        digest = hashlib.sha256(CLIENT_TOKEN).digest()
        return attrs.evolve(PROMETHEUS, bearer_sha256=(digest,))  # type: ignore[misc]
    return PROMETHEUS


class UpstreamRequestHeadTests(SynchronousTestCase):
    """The upstream request carries the route's Authorization, built at load, and none of
    the client's credentials; the secret never reaches an audit record."""

    def setUp(self) -> None:
        self.pki = _pki(Path(self.mktemp()).resolve())
        self.cert = self.pki.client("prometheus")
        tls = TLSFiles(self.pki.gate_cert, self.pki.gate_key, self.pki.ca_cert)
        config = Config(
            source=Path("promgate.yaml"),
            listeners=(Listener("scrape", "http", "tcp:9443", tls),),
            identities={"prometheus": _prometheus()},
            routes={
                "node": Route("node", (NODE,), allow=("role:scraper",)),
                "secured": SECURED,
                "basic": BASIC,
            },
            admin=Admin(),
            audit=Audit(Path("audit.jsonl"), Path("audit.key")),
        )
        self.gw = MemoryGateway(config)
        self.exporter = self.gw.upstream(NODE.address, body=b"up 1\n")

    def requests(self) -> list[AuditEvent]:
        return self.gw.audit_records("request")

    def upstream_request(self, route: str, *headers: bytes) -> bytes:
        pairs = [tuple(h.decode().split(": ", 1)) for h in headers]
        response = self.gw.get(
            f"/scrape?route={route}&target=10.0.0.5%3A9100", identity=self.cert, headers=pairs
        )
        self.assertEqual(response.status, 200)
        return self.exporter.requests[-1].raw

    def test_bearer_exact(self) -> None:
        """The route's bearer header, exactly, after the headers that pass."""
        request = self.upstream_request("secured", *PASSED, *CLIENT_SECRETS)
        self.assertEqual(
            request,
            b"GET /metrics HTTP/1.1\r\nHost: 10.0.0.5:9100\r\n"
            b"Accept: text/plain;version=0.0.4\r\nUser-Agent: Prometheus/2.42.0\r\n"
            b"Authorization: Bearer " + SECRET + b"\r\n\r\n",
        )

    def test_basic_exact(self) -> None:
        """The route's basic header, exactly."""
        request = self.upstream_request("basic")
        self.assertEqual(
            request, b"GET /metrics HTTP/1.1\r\nHost: 10.0.0.5:9100\r\n" + ALADDIN + b"\r\n"
        )

    def test_client_authorization_replaced(self) -> None:
        """A client's own Authorization never travels on: the route's replaces it."""
        request = self.upstream_request(
            "secured", b"Authorization: Bearer " + CLIENT_TOKEN, *CLIENT_SECRETS
        )
        self.assertNotIn(CLIENT_TOKEN, request)
        self.assertEqual(request.count(b"Authorization:"), 1)
        self.assertIn(b"Authorization: Bearer " + SECRET + b"\r\n", request)

    def test_no_credentials_without_route_auth(self) -> None:
        """A route without credentials sends none, whatever the client sent."""
        request = self.upstream_request(
            "node", b"Authorization: Bearer " + CLIENT_TOKEN, *CLIENT_SECRETS, *PASSED
        )
        self.assertEqual(
            request,
            b"GET /metrics HTTP/1.1\r\nHost: 10.0.0.5:9100\r\n"
            b"Accept: text/plain;version=0.0.4\r\nUser-Agent: Prometheus/2.42.0\r\n\r\n",
        )

    def test_secret_not_audited(self) -> None:
        """Audit records of scrapes through a credentialed route never hold the secret."""
        self.upstream_request("secured")
        self.upstream_request("basic")
        text = repr(self.gw.audit_records())
        self.assertEqual(len(self.requests()), 2)
        for secret in (SECRET, b"QWxhZGRpbjpvcGVuIHNlc2FtZQ==", CLIENT_TOKEN):
            self.assertNotIn(secret.decode(), text)

    def test_tls_failures_on_connect(self) -> None:
        """A VerificationError or unloadable TLS files when connecting is a 502
        upstream_tls_failed, audited and counted."""
        for error in (VerificationError(errors=[]), UpstreamTLSError("cannot load")):
            self.gw.audit.events.clear()
            self.gw.upstream(NODE.address, connect_error=error)
            response = self.gw.get("/scrape?route=node&target=10.0.0.5%3A9100", identity=self.cert)
            self.assertEqual(response.status, 502)
            (event,) = self.requests()
            self.assertEqual((event.reason, event.status), ("upstream_tls_failed", 502))
        self.assertEqual(
            self.gw.sample(
                "promgate_upstream_errors_total",
                {"route": "node", "reason": "upstream_tls_failed"},
            ),
            2.0,
        )


# -- upstream TLS handshakes, in memory -------------------------------------------------------

_PKI: TestPKI | None = None


def _pki(base: Path) -> TestPKI:
    """One test PKI for the module (the upstream certificates below are issued once)."""
    global _PKI
    if _PKI is None:
        _PKI = TestPKI(base)
    return _PKI


class _Upstream(Protocol):
    """The exporter's side of an in-memory connection: what reached its application."""

    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class _Handler:
    """An UpstreamHandler that writes down how the exchange ended."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def upstream_head(
        self, status: int, reason: bytes, headers: bytes, framing: int, length: int
    ) -> None:
        self.events.append(("head", status))

    def upstream_data(self, data: bytes) -> None:
        self.events.append(("data", data))

    def upstream_done(self) -> None:
        self.events.append(("done",))

    def upstream_failed(self, reason: str, detail: str, retryable: bool) -> None:
        self.events.append(("failed", reason, detail))


REQUEST = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:8443\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nup 1\n"


class UpstreamHandshakeTests(SynchronousTestCase):
    """Real TLS between UpstreamProtocol and an exporter, in memory: the client
    certificate, the DNS and URI identity checks, and that a failed check sends nothing."""

    def setUp(self) -> None:
        self.pki = _pki(Path(self.mktemp()).resolve())
        self.clock = MemoryReactorClock()
        self.pool = UpstreamPool(self.clock)
        self.spiffe = self.pki.upstream("spiffe", uris=[SPIFFE_EXPORTER])
        self.gateway_cert = self.pki.client("gateway")

    def exchange(
        self,
        settings: UpstreamTLS,
        *,
        server_cert: tuple[Path, Path] | None = None,
        require_client_cert: bool = False,
        host: str = "127.0.0.1",
    ) -> tuple[_Handler, _Upstream, list[bytes | None]]:
        """Connect as the pool would, send the request at once (before the handshake, as
        the exchange does), answer if it arrives; returns the handler, what the exporter
        received, and the SNI names it saw."""
        cert, key = server_cert or self.spiffe
        options: CertificateOptions
        if require_client_cert:
            options = server_options(TLSFiles(cert, key, self.pki.ca_cert))
        else:
            options = PrivateCertificate.loadPEM(cert.read_bytes() + key.read_bytes()).options()
        sni: list[bytes | None] = []
        options.getContext().set_tlsext_servername_callback(
            lambda conn: sni.append(conn.get_servername())
        )
        exporter = _Upstream()
        server_factory = TLSMemoryBIOFactory(
            options, False, ClientFactory.forProtocol(lambda: exporter), clock=self.clock
        )
        client_factory = TLSMemoryBIOFactory(
            client_options(host, settings),
            True,
            ClientFactory.forProtocol(lambda: UpstreamProtocol(self.pool, ("r", host))),
            clock=self.clock,
        )
        client, _, pump = iosim.connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            greet=False,
            clock=self.clock,
        )
        upstream = client.wrappedProtocol
        assert isinstance(upstream, UpstreamProtocol)
        handler = _Handler()
        upstream.send(handler, REQUEST, head_only=False, max_body=1 << 20)
        pump.flush()
        if exporter.data == REQUEST:
            assert exporter.transport is not None
            exporter.transport.write(RESPONSE)
            pump.flush()
        return handler, exporter, sni

    def assertRelayed(self, handler: _Handler, exporter: _Upstream) -> None:
        self.assertEqual(exporter.data, REQUEST)
        self.assertEqual(handler.events, [("head", 200), ("data", b"up 1\n"), ("done",)])

    def assertRefused(self, handler: _Handler, exporter: _Upstream, detail: str) -> None:
        """upstream_tls_failed, and not one byte of the request reached the exporter."""
        self.assertEqual(exporter.data, b"")
        ((what, reason, text),) = handler.events
        self.assertEqual((what, reason), ("failed", "upstream_tls_failed"))
        self.assertIn(detail, text)

    def test_uri_identity(self) -> None:
        """An expected URI SAN the upstream carries: the exchange goes through, with the
        target's host as SNI only when it is a name."""
        ca = self.pki.ca_cert
        handler, exporter, sni = self.exchange(
            UpstreamTLS(ca=ca, identity=UpstreamIdentity(uri=SPIFFE_EXPORTER))
        )
        self.assertRelayed(handler, exporter)
        self.assertEqual(sni, [None])
        handler, exporter, sni = self.exchange(
            UpstreamTLS(ca=ca, identity=UpstreamIdentity(uri=SPIFFE_EXPORTER)),
            host="exporter.internal",
        )
        self.assertRelayed(handler, exporter)
        self.assertEqual(sni, [b"exporter.internal"])

    def test_uri_identity_mismatch(self) -> None:
        """Another SPIFFE ID (same trust domain, other path), a prefix, or a certificate
        with no URI SAN: the handshake fails and nothing is sent."""
        for uri in (
            "spiffe://promgate.local/ns/prod/sa/other",
            "spiffe://promgate.local/ns/prod/sa",
            SPIFFE_EXPORTER + "/",
        ):
            with self.subTest(uri=uri):
                handler, exporter, _ = self.exchange(
                    UpstreamTLS(ca=self.pki.ca_cert, identity=UpstreamIdentity(uri=uri))
                )
                self.assertRefused(handler, exporter, f"ExpectedURI(uri='{uri}')")
        handler, exporter, _ = self.exchange(
            UpstreamTLS(ca=self.pki.ca_cert, identity=UpstreamIdentity(uri=SPIFFE_EXPORTER)),
            server_cert=(self.pki.gate_cert, self.pki.gate_key),
        )
        self.assertRefused(handler, exporter, "URIMismatch")

    def test_uri_identity_still_verifies_the_chain(self) -> None:
        """The right URI SAN from a CA the route does not trust is refused: the URI check
        replaces the host name check, never chain verification."""
        other = TestPKI(Path(self.mktemp()))
        handler, exporter, _ = self.exchange(
            UpstreamTLS(ca=other.ca_cert, identity=UpstreamIdentity(uri=SPIFFE_EXPORTER))
        )
        self.assertRefused(handler, exporter, "certificate verify failed")

    def test_dns_identity(self) -> None:
        """``identity.dns`` is the name checked; SNI is ``server_name`` when given, else
        that name; a name the certificate does not carry is refused, sending nothing."""
        ca = self.pki.ca_cert
        handler, exporter, sni = self.exchange(
            UpstreamTLS(ca=ca, identity=UpstreamIdentity(dns="localhost"))
        )
        self.assertRelayed(handler, exporter)
        self.assertEqual(sni, [b"localhost"])
        handler, exporter, sni = self.exchange(
            UpstreamTLS(
                ca=ca, server_name="lb.example.org", identity=UpstreamIdentity(dns="localhost")
            )
        )
        self.assertRelayed(handler, exporter)
        self.assertEqual(sni, [b"lb.example.org"])
        handler, exporter, _ = self.exchange(
            UpstreamTLS(ca=ca, identity=UpstreamIdentity(dns="metrics.example.org"))
        )
        self.assertRefused(handler, exporter, "DNSMismatch")

    def test_client_certificate(self) -> None:
        """An exporter that demands a client certificate gets the route's and answers;
        without one it refuses the handshake and no request reaches its application."""
        cert, key = self.gateway_cert
        handler, exporter, _ = self.exchange(
            UpstreamTLS(ca=self.pki.ca_cert, cert=cert, key=key), require_client_cert=True
        )
        self.assertRelayed(handler, exporter)
        assert exporter.transport is not None
        peer = exporter.transport.getPeerCertificate()  # type: ignore[attr-defined]
        self.assertEqual(peer.get_subject().CN, "gateway")
        handler, exporter, _ = self.exchange(
            UpstreamTLS(ca=self.pki.ca_cert), require_client_cert=True
        )
        self.assertEqual(exporter.data, b"")
        self.assertEqual([e[:2] for e in handler.events], [("failed", "upstream_tls_failed")])

    def test_client_certificate_chain(self) -> None:
        """A cert file holding the leaf then intermediates is loaded whole."""
        cert, key = self.gateway_cert
        bundle = Path(self.mktemp())
        bundle.write_bytes(cert.read_bytes() + self.pki.ca_cert.read_bytes())
        handler, exporter, _ = self.exchange(
            UpstreamTLS(ca=self.pki.ca_cert, cert=bundle, key=key), require_client_cert=True
        )
        self.assertRelayed(handler, exporter)

    def test_unloadable_files(self) -> None:
        """Files that vanished or broke after loading raise UpstreamTLSError, and the pool
        turns that into a failed connect instead of an exception."""
        cert, key = self.gateway_cert
        broken = Path(self.mktemp())
        broken.write_text("garbage")
        for broken_tls in (
            UpstreamTLS(ca=Path(self.mktemp())),
            UpstreamTLS(ca=self.pki.ca_cert, cert=cert, key=broken),
            UpstreamTLS(ca=self.pki.ca_cert, cert=broken, key=key),
        ):
            with self.subTest(tls=broken_tls):
                self.assertRaises(UpstreamTLSError, client_options, "127.0.0.1", broken_tls)
                route = Route("r", (NODE,), scheme="https", upstream_tls=broken_tls)
                failure = self.failureResultOf(self.pool.connect(route, NODE))
                failure.trap(UpstreamTLSError)


# -- the real gateway, real TLS, on loopback ------------------------------------------------

cleanups: list[Callable[[], object]] = []


@atexit.register
def _runcleanups() -> None:
    while cleanups:
        with contextlib.suppress(Exception):
            cleanups.pop()()


class CredentialsSetup:
    """One gateway with a route per scenario, and the exporters behind them: one that
    demands a client certificate, one with a SPIFFE ID, one that must never get a request,
    and a plain one that records the credentials it is given."""

    def __init__(self) -> None:
        self.dir = workdir("upstream-credentials")
        pki = self.pki = TestPKI(self.dir / "pki")
        gw_cert, gw_key = pki.client("gateway")
        spiffe = pki.upstream("spiffe", uris=[SPIFFE_EXPORTER])
        self.body = os.urandom(8 * 1024)
        self.mtls = self.exporter(tls=pki.server_context(require_client_cert=True))
        self.spiffe = self.exporter(tls=pki.server_context(cert=spiffe))
        self.untouched = self.exporter(tls=pki.server_context(cert=spiffe))
        self.plain = self.exporter()
        secrets = self.dir / "secrets"
        secrets.mkdir()
        (secrets / "token").write_text(TOKEN + "\n")
        (secrets / "password").write_text("open sesame\n")
        for f in secrets.iterdir():
            f.chmod(0o600)
        self.audit_log = self.dir / "audit.jsonl"
        ca = q(pki.ca_cert)
        config = (
            tls_section(pki)
            + 'admin: {endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + 'listeners:\n  - {name: scrape, endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + IDENTITIES
            + f"""
templates:
  https: {{scheme: https, allow: ["role:scraper"], tls: {{ca: {ca}}}}}
  http: {{allow: ["role:scraper"]}}
routes:
  mtls-cert:
    template: https
    tls: {{ca: {ca}, cert: {q(gw_cert)}, key: {q(gw_key)}}}
    authorization: {{credentials_file: {q(secrets / "token")}}}
    targets: {{static: ["{self.mtls.address}"]}}
  mtls-no-cert:
    template: https
    targets: {{static: ["{self.mtls.address}"]}}
  uri-match:
    template: https
    tls: {{ca: {ca}, identity: {{uri: "{SPIFFE_EXPORTER}"}}}}
    targets: {{static: ["{self.spiffe.address}"]}}
  uri-mismatch:
    template: https
    tls: {{ca: {ca}, identity: {{uri: "spiffe://promgate.local/ns/prod/sa/other"}}}}
    targets: {{static: ["{self.untouched.address}"]}}
  dns-match:
    template: https
    tls: {{ca: {ca}, identity: {{dns: localhost}}}}
    targets: {{static: ["{self.spiffe.address}"]}}
  dns-mismatch:
    template: https
    tls: {{ca: {ca}, identity: {{dns: metrics.example.org}}}}
    targets: {{static: ["{self.untouched.address}"]}}
  bearer:
    template: http
    metrics_path: /bearer
    authorization: {{type: Bearer, credentials_file: {q(secrets / "token")}}}
    targets: {{static: ["{self.plain.address}"]}}
  basic:
    template: http
    metrics_path: /basic
    basic_auth: {{username: Aladdin, password_file: {q(secrets / "password")}}}
    targets: {{static: ["{self.plain.address}"]}}
audit: {{path: {q(self.audit_log)}, key_file: {q(pki.audit_key)}}}
"""
        )
        self.gateway = GatewayProcess(self.dir / "gateway", config)
        cleanups.append(self.gateway.stop)
        self.gateway.start()
        self.prometheus = pki.client_context("prometheus")

    def exporter(self, **kw: Any) -> FakeExporter:
        routes = {p: self.body for p in ("/metrics", "/bearer", "/basic")}
        exporter = FakeExporter(routes, **kw)
        cleanups.append(exporter.stop)
        return exporter

    def scrape(self, route: str, exporter: FakeExporter, **kw: Any) -> Any:
        return self.gateway.get(
            "scrape", scrape_path(route, exporter.address), self.prometheus, **kw
        )

    def audited(self, route: str) -> dict[str, Any]:
        return self.gateway.wait_for_audit_record(
            self.audit_log, lambda r: r["event"] == "request" and r.get("route") == route
        )

    def upstream_errors(self) -> dict[str, float]:
        """promgate_upstream_errors_total by route, for reason upstream_tls_failed."""
        text = self.gateway.get("admin", "/metrics", None).body.decode()
        return {
            labels["route"]: value
            for labels, value in metric_samples(text, "promgate_upstream_errors_total")
            if labels.get("reason") == "upstream_tls_failed"
        }


SETUP = Shared(CredentialsSetup)


class UpstreamCredentialsIntegrationTests(SynchronousTestCase):
    """The real ``twistd promgate`` presents each route's credentials to real upstreams
    over real TLS, and checks the identity each upstream proves."""

    def setUp(self) -> None:
        self.s = SETUP.get()

    def assertTLSFailed(self, route: str, exporter: FakeExporter) -> None:
        """502, audited and counted as upstream_tls_failed."""
        resp = self.s.scrape(route, exporter)
        self.assertEqual(resp.status, 502, resp.body)
        record = self.s.audited(route)
        self.assertEqual(
            (record["status"], record["reason"], record["decision"]),
            (502, "upstream_tls_failed", "allow"),
        )
        eventually(
            lambda: self.s.upstream_errors().get(route), f"{route} upstream_tls_failed counted"
        )

    def test_client_certificate(self) -> None:
        """An exporter requiring a client certificate answers the route that has one, with
        the route's bearer token; the route without one gets 502 upstream_tls_failed."""
        resp = self.s.scrape("mtls-cert", self.s.mtls)
        self.assertEqual((resp.status, sha256(resp.body)), (200, sha256(self.s.body)))
        self.assertEqual(self.s.mtls.client_subjects, ["CN=gateway"])
        ((_, headers),) = self.s.mtls.requests
        self.assertEqual(headers["authorization"], f"Bearer {TOKEN}")
        self.assertTLSFailed("mtls-no-cert", self.s.mtls)
        eventually(lambda: self.s.mtls.tls_failures or None, "the exporter's refusal")
        self.assertEqual(len(self.s.mtls.requests), 1)

    def test_uri_identity(self) -> None:
        """A matching SPIFFE ID gets 200; another is 502 and the exporter receives nothing,
        though the gateway did connect to it."""
        resp = self.s.scrape("uri-match", self.s.spiffe)
        self.assertEqual((resp.status, sha256(resp.body)), (200, sha256(self.s.body)))
        self.assertTLSFailed("uri-mismatch", self.s.untouched)
        eventually(lambda: self.s.untouched.connections or None, "the refused connection")
        self.assertEqual(self.s.untouched.requests, [])

    def test_dns_identity(self) -> None:
        """A DNS name the certificate carries gets 200; one it does not is 502 with nothing
        sent."""
        resp = self.s.scrape("dns-match", self.s.spiffe)
        self.assertEqual(resp.status, 200)
        self.assertTLSFailed("dns-mismatch", self.s.untouched)
        self.assertEqual(self.s.untouched.requests, [])

    def test_bearer_and_basic_arrive_exactly(self) -> None:
        """The exporter gets exactly the route's credentials, and none of the client's."""
        client = {"Cookie": "session=client", "Proxy-Authorization": "Basic Y2xpZW50OnA="}
        for route in ("bearer", "basic"):
            self.assertEqual(self.s.scrape(route, self.s.plain, headers=client).status, 200)
        seen = {target: headers for target, headers in self.s.plain.requests}
        self.assertEqual(seen["/bearer"]["authorization"], f"Bearer {TOKEN}")
        self.assertEqual(seen["/basic"]["authorization"], "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==")
        for headers in seen.values():
            self.assertNotIn("cookie", headers)
            self.assertNotIn("proxy-authorization", headers)

    def test_secrets_stay_out_of_audit_and_log(self) -> None:
        """Neither the audit log nor twistd's log ever holds a route's secret."""
        self.assertEqual(self.s.scrape("bearer", self.s.plain).status, 200)
        self.assertEqual(self.s.scrape("uri-mismatch", self.s.untouched).status, 502)
        self.s.audited("bearer")
        self.s.audited("uri-mismatch")
        for text in (self.s.audit_log.read_text(), self.s.gateway.log()):
            self.assertNotIn(TOKEN, text)
            self.assertNotIn("QWxhZGRpbjpvcGVuIHNlc2FtZQ==", text)
            self.assertNotIn("open sesame", text)
