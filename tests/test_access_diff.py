"""Tests for ``promgate diff`` and ``promgate.access_diff``: every request whose decision a
configuration change flips is listed, with the rule deciding each side, on every listener
kind; nothing else is; the command's exit codes and JSON shape."""

from __future__ import annotations

import contextlib
import io
import json
import textwrap
from pathlib import Path
from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from promgate import access_diff as access_diff_module
from promgate import cli
from promgate.access_diff import AccessDiff, Change, Request, access_diff
from promgate.config.loader import load_config
from promgate.config.model import Config
from promgate.testing import TestPKI

BASE = """\
tls: {certificate: pki/gate.pem, key: pki/gate-key.pem, client_ca: pki/ca.pem}
listeners:
  - {name: scrape, protocol: http, endpoint: "tcp:9443"}
  - {name: egress, protocol: forward, endpoint: "tcp:3128"}
  - {name: raw, protocol: tcp, endpoint: "tcp:9101", route: node, target: "10.0.0.5:9100"}
  - name: pass
    protocol: tcp
    endpoint: "tcp:9102"
    mode: passthrough
    sni: {web.example.org: web}
identities:
  prometheus: {cert: {uri: "spiffe://promgate.local/prometheus"}, roles: [scraper]}
  ops: {cert: {cn: ops}, roles: [admin]}
routes:
  node:
    listeners: [scrape, egress, raw]
    paths: [/metrics, /metrics/extra]
    allow: ["role:scraper"]
    targets: {static: ["10.0.0.5:9100", "10.0.0.6:9100"]}
  blackbox:
    scheme: https
    metrics_path: /probe
    allow: [prometheus, ops]
    targets: {static: ["127.0.0.1:9115"]}
  web:
    scheme: https
    allow: ["sni:web.example.org"]
    targets: {static: ["10.0.1.1:443"]}
audit: {path: audit.jsonl, key_file: pki/audit.key}
"""


def run(*argv: str) -> tuple[int, str, str]:
    """``promgate ARGV...`` in process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def keys(diff: AccessDiff) -> set[tuple[str, str, str | None, str]]:
    """Each change as (+/-, listener, identity, request text)."""
    return {
        ("+" if c.granted else "-", c.listener, c.identity, c.request.text()) for c in diff.changes
    }


def scrape(route: str, target: str, path: str) -> str:
    return Request("scrape", route, target, path).text()


class DiffTestCase(SynchronousTestCase):
    """A directory with a test PKI, where configurations are written and loaded."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        TestPKI(self.dir / "pki")
        self.count = 0

    def write(self, text: str) -> Path:
        self.count += 1
        path = self.dir / f"promgate-{self.count}.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    def load(self, text: str) -> Config:
        return load_config(self.write(text))

    def diff(self, new: str, old: str = BASE) -> AccessDiff:
        return access_diff(self.load(old), self.load(new))


class UnchangedTests(DiffTestCase):
    """The same access on both sides: no changes, every entry still counted."""

    def test_identical(self) -> None:
        diff = self.diff(BASE)
        self.assertEqual(diff.changes, ())
        self.assertFalse(diff.changed)
        self.assertEqual(diff.listeners, ("egress", "pass", "raw", "scrape"))
        # scrape: 2 identities x (node: 2 targets x 2 paths + sd, blackbox: 1 + sd) = 14;
        # egress: 2 x (2 targets x 2 paths + 1 CONNECT) = 10; raw: 2 x 1; pass: 2 names.
        self.assertEqual(diff.compared, 14 + 10 + 2 + 2)

    def test_credentials_and_settings_are_not_access(self) -> None:
        """A new certificate name for an identity, or a route's timeout, changes no
        decision (who may present which credential is not a policy question)."""
        new = BASE.replace("cn: ops", "cn: operations").replace(
            "  blackbox:\n", "  blackbox:\n    timeout: 5s\n"
        )
        diff = self.diff(new)
        self.assertEqual(diff.changes, ())
        self.assertEqual(diff.compared, 28)


class IdentityTests(DiffTestCase):
    """Identities added, removed, or given other roles."""

    def test_added_identity(self) -> None:
        """An added identity with access is newly allowed everywhere it may go."""
        new = BASE.replace(
            "identities:\n", "identities:\n  agent: {cert: {cn: agent}, roles: [scraper]}\n"
        )
        diff = self.diff(new)
        self.assertTrue(all(c.granted and c.identity == "agent" for c in diff.changes))
        self.assertEqual(
            keys(diff),
            {
                ("+", "scrape", "agent", scrape("node", t, p))
                for t in ("10.0.0.5:9100", "10.0.0.6:9100")
                for p in ("/metrics", "/metrics/extra")
            }
            | {("+", "scrape", "agent", "/sd")}
            | {
                ("+", "egress", "agent", f"http://{t}{p}")
                for t in ("10.0.0.5:9100", "10.0.0.6:9100")
                for p in ("/metrics", "/metrics/extra")
            }
            | {("+", "raw", "agent", "")},
        )
        first = diff.changes[0]
        self.assertEqual(first.old.rule, "identities: no identity 'agent'")
        self.assertEqual(first.old.reason, "unknown_identity")
        self.assertEqual(first.new.rule, "routes.node.allow: role:scraper")

    def test_removed_identity(self) -> None:
        """A removed identity loses everything it had; the passthrough listener, which
        sees no identity, is unaffected."""
        new = BASE.replace(
            '  prometheus: {cert: {uri: "spiffe://promgate.local/prometheus"}, roles: [scraper]}\n',
            "",
        ).replace("allow: [prometheus, ops]", "allow: [ops]")
        diff = self.diff(new)
        self.assertEqual(diff.granted, 0)
        self.assertEqual({c.identity for c in diff.changes}, {"prometheus"})
        # node: 4 scrapes + sd, blackbox: 1 scrape + sd; egress: 4 GETs + 1 CONNECT; raw.
        self.assertEqual(diff.revoked, 7 + 5 + 1)
        connect = [c for c in diff.changes if c.request.kind == "connect"]
        self.assertEqual(connect[0].old.rule, "routes.blackbox.allow: prometheus")
        self.assertEqual(connect[0].new.rule, "identities: no identity 'prometheus'")
        self.assertNotIn("pass", {c.listener for c in diff.changes})

    def test_role_change(self) -> None:
        """ops gains the scraper role: newly allowed on node on every listener serving it."""
        diff = self.diff(BASE.replace("roles: [admin]", "roles: [admin, scraper]"))
        self.assertEqual(diff.revoked, 0)
        self.assertEqual({c.identity for c in diff.changes}, {"ops"})
        self.assertEqual({c.listener for c in diff.changes}, {"scrape", "egress", "raw"})
        self.assertEqual(diff.granted, 5 + 4 + 1)
        sd = next(c for c in diff.changes if c.request.kind == "sd")
        self.assertEqual(sd.request.route, "node")
        self.assertEqual(
            (sd.old.rule, sd.new.rule),
            ("routes.node.allow: default deny", "routes.node.allow: role:scraper"),
        )


class RouteTests(DiffTestCase):
    """Changes to a route's allow list, paths and targets."""

    def test_allow_change(self) -> None:
        """blackbox no longer allows ops: its scrape, /sd listing and CONNECT are revoked."""
        diff = self.diff(BASE.replace("allow: [prometheus, ops]", "allow: [prometheus]"))
        self.assertEqual(
            keys(diff),
            {
                ("-", "scrape", "ops", scrape("blackbox", "127.0.0.1:9115", "/probe")),
                ("-", "scrape", "ops", "/sd"),
                ("-", "egress", "ops", "CONNECT 127.0.0.1:9115"),
            },
        )
        change = diff.changes[0]
        self.assertEqual(change.listener, "egress")
        self.assertEqual(change.old.verdict(), "allow 200 ok")
        self.assertEqual(change.new.verdict(), "deny 403 authz_denied")
        self.assertEqual(change.new.rule, "routes blackbox: allow: default deny")

    def test_path_added(self) -> None:
        """A path added is newly allowed for those the route allows, and only for them;
        the allowing side names the path check the other side failed."""
        diff = self.diff(BASE.replace("/metrics/extra]", "/metrics/extra, /debug/vars]"))
        targets = ("10.0.0.5:9100", "10.0.0.6:9100")
        self.assertEqual(
            keys(diff),
            {("+", "scrape", "prometheus", scrape("node", t, "/debug/vars")) for t in targets}
            | {("+", "egress", "prometheus", f"http://{t}/debug/vars") for t in targets},
        )
        change = next(c for c in diff.changes if c.listener == "scrape")
        self.assertEqual(change.old.verdict(), "deny 403 path_refused")
        self.assertEqual(change.old.rule, "routes.node.paths: '/debug/vars' not listed")
        self.assertEqual(
            change.why(change.new),
            "routes.node.allow: role:scraper; path: routes.node.paths: '/debug/vars' is listed",
        )
        self.assertEqual(change.why(change.old), change.old.rule)

    def test_target_added_and_removed(self) -> None:
        diff = self.diff(BASE.replace('"10.0.0.6:9100"', '"10.0.0.7:9100"'))
        paths = ("/metrics", "/metrics/extra")
        self.assertEqual(
            keys(diff),
            {("-", "scrape", "prometheus", scrape("node", "10.0.0.6:9100", p)) for p in paths}
            | {("+", "scrape", "prometheus", scrape("node", "10.0.0.7:9100", p)) for p in paths}
            | {("-", "egress", "prometheus", f"http://10.0.0.6:9100{p}") for p in paths}
            | {("+", "egress", "prometheus", f"http://10.0.0.7:9100{p}") for p in paths},
        )
        gone = next(c for c in diff.changes if c.listener == "scrape" and not c.granted)
        self.assertEqual(gone.new.verdict(), "deny 404 not_found")
        self.assertEqual(gone.new.rule, "routes.node.targets: '10.0.0.6:9100' not a member")
        gone = next(c for c in diff.changes if c.listener == "egress" and not c.granted)
        self.assertEqual(gone.new.rule, "routes: no http route has target '10.0.0.6:9100'")

    def test_route_removed(self) -> None:
        """A removed route is an unknown route to every listener that served it."""
        new = BASE.replace(
            """  blackbox:
    scheme: https
    metrics_path: /probe
    allow: [prometheus, ops]
    targets: {static: ["127.0.0.1:9115"]}
""",
            "",
        )
        diff = self.diff(new)
        self.assertEqual(diff.granted, 0)
        self.assertEqual(diff.revoked, 2 * 3)  # scrape, /sd and CONNECT for both
        sd = next(c for c in diff.changes if c.request.kind == "sd")
        self.assertEqual(sd.new.rule, "routes: no route 'blackbox'")

    def test_route_moves_between_listeners(self) -> None:
        """A route a listener no longer serves is an unknown route to it."""
        diff = self.diff(BASE.replace("listeners: [scrape, egress, raw]", "listeners: [raw]"))
        self.assertEqual(diff.granted, 0)
        self.assertEqual({c.listener for c in diff.changes}, {"scrape", "egress"})
        self.assertEqual({c.identity for c in diff.changes}, {"prometheus"})
        change = next(c for c in diff.changes if c.listener == "scrape")
        self.assertEqual(change.new.rule, "routes: no route 'node'")


class ListenerTests(DiffTestCase):
    """Listeners added or removed, and the forward and tcp kinds."""

    def test_listener_added_and_removed(self) -> None:
        new = BASE.replace(
            '  - {name: egress, protocol: forward, endpoint: "tcp:3128"}\n',
            '  - {name: egress2, protocol: forward, endpoint: "tcp:3129"}\n',
        ).replace("[scrape, egress, raw]", "[scrape, egress2, raw]")
        diff = self.diff(new)
        self.assertEqual(diff.listeners, ("egress", "egress2", "pass", "raw", "scrape"))
        self.assertEqual({c.listener for c in diff.changes if c.granted}, {"egress2"})
        self.assertEqual({c.listener for c in diff.changes if not c.granted}, {"egress"})
        removed = next(c for c in diff.changes if c.listener == "egress")
        self.assertEqual(removed.new.rule, "listeners: no listener 'egress'")
        self.assertIsNone(removed.new.status)
        # Both allowed identities lose and gain the same: 4 GETs (prometheus), CONNECT (both).
        self.assertEqual((diff.granted, diff.revoked), (6, 6))

    def test_forward_scheme_change(self) -> None:
        """node becomes https: GETs are revoked, CONNECTs granted (a tunnel to a plain
        target would bypass the route's paths); the scrape listener sees no change."""
        new = BASE.replace("  node:\n", "  node:\n    scheme: https\n")
        diff = self.diff(new)
        changed = {c.listener for c in diff.changes}
        self.assertEqual(changed, {"egress"})
        self.assertEqual(
            keys(diff),
            {
                ("-", "egress", "prometheus", f"http://{t}{p}")
                for t in ("10.0.0.5:9100", "10.0.0.6:9100")
                for p in ("/metrics", "/metrics/extra")
            }
            | {
                ("+", "egress", "prometheus", f"CONNECT {t}")
                for t in ("10.0.0.5:9100", "10.0.0.6:9100")
            },
        )
        connect = next(c for c in diff.changes if c.request.kind == "connect")
        self.assertEqual(connect.old.rule, "routes: no https route has target '10.0.0.5:9100'")
        self.assertEqual(connect.new.route, "node")

    def test_tcp_terminate_allow_change(self) -> None:
        """The raw listener judges the caller: ops newly allowed by name."""
        diff = self.diff(
            BASE.replace('allow: ["role:scraper"]', 'allow: ["role:scraper", ops]'),
        )
        raw = [c for c in diff.changes if c.listener == "raw"]
        self.assertEqual(len(raw), 1)
        self.assertEqual(raw[0].identity, "ops")
        self.assertEqual(raw[0].request.describe(), "connection without server name")
        self.assertEqual(raw[0].new.verdict(), "allow ok")
        self.assertEqual(raw[0].new.rule, "routes.node.allow: ops")

    def test_passthrough_server_names(self) -> None:
        """A passthrough listener's connections carry no identity: one entry per server
        name, whoever the identities are."""
        new = BASE.replace(
            "sni: {web.example.org: web}",
            "sni: {web.example.org: web, '*.web.example.org': web}",
        ).replace('allow: ["sni:web.example.org"]', 'allow: ["sni:*.web.example.org"]')
        diff = self.diff(new)
        self.assertEqual(
            keys(diff),
            {
                ("-", "pass", None, "web.example.org"),
                ("+", "pass", None, "*.web.example.org"),
            },
        )
        granted = next(c for c in diff.changes if c.granted)
        self.assertEqual(granted.old.verdict(), "deny unknown_server_name")
        self.assertEqual(granted.new.rule, "routes.web.allow: sni:*.web.example.org")
        self.assertIn(
            "(no identity) connection for server name *.web.example.org", granted.describe()
        )

    def test_listener_changes_kind(self) -> None:
        """A listener that changes protocol under the same name: the old kind's requests
        are refused by the new listener, the new kind's granted."""
        new = BASE.replace(
            '{name: egress, protocol: forward, endpoint: "tcp:3128"}',
            '{name: egress, protocol: http, endpoint: "tcp:3128"}',
        )
        diff = self.diff(new)
        gets = [c for c in diff.changes if c.listener == "egress" and c.request.kind == "get"]
        self.assertTrue(gets)
        self.assertTrue(all(not c.granted for c in gets))
        self.assertEqual(
            gets[0].new.rule, "listeners.egress: a http listener takes no such request"
        )
        self.assertIn(
            ("+", "egress", "prometheus", scrape("node", "10.0.0.5:9100", "/metrics")), keys(diff)
        )


class SummaryTests(DiffTestCase):
    """The summary a reload puts in its audit record, and the values' shape."""

    def test_summary(self) -> None:
        diff = self.diff(BASE.replace("allow: [prometheus, ops]", "allow: [prometheus]"))
        summary = diff.summary(limit=2)
        self.assertEqual(
            summary,
            {
                "granted": 0,
                "revoked": 3,
                "compared": 28,
                "changes": [
                    "- egress ops CONNECT 127.0.0.1:9115: routes.blackbox.allow: ops -> "
                    "routes blackbox: allow: default deny",
                    "- scrape ops route blackbox target 127.0.0.1:9115 path /probe: "
                    "routes.blackbox.allow: ops -> routes.blackbox.allow: default deny",
                ],
                "more": 1,
            },
        )
        json.dumps(summary)  # fit for an audit record
        self.assertEqual(diff.summary(limit=0)["changes"], [])
        self.assertEqual(diff.summary(limit=0)["more"], 3)

    def test_limit(self) -> None:
        """With a limit, every change is counted and the first ones are listed: the same
        as the first ones of the whole list."""
        old = self.load(BASE)
        new = self.load(BASE.replace("roles: [admin]", "roles: [admin, scraper]"))
        whole = access_diff(old, new)
        for limit in (0, 1, 3, 7, 100):
            part = access_diff(old, new, limit=limit)
            self.assertEqual(part.changes, whole.changes[:limit])
            self.assertEqual((part.granted, part.revoked), (whole.granted, whole.revoked))
            self.assertEqual(part.compared, whole.compared)
            if limit >= 2:
                self.assertEqual(part.summary(limit=2), whole.summary(limit=2))
        self.assertEqual(whole.total, len(whole.changes))
        self.assertEqual(whole.total, 10)

    def test_values_are_frozen(self) -> None:
        diff = self.diff(BASE.replace("allow: [prometheus, ops]", "allow: [prometheus]"))
        change: Change = diff.changes[0]
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, diff, "compared", 0)
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, change, "listener", "x")
        self.assertRaises(ValueError, Request, "bogus")

    def test_product_is_counted_and_only_changes_asked(self) -> None:
        """Many identities and targets: every entry is counted, but only the changed
        route's requests (and the tcp listeners') are put to the policies, once per
        class of callers the route treats alike."""
        identities = "".join(
            f"  id{i}: {{cert: {{cn: id{i}}}, roles: [scraper]}}\n" for i in range(40)
        )
        targets = ", ".join(
            ['"10.0.0.5:9100"'] + [f'"10.1.{i // 200}.{i % 200}:9100"' for i in range(299)]
        )
        old = BASE.replace("identities:\n", "identities:\n" + identities).replace(
            '"10.0.0.5:9100", "10.0.0.6:9100"', targets
        )
        new = old.replace("allow: [prometheus, ops]", "allow: [ops]")
        asked = []
        decide = access_diff_module._View.decide

        def counting(view: Any, identity: str | None, request: Request) -> Any:
            asked.append(request)
            return decide(view, identity, request)

        self.patch(access_diff_module._View, "decide", counting)
        diff = self.diff(new, old=old)
        self.assertEqual(
            keys(diff),
            {
                ("-", "scrape", "prometheus", scrape("blackbox", "127.0.0.1:9115", "/probe")),
                ("-", "scrape", "prometheus", "/sd"),
                ("-", "egress", "prometheus", "CONNECT 127.0.0.1:9115"),
            },
        )
        people = 42
        scrape_entries = people * (300 * 2 + 1 + 1 + 1)
        egress_entries = people * (300 * 2 + 1)
        self.assertEqual(diff.compared, scrape_entries + egress_entries + people + 2)
        # On both sides: blackbox's scrape and /sd listing and its CONNECT, once for
        # prometheus (allowed, then not) and once for ops (allowed on both sides); nothing
        # for the 40 it never admits; raw's connection for everyone; pass's two names.
        self.assertEqual(len(asked), 2 * (2 * (2 + 1) + people + 2))


class CommandTests(DiffTestCase):
    """``promgate diff``: output, exit codes 0/1/2, and --json."""

    def test_unchanged(self) -> None:
        old, new = self.write(BASE), self.write(BASE)
        code, out, err = run("diff", str(old), str(new))
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, "access unchanged: 28 request(s) compared on 4 listener(s)\n")

    def test_changed(self) -> None:
        old = self.write(BASE)
        new = self.write(BASE.replace("allow: [prometheus, ops]", "allow: [prometheus]"))
        code, out, err = run("diff", str(old), str(new))
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(
            out.splitlines(),
            [
                "newly denied: egress as ops: CONNECT 127.0.0.1:9115",
                "  old: allow 200 ok: routes.blackbox.allow: ops",
                "  new: deny 403 authz_denied: routes blackbox: allow: default deny",
                "newly denied: scrape as ops: route blackbox target 127.0.0.1:9115 path /probe",
                "  old: allow 200 ok: routes.blackbox.allow: ops",
                "  new: deny 403 authz_denied: routes.blackbox.allow: default deny",
                "newly denied: scrape as ops: /sd lists route blackbox",
                "  old: allow ok: routes.blackbox.allow: ops",
                "  new: deny authz_denied: routes.blackbox.allow: default deny",
                "access changes: 0 newly allowed, 3 newly denied; "
                "28 request(s) compared on 4 listener(s)",
            ],
        )

    def test_json(self) -> None:
        old = self.write(BASE)
        new = self.write(BASE.replace("/metrics/extra]", "/metrics/extra, /debug/vars]"))
        code, out, err = run("diff", "--json", str(old), str(new))
        self.assertEqual((code, err), (1, ""))
        document = json.loads(out)
        self.assertEqual(
            sorted(document),
            [
                "changed",
                "changes",
                "compared",
                "granted",
                "listeners",
                "new_config",
                "old_config",
                "revoked",
            ],
        )
        self.assertEqual(
            (document["changed"], document["granted"], document["revoked"]), (True, 4, 0)
        )
        self.assertEqual((document["old_config"], document["new_config"]), (str(old), str(new)))
        change = document["changes"][0]
        self.assertEqual(
            {k: v for k, v in change.items() if k not in ("old", "new")},
            {
                "change": "granted",
                "listener": "egress",
                "identity": "prometheus",
                "kind": "get",
                "route": None,
                "target": "10.0.0.5:9100",
                "path": "/debug/vars",
                "server_name": None,
                "request": "http://10.0.0.5:9100/debug/vars",
            },
        )
        self.assertEqual(
            {k: v for k, v in change["old"].items() if k != "checks"},
            {
                "decision": "deny",
                "status": 403,
                "reason": "path_refused",
                "rule": "routes node: '/debug/vars' not listed in paths",
                "route": "node",
            },
        )
        self.assertEqual(change["new"]["decision"], "allow")
        self.assertEqual(
            change["old"]["checks"][-1],
            {
                "check": "path",
                "passed": False,
                "rule": "routes node: '/debug/vars' not listed in paths",
            },
        )
        code, out, _ = run("diff", "--json", str(old), str(old))
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out)["changes"], [])

    def test_request_is_what_explain_takes(self) -> None:
        """Each change's request, asked of ``promgate explain`` on the new configuration,
        gets the new side's answer."""
        old = self.write(BASE)
        new = self.write(
            BASE.replace("roles: [admin]", "roles: [admin, scraper]").replace(
                "allow: [prometheus, ops]", "allow: [prometheus]"
            )
        )
        diff = access_diff(load_config(old), load_config(new))
        self.assertTrue(diff.changes)
        for change in diff.changes:
            assert change.identity is not None
            code, out, err = run(
                "explain",
                "--config",
                str(new),
                "--as",
                change.identity,
                "--listener",
                change.listener,
                change.request.text(),
            )
            if change.request.kind == "sd":
                continue  # /sd answers 200 and lists routes
            self.assertEqual((code, err), (0 if change.granted else 1, ""), change)
            self.assertTrue(out.startswith(change.new.verdict() + "\n"), (out, change))

    def test_unusable(self) -> None:
        """An invalid or missing configuration: errors as check-config prints them, exit 2."""
        good = self.write(BASE)
        bad = self.write(BASE.replace("allow: [prometheus, ops]", "allow: [prometheus, nobody]"))
        code, out, err = run("diff", str(good), str(bad))
        self.assertEqual((code, out), (2, ""))
        self.assertIn(f"{bad}:", err)
        self.assertIn("configuration is NOT valid", err)
        code, out, err = run("diff", str(self.dir / "missing.yaml"), str(good))
        self.assertEqual((code, out), (2, ""))
        self.assertIn("missing.yaml", err)
        with contextlib.redirect_stderr(io.StringIO()):
            self.assertRaises(SystemExit, cli.main, ["diff", str(good)])
