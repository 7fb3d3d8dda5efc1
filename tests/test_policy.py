"""Tests for ScrapePolicy, the one decision behind /scrape: the order of checks and the status
and reason each gives, the rule that decided, strict path normalisation (the path policy
evaluates is the path sent upstream), configured paths held to the same canonical form, and
the gateway refusing a path trick before anything reaches an upstream."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from promgate.audit import AuditEvent
from promgate.config.loader import check_config
from promgate.config.model import Admin, Audit, Config, Identity, Limits, Listener, Route, Target
from promgate.http.refusals import decision_status
from promgate.identity import Recognition
from promgate.policy import (
    AUTHZ_DENIED,
    BAD_REQUEST,
    NOT_FOUND,
    PARAM_REFUSED,
    PATH_REFUSED,
    POLICY_REASONS,
    Decision,
    Refusal,
    ScrapePolicy,
    ScrapeQuery,
    parse_scrape_query,
)
from promgate.testing import Bearer, MemoryGateway, Response, TestPKI

NODE = Target("10.0.0.5:9100")
SCRAPER = Identity("prometheus", roles=frozenset({"scraper"}))
OPS = Identity("ops", roles=frozenset({"admin"}))
ROUTES = {
    "node": Route(
        "node",
        (NODE,),
        paths=("/metrics", "/metrics/extra", "/caf%C3%A9"),
        allow=("role:scraper",),
        limits=Limits(rate=5.0, burst=10, max_concurrent=50),
    ),
    "blackbox": Route(
        "blackbox",
        (Target("127.0.0.1:9115"),),
        metrics_path="/probe",
        paths=("/probe",),
        params=("module",),
        allow=("prometheus",),
    ),
}
RECOGNISED = Recognition(SCRAPER, "ok")


def query(route: str = "node", target: str = "10.0.0.5:9100", path: str | None = None,
          params: tuple[tuple[str, str], ...] = ()) -> ScrapeQuery:  # fmt: skip
    """A decoded /scrape query."""
    return ScrapeQuery(route, target, path, params)


class DecideTests(SynchronousTestCase):
    """The order of checks, the status and reason of each, and the rule that decided."""

    def setUp(self) -> None:
        self.policy = ScrapePolicy(ROUTES)

    def decide(self, q: ScrapeQuery, recognition: Recognition = RECOGNISED) -> Decision:
        return self.policy.decide(recognition, q)

    def assertDecision(
        self, decision: Decision, status: int, reason: str, rule: str, failed: str
    ) -> None:
        self.assertEqual(
            (decision.allowed, decision_status(decision), decision.reason, decision.rule),
            (False, status, reason, rule),
        )
        self.assertEqual(decision.checks[-1].name, failed)
        self.assertFalse(decision.checks[-1].passed)
        self.assertTrue(all(c.passed for c in decision.checks[:-1]))
        self.assertIsNone(decision.path)

    def test_allow(self) -> None:
        """An allowed scrape names the allow entry that matched and every check passed."""
        decision = self.decide(query())
        self.assertEqual(
            (
                decision.allowed,
                decision_status(decision),
                decision.reason,
                decision.rule,
                decision.path,
            ),
            (True, 200, "ok", "routes.node.allow: role:scraper", "/metrics"),
        )
        self.assertEqual(
            [(c.name, c.passed) for c in decision.checks],
            [(n, True) for n in ("route", "identity", "allow", "target", "path", "params")],
        )
        self.assertEqual(decision.checks[4].rule, "routes.node.metrics_path: '/metrics'")

    def test_unknown_route(self) -> None:
        """An unknown route is 404 before anything else is looked at."""
        decision = self.decide(query(route="nope"), Recognition(None, "no_credentials"))
        self.assertDecision(decision, 404, NOT_FOUND, "routes: no route 'nope'", "route")

    def test_unrecognised_caller(self) -> None:
        """No identity: 403 with the recognition's own reason."""
        decision = self.decide(query(), Recognition(None, "unknown_identity"))
        self.assertDecision(
            decision,
            403,
            "unknown_identity",
            "identities: caller not recognised (unknown_identity)",
            "identity",
        )

    def test_default_deny(self) -> None:
        """An identity the allow list does not name is refused by the default deny."""
        decision = self.decide(query(), Recognition(OPS, "ok"))
        self.assertDecision(decision, 403, AUTHZ_DENIED, "routes.node.allow: default deny", "allow")

    def test_target_outside_route(self) -> None:
        """A target not in the route is the same 404 as an unknown route."""
        decision = self.decide(query(target="10.0.0.6:9100"))
        self.assertDecision(
            decision, 404, NOT_FOUND, "routes.node.targets: '10.0.0.6:9100' not a member", "target"
        )
        self.assertIs(decision.refusal, self.decide(query(route="nope")).refusal)
        self.assertIs(decision.refusal, Refusal.UNKNOWN)

    def test_path_not_listed(self) -> None:
        """A canonical path the route does not list is 403 path_refused."""
        decision = self.decide(query(path="/debug/pprof"))
        self.assertDecision(
            decision, 403, PATH_REFUSED, "routes.node.paths: '/debug/pprof' not listed", "path"
        )
        self.assertIs(decision.refusal, Refusal.FORBIDDEN)

    def test_path_trick(self) -> None:
        """A path trick is 400 path_refused, decided by normalisation, never matched."""
        decision = self.decide(query(path="/metrics/../debug/pprof"))
        self.assertDecision(decision, 400, PATH_REFUSED, "path normalisation: '..' segment", "path")
        self.assertIs(decision.refusal, Refusal.MALFORMED)

    def test_trick_of_a_listed_path(self) -> None:
        """Tricks that would land on an allowed path are refused all the same."""
        for path in ("/metrics/extra/../extra", "/metrics//extra", "/metrics%2fextra",
                     "/metrics/./extra", "/metrics;x", "metrics"):  # fmt: skip
            decision = self.decide(query(path=path))
            self.assertEqual(
                (decision_status(decision), decision.reason), (400, PATH_REFUSED), path
            )

    def test_normalised_path_is_the_upstream_path(self) -> None:
        """The path in an allow is the canonical one, the string sent upstream."""
        self.assertEqual(self.decide(query(path="/metrics/extr%61")).path, "/metrics/extra")
        self.assertEqual(self.decide(query(path="/caf%c3%a9")).path, "/caf%C3%A9")

    def test_param_not_listed(self) -> None:
        """A further parameter the route does not pass is 400 param_refused."""
        decision = self.decide(query(params=(("debug", "1"),)))
        self.assertDecision(
            decision, 400, PARAM_REFUSED, "routes.node.params: 'debug' not listed", "params"
        )

    def test_params_listed(self) -> None:
        """Listed parameters pass, in the order given."""
        decision = self.decide(query("blackbox", "127.0.0.1:9115", params=(("module", "x"),)))
        self.assertEqual(
            (decision.allowed, decision.rule), (True, "routes.blackbox.allow: prometheus")
        )
        self.assertEqual((decision.path, decision.params), ("/probe", (("module", "x"),)))

    def test_order(self) -> None:
        """With everything wrong, the earliest check answers: target before path before
        params, and authorisation before the target."""
        everything = query(target="x:1", path="/../x", params=(("a", "b"),))
        self.assertEqual(self.decide(everything).checks[-1].name, "target")
        self.assertEqual(self.decide(everything, Recognition(OPS, "ok")).checks[-1].name, "allow")
        self.assertEqual(
            decision_status(self.decide(query(path="/../x", params=(("a", "b"),)))), 400
        )
        self.assertEqual(
            self.decide(query(path="/../x", params=(("a", "b"),))).checks[-1].name, "path"
        )

    def test_visible_routes(self) -> None:
        """/sd lists exactly the routes whose allow admits the identity."""
        self.assertEqual(
            [r.name for r in self.policy.visible_routes(SCRAPER)], ["node", "blackbox"]
        )
        self.assertEqual(self.policy.visible_routes(OPS), [])


class QueryTests(SynchronousTestCase):
    """parse_scrape_query: strict decoding, each refusal a 400 bad_request with its rule."""

    def test_refusals(self) -> None:
        """Malformed, repeated and missing parameters are refused, each with its rule."""
        for raw, rule in (
            (b"route=a&target=\xff", "query string: malformed"),
            (b"route=a&target=b&route=c", "query string: 'route' given twice"),
            (b"route=a", "query string: route and target are required"),
        ):
            decision = parse_scrape_query(raw)
            assert isinstance(decision, Decision)
            self.assertEqual(
                (decision_status(decision), decision.reason, decision.rule),
                (400, BAD_REQUEST, rule),
            )
            self.assertEqual(decision.checks[-1].name, "query")

    def test_path_decoded_once(self) -> None:
        """path= is query-decoded once; what that yields is what gets normalised."""
        parsed = parse_scrape_query(b"route=a&target=b&path=%2Fm%252e")
        assert isinstance(parsed, ScrapeQuery)
        self.assertEqual(parsed.path, "/m%2e")

    @given(st.binary(max_size=60))
    def test_reasons_are_one_vocabulary(self, raw: bytes) -> None:
        """Whatever the query, every refusal's reason is one of the policy reasons."""
        parsed = parse_scrape_query(b"route=node&target=10.0.0.5%3A9100&" + raw)
        if isinstance(parsed, Decision):
            self.assertIn(parsed.reason, POLICY_REASONS)
            return
        decision = ScrapePolicy(ROUTES).decide(RECOGNISED, parsed)
        self.assertIn(decision.reason, POLICY_REASONS | {"ok"})
        if decision.allowed:
            self.assertIn(decision.path, ROUTES["node"].paths)


class ConfiguredPathTests(SynchronousTestCase):
    """Configured paths are held to the canonical form requests are compared in."""

    def load(self, paths: str) -> list[str]:
        root = Path(self.mktemp())
        TestPKI(root / "pki")
        (root / "p.yaml").write_text(
            textwrap.dedent(
                f"""\
                tls: {{certificate: pki/gate.pem, key: pki/gate-key.pem, client_ca: pki/ca.pem}}
                listeners: [{{name: s, protocol: http, endpoint: "tcp:9443"}}]
                identities: {{ops: {{cert: {{cn: ops}}}}}}
                routes:
                  r:
                    allow: [ops]
                    targets: {{static: ["a:1"]}}
                    paths: {paths}
                audit: {{path: audit.jsonl, key_file: pki/audit.key}}
                """
            )
        )
        _, errors, _ = check_config(root / "p.yaml")
        return [str(e).split(": ", 2)[-1] for e in errors]

    def test_canonical_accepted(self) -> None:
        """Canonical paths, with escapes of non-unreserved characters, are accepted."""
        self.assertEqual(self.load('["/caf%C3%A9", "/a/", "/x:y@z"]'), [])

    def test_not_canonical(self) -> None:
        """A path that normalises to something else is an error naming the canonical form."""
        self.assertEqual(
            self.load('["/caf%c3%a9", "/%7Ex"]'),
            [
                "must be an absolute path in canonical form: write '/caf%C3%A9'",
                "must be an absolute path in canonical form: write '/~x'",
            ],
        )

    def test_refused(self) -> None:
        """A path the normaliser refuses is an error with the normaliser's reason."""
        self.assertEqual(
            self.load('["/a/../b", "/a%2e", "/a%25"]'),
            [
                "must be an absolute path in canonical form: '..' segment",
                "must be an absolute path in canonical form: encoded '.' (%2E)",
                "must be an absolute path in canonical form: encoded '%' (%25, double encoding)",
            ],
        )


GATEWAY_TOKEN = "prometheus-token-policy"
GATEWAY_SCRAPE = "/scrape?route=node&target=10.0.0.5%3A9100"
UPSTREAM_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: 10.0.0.5:9100\r\n\r\n"


def gateway_config() -> Config:
    """A plain-text scrape listener whose prometheus identity holds a bearer token."""
    prometheus = Identity(
        "prometheus",
        roles=frozenset({"scraper"}),
        bearer_sha256=(hashlib.sha256(GATEWAY_TOKEN.encode()).digest(),),
    )
    routes = {
        "node": Route(
            "node", (NODE,), paths=("/metrics", "/metrics/extra"), allow=("role:scraper",)
        ),
        "admin": Route("admin", (Target("127.0.0.1:9099"),), allow=("ops",)),
    }
    return Config(
        source=Path("promgate.yaml"),
        listeners=(Listener("scrape", "http", "tcp:9443", None),),
        identities={"prometheus": prometheus, "ops": OPS},
        routes=routes,
        admin=Admin(),
        audit=Audit(Path("audit.jsonl"), Path("audit.key")),
    )


class GatewayPathTests(SynchronousTestCase):
    """At the gateway: a path trick is 400 and reaches no upstream; an unlisted path is 403;
    a listed one is relayed; the audit record names the rule that decided."""

    def setUp(self) -> None:
        self.gw = MemoryGateway(gateway_config())
        self.exporter = self.gw.upstream("10.0.0.5:9100", body=b"up 1\n")

    def scrape(self, target: str) -> Response:
        return self.gw.get(target, identity=Bearer(GATEWAY_TOKEN))

    def requests(self) -> list[AuditEvent]:
        return self.gw.audit_records("request")

    def assertRefused(self, response: Response, status: int, reason: str, route: str) -> None:
        """Refused with ``status``, audited as a deny with ``reason``; no upstream."""
        self.assertEqual(response.status, status)
        (event,) = self.requests()
        self.assertEqual(
            (event.decision, event.reason, event.status, event.route),
            ("deny", reason, status, route),
        )
        self.assertEqual(self.exporter.connections, 0)
        self.assertEqual(self.gw.service.limiter.in_flight(route), 0)

    def test_trick_refused_before_upstream(self) -> None:
        """path=/metrics/../debug/pprof is 400 path_refused; nothing goes upstream."""
        response = self.scrape(GATEWAY_SCRAPE + "&path=%2Fmetrics%2F..%2Fdebug%2Fpprof")
        self.assertRefused(response, 400, "path_refused", route="node")
        (event,) = self.requests()
        self.assertEqual(event.detail, "path normalisation: '..' segment")
        self.assertEqual(self.exporter.requests, [])

    def test_unlisted_path_refused(self) -> None:
        """path=/debug/pprof, canonical but not on the route, is 403 path_refused."""
        response = self.scrape(GATEWAY_SCRAPE + "&path=%2Fdebug%2Fpprof")
        self.assertRefused(response, 403, "path_refused", route="node")
        self.assertEqual(self.requests()[0].detail, "routes.node.paths: '/debug/pprof' not listed")

    def test_listed_path_relayed(self) -> None:
        """path=/metrics on the same route goes upstream, as exactly that path."""
        self.assertEqual(self.scrape(GATEWAY_SCRAPE + "&path=%2Fmetrics").status, 200)
        (request,) = self.exporter.requests
        self.assertEqual(request.raw, UPSTREAM_REQUEST)

    def test_canonical_path_relayed(self) -> None:
        """An escaped spelling of a listed path is relayed in its canonical spelling."""
        self.scrape(GATEWAY_SCRAPE + "&path=%2Fmetrics%2Fextr%2561")
        (request,) = self.exporter.requests
        self.assertTrue(request.raw.startswith(b"GET /metrics/extra HTTP/1.1\r\n"))

    def test_denials_name_their_rule(self) -> None:
        """Every policy refusal's audit record carries the deciding rule in detail."""
        for target, rule in (
            ("/scrape?route=nope&target=a%3A1", "routes: no route 'nope'"),
            ("/scrape?route=admin&target=127.0.0.1%3A9099", "routes.admin.allow: default deny"),
            ("/scrape?route=node&target=a%3A1", "routes.node.targets: 'a:1' not a member"),
            (GATEWAY_SCRAPE + "&x=1", "routes.node.params: 'x' not listed"),
            ("/scrape?route=node", "query string: route and target are required"),
        ):
            self.gw.audit.events.clear()
            self.scrape(target)
            self.assertEqual(self.requests()[0].detail, rule)
