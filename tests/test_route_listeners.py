"""Which listeners serve a route: one rule for /scrape, /sd, the forward proxy and tcp."""

from __future__ import annotations

import textwrap
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from promgate.config.loader import check_config
from promgate.config.model import Config
from promgate.http.refusals import decision_status
from promgate.identity import Recognition
from promgate.policy import ScrapePolicy, ScrapeQuery
from promgate.testing import TestPKI

HEAD = """\
tls: {certificate: pki/gate.pem, key: pki/gate-key.pem, client_ca: pki/ca.pem}
admin: {endpoint: "tcp:0:interface=127.0.0.1"}
identities:
  prometheus: {cert: {cn: prometheus}}
audit: {path: audit.jsonl, key_file: pki/audit.key}
"""

LISTENERS = """\
listeners:
  - {name: scrape, protocol: http, endpoint: "tcp:0"}
  - {name: egress, protocol: forward, endpoint: "tcp:0"}
  - {name: raw, protocol: tcp, endpoint: "tcp:0", route: proxied, target: "127.0.0.1:9101"}
"""


class RouteListenersTests(SynchronousTestCase):
    """The rule, and check-config's reports about it."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        TestPKI(self.dir / "pki")
        self.main = self.dir / "promgate.yaml"

    def load(self, listeners: str, routes: str) -> tuple[Config | None, list[str], list[str]]:
        self.main.write_text(HEAD + listeners + textwrap.dedent(routes))
        config, errors, warnings = check_config(self.main)
        return config, [str(e) for e in errors], [str(w) for w in warnings]

    def served(self, config: Config) -> dict[str, list[str]]:
        return {li.name: sorted(config.routes_of(li.name)) for li in config.listeners}

    def test_default_rule(self) -> None:
        """A route a tcp listener names is that listener's alone; the rest are served by
        every http and forward listener."""
        config, errors, _ = self.load(
            LISTENERS,
            """\
            routes:
              node: {allow: [prometheus], targets: {static: ["127.0.0.1:9100"]}}
              proxied: {allow: [prometheus], targets: {static: ["127.0.0.1:9101"]}}
            """,
        )
        self.assertEqual(errors, [])
        assert config is not None
        self.assertEqual(
            self.served(config), {"scrape": ["node"], "egress": ["node"], "raw": ["proxied"]}
        )

    def test_explicit_listeners(self) -> None:
        """``listeners:`` on a route decides, for http listeners and tcp ones alike."""
        config, errors, _ = self.load(
            LISTENERS,
            """\
            routes:
              node: {allow: [prometheus], listeners: [scrape], targets: {static: ["h:1"]}}
              proxied:
                allow: [prometheus]
                listeners: [raw, scrape]
                targets: {static: ["127.0.0.1:9101"]}
            """,
        )
        self.assertEqual(errors, [])
        assert config is not None
        self.assertEqual(
            self.served(config),
            {"scrape": ["node", "proxied"], "egress": [], "raw": ["proxied"]},
        )

    def test_unserved_route_is_unknown(self) -> None:
        """To a listener that does not serve it, a route does not exist: the scrape policy
        built from that listener's routes answers as for an unknown route."""
        config, _, _ = self.load(
            LISTENERS,
            """\
            routes:
              proxied: {allow: [prometheus], targets: {static: ["127.0.0.1:9101"]}}
            """,
        )
        assert config is not None
        policy = ScrapePolicy(config.routes_of("scrape"))
        identity = config.identities["prometheus"]
        self.assertEqual(policy.visible_routes(identity), [])
        who = Recognition(identity, "ok")
        unknown = policy.decide(who, ScrapeQuery("nope", "127.0.0.1:9101", None, ()))
        hidden = policy.decide(who, ScrapeQuery("proxied", "127.0.0.1:9101", None, ()))
        self.assertEqual(
            (decision_status(hidden), hidden.reason), (decision_status(unknown), unknown.reason)
        )
        self.assertEqual(decision_status(hidden), 404)

    def test_unknown_listener(self) -> None:
        """A ``listeners:`` entry naming no listener is an error at that key."""
        _, errors, _ = self.load(
            LISTENERS,
            """\
            routes:
              node: {allow: [prometheus], listeners: [nope], targets: {static: ["h:1"]}}
              proxied: {allow: [prometheus], targets: {static: ["127.0.0.1:9101"]}}
            """,
        )
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("routes.node.listeners: unknown listener 'nope'", errors[0])

    def test_tcp_listener_excluded(self) -> None:
        """A tcp listener forwarding to a route whose ``listeners:`` leave it out."""
        _, errors, _ = self.load(
            LISTENERS,
            """\
            routes:
              proxied:
                allow: [prometheus]
                listeners: [scrape]
                targets: {static: ["127.0.0.1:9101"]}
            """,
        )
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("listeners[2]: route 'proxied' leaves this listener out", errors[0])

    def test_tcp_listener_not_forwarding(self) -> None:
        """Naming a tcp listener that does not forward to the route is an error."""
        _, errors, _ = self.load(
            LISTENERS,
            """\
            routes:
              proxied: {allow: [prometheus], targets: {static: ["127.0.0.1:9101"]}}
              node: {allow: [prometheus], listeners: [raw], targets: {static: ["h:1"]}}
            """,
        )
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("tcp listener 'raw' does not forward to this route", errors[0])

    def test_no_listener_serves(self) -> None:
        """With only tcp listeners, a route none of them names is reported."""
        _, errors, warnings = self.load(
            "listeners:\n"
            '  - {name: raw, protocol: tcp, endpoint: "tcp:0", route: a, target: "127.0.0.1:1"}\n',
            """\
            routes:
              a: {allow: [prometheus], targets: {static: ["127.0.0.1:1"]}}
              b: {allow: [prometheus], targets: {static: ["127.0.0.1:2"]}}
            """,
        )
        self.assertEqual(errors, [])
        self.assertTrue(any("routes.b: no listener serves this route" in w for w in warnings))


class SDRouteLabelConfigTests(SynchronousTestCase):
    """``sd: {route_label: ...}`` on http listeners."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        TestPKI(self.dir / "pki")
        self.main = self.dir / "promgate.yaml"

    def load(self, sd: str, labels: str = "{}") -> tuple[Config | None, list[str], list[str]]:
        self.main.write_text(
            HEAD
            + textwrap.dedent(
                f"""\
                listeners:
                  - {{name: scrape, protocol: http, endpoint: "tcp:0", sd: {sd}}}
                routes:
                  a: {{allow: [prometheus], labels: {labels}, targets: {{static: ["h:1"]}}}}
                  b: {{allow: [prometheus], targets: {{static: ["h:1"]}}}}
                """
            )
        )
        config, errors, warnings = check_config(self.main)
        return config, [str(e) for e in errors], [str(w) for w in warnings]

    def test_default_and_custom(self) -> None:
        """The default label is ``route``; another valid name may be chosen."""
        config, errors, _ = self.load("{}")
        assert config is not None, errors
        self.assertEqual(config.listeners[0].sd_route_label, "route")
        config, errors, _ = self.load("{route_label: gate_route}")
        assert config is not None, errors
        self.assertEqual(config.listeners[0].sd_route_label, "gate_route")

    def test_off_warns_on_shared_targets(self) -> None:
        """Turned off, routes sharing a target draw a warning: their label sets collide."""
        config, errors, warnings = self.load("{route_label: null}")
        assert config is not None, errors
        self.assertIsNone(config.listeners[0].sd_route_label)
        self.assertTrue(any("share target h:1" in w for w in warnings), warnings)

    def test_invalid_name(self) -> None:
        """Not a label name, or a reserved ``__`` one: an error at the key."""
        for bad in ("'1x'", "__route", "[a]", "instance", "job"):
            _, errors, _ = self.load(f"{{route_label: {bad}}}")
            self.assertEqual(len(errors), 1, (bad, errors))
            self.assertIn("listeners[0].sd.route_label: ", errors[0])

    def test_route_label_clash(self) -> None:
        """A route's own label of that name is an error: /sd would overwrite it."""
        _, errors, _ = self.load("{}", labels="{route: x}")
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("routes.a.labels: label 'route' is the route label /sd adds", errors[0])
