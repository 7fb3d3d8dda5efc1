"""Tests for ``promgate explain`` and ``promgate test-policy``: what they print, their exit
codes (0 allow/pass, 1 deny/mismatch, 2 unusable input), and the shipped
etc/policy-tests.yaml passing against the shipped example configuration."""

from __future__ import annotations

import contextlib
import io
import shutil
import textwrap
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from promgate import cli
from promgate.pki import init_dev_pki
from promgate.testing import TestPKI

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """\
tls: {certificate: pki/gate.pem, key: pki/gate-key.pem, client_ca: pki/ca.pem}
listeners: [{name: scrape, protocol: http, endpoint: "tcp:9443"}]
identities:
  prometheus: {cert: {uri: "spiffe://promgate.local/prometheus"}, roles: [scraper]}
  ops: {cert: {cn: ops}, roles: [admin]}
routes:
  node:
    paths: [/metrics, /metrics/extra]
    allow: ["role:scraper"]
    limits: {rate: "2/s", burst: 4, per: identity, max_concurrent: 8}
    targets: {static: ["10.0.0.5:9100", "10.0.0.6:9100"]}
  blackbox:
    scheme: https
    metrics_path: /probe
    params: [module]
    allow: [prometheus, ops]
    targets: {static: ["127.0.0.1:9115"]}
audit: {path: audit.jsonl, key_file: pki/audit.key}
"""


def run(*argv: str) -> tuple[int, str, str]:
    """``promgate ARGV...`` in process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


class PolicyCLITestCase(SynchronousTestCase):
    """A directory holding a valid configuration (with its PKI) at ``self.config``."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        TestPKI(self.dir / "pki")
        self.config = self.write("promgate.yaml", CONFIG)

    def write(self, name: str, text: str) -> Path:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    def explain(self, identity: str, url: str) -> tuple[int, str, str]:
        return run("explain", "--config", str(self.config), "--as", identity, url)


class ExplainTests(PolicyCLITestCase):
    """``promgate explain`` prints the gateway's decision, the checks and the deciding rule."""

    def test_allow(self) -> None:
        """An allowed scrape: exit 0, every check, the upstream request and the limits."""
        code, out, err = self.explain(
            "prometheus", "https://gate.example.org:9443/scrape?route=node&target=10.0.0.5%3A9100"
        )
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            out.splitlines(),
            [
                "allow 200 ok",
                "rule: routes.node.allow: role:scraper",
                "  route     pass  routes.node",
                "  identity  pass  identities.prometheus (roles: scraper)",
                "  allow     pass  routes.node.allow: role:scraper",
                "  target    pass  routes.node.targets: '10.0.0.5:9100' is a member",
                "  path      pass  routes.node.metrics_path: '/metrics'",
                "  params    pass  no further parameters",
                "upstream: GET http://10.0.0.5:9100/metrics",
                "limits: routes.node.limits: rate 2/s, burst 4, per identity, max_concurrent 8",
                "not evaluated here: the limiter's current state (429) and the audit log's "
                "health (503)",
            ],
        )

    def test_allow_with_params(self) -> None:
        """A relative URL works; passed parameters appear on the upstream request."""
        code, out, _ = self.explain(
            "ops", "/scrape?route=blackbox&target=127.0.0.1:9115&module=http_2xx"
        )
        self.assertEqual(code, 0)
        self.assertIn("rule: routes.blackbox.allow: ops\n", out)
        self.assertIn("upstream: GET https://127.0.0.1:9115/probe?module=http_2xx\n", out)
        self.assertIn("max_concurrent unlimited", out)
        self.assertIn("rate unlimited", out)

    def test_default_deny(self) -> None:
        """An identity the route does not allow: exit 1, 403 and the default deny."""
        code, out, _ = self.explain("ops", "/scrape?route=node&target=10.0.0.5%3A9100")
        self.assertEqual(code, 1)
        self.assertEqual(
            out.splitlines(),
            [
                "deny 403 authz_denied",
                "rule: routes.node.allow: default deny",
                "  route     pass  routes.node",
                "  identity  pass  identities.ops (roles: admin)",
                "  allow     FAIL  routes.node.allow: default deny",
            ],
        )

    def test_denials(self) -> None:
        """Each refusal prints its status, reason and rule, and exits 1."""
        for url, first, rule in (
            ("/scrape?route=nope&target=a%3A1", "deny 404 not_found", "routes: no route 'nope'"),
            (
                "/scrape?route=node&target=10.0.0.7%3A9100",
                "deny 404 not_found",
                "routes.node.targets: '10.0.0.7:9100' not a member",
            ),
            (
                "/scrape?route=node&target=10.0.0.5%3A9100&path=%2Fdebug%2Fpprof",
                "deny 403 path_refused",
                "routes.node.paths: '/debug/pprof' not listed",
            ),
            (
                "/scrape?route=node&target=10.0.0.5%3A9100&path=/metrics/../debug/pprof",
                "deny 400 path_refused",
                "path normalisation: '..' segment",
            ),
            (
                "/scrape?route=node&target=10.0.0.5%3A9100&module=x",
                "deny 400 param_refused",
                "routes.node.params: 'module' not listed",
            ),
            (
                "/scrape?route=node",
                "deny 400 bad_request",
                "query string: route and target are required",
            ),
            ("/metrics", "deny 404 not_found", "listener: '/metrics' is neither /scrape nor /sd"),
        ):  # fmt: skip
            code, out, err = self.explain("prometheus", url)
            self.assertEqual((code, err), (1, ""), url)
            self.assertEqual(out.splitlines()[:2], [first, f"rule: {rule}"], url)
            self.assertTrue(out.splitlines()[-1].endswith(rule), url)

    def test_sd(self) -> None:
        """/sd lists the routes and targets the identity would see, with the allow entry."""
        code, out, _ = self.explain("prometheus", "/sd")
        self.assertEqual(code, 0)
        self.assertEqual(
            out.splitlines(),
            [
                "allow 200 ok",
                "rule: /sd lists the routes whose allow admits identities.prometheus",
                "  route blackbox (routes.blackbox.allow: prometheus): 1 target(s)",
                "    127.0.0.1:9115",
                "  route node (routes.node.allow: role:scraper): 2 target(s)",
                "    10.0.0.5:9100",
                "    10.0.0.6:9100",
            ],
        )

    def test_unknown_identity(self) -> None:
        """An identity name not in the configuration: exit 2, naming the known ones."""
        code, out, err = self.explain("nobody", "/sd")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("no identity 'nobody'", err)
        self.assertIn("known: ops, prometheus", err)

    def test_bad_url(self) -> None:
        """A URL that is neither http(s) nor a path: exit 2."""
        for url in ("ftp://x/scrape", "scrape?route=node"):
            code, _, err = self.explain("prometheus", url)
            self.assertEqual(code, 2, url)
            self.assertIn("give https://HOST/scrape?... or /scrape?...", err)

    def test_invalid_config(self) -> None:
        """An invalid configuration: exit 2 with check-config's text."""
        self.write("promgate.yaml", CONFIG.replace("allow: [prometheus, ops]", "allow: [who]"))
        code, out, err = self.explain("prometheus", "/sd")
        _, _, check_err = run("check-config", str(self.config))
        self.assertEqual((code, out), (2, ""))
        self.assertIn("undefined identity 'who'", err)
        self.assertEqual(err, check_err)

    def test_usage(self) -> None:
        """--config and --as are required (argparse's usage error, exit 2)."""
        with self.assertRaises(SystemExit) as caught:
            run("explain", "/sd")
        self.assertEqual(caught.exception.code, 2)


class TestPolicyTests(PolicyCLITestCase):
    """``promgate test-policy`` runs cases through the same policy and reports mismatches."""

    CASES = """\
        config: promgate.yaml
        tests:
          - name: prometheus scrapes node
            as: prometheus
            url: /scrape?route=node&target=10.0.0.5%3A9100
            expect: allow
            status: 200
            reason: ok
          - as: ops
            url: /scrape?route=node&target=10.0.0.5%3A9100
            expect: deny
            status: 403
            reason: authz_denied
          - as: prometheus
            url: /sd
            expect: allow
        """

    def test_all_pass(self) -> None:
        """Every case as expected: exit 0 and one summary line."""
        cases = self.write("cases.yaml", self.CASES)
        self.assertEqual(
            run("test-policy", str(cases)), (0, "OK: 3 case(s) passed in 1 file(s)\n", "")
        )

    def test_mismatches(self) -> None:
        """Each mismatch names the file, line, case, expected and got, and the rule; exit 1."""
        cases = self.write(
            "sub/cases.yaml",
            self.CASES.replace("promgate.yaml", "../promgate.yaml")
            .replace("status: 200", "status: 204")
            .replace("expect: deny", "expect: allow"),
        )
        code, out, err = run("test-policy", str(cases))
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(
            out.splitlines(),
            [
                f"{cases}:3: tests[0] 'prometheus scrapes node': "
                "/scrape?route=node&target=10.0.0.5%3A9100",
                "  as prometheus: expected allow 204 ok, got allow 200 ok",
                "  rule: routes.node.allow: role:scraper",
                f"{cases}:9: tests[1]: /scrape?route=node&target=10.0.0.5%3A9100",
                "  as ops: expected allow 403 authz_denied, got deny 403 authz_denied",
                "  rule: routes.node.allow: default deny",
                "FAILED: 2 of 3 case(s) in 1 file(s)",
            ],
        )

    def test_several_files(self) -> None:
        """Cases from several files, each with its own configuration, are all counted."""
        first = self.write("a.yaml", self.CASES)
        other = self.write("other/promgate.yaml", CONFIG.replace("role:scraper", "ops"))
        TestPKI(other.parent / "pki")
        second = self.write(
            "other/b.yaml",
            """\
            config: promgate.yaml
            tests:
              - {as: ops, url: "/scrape?route=node&target=10.0.0.5%3A9100", expect: allow}
            """,
        )
        self.assertEqual(
            run("test-policy", str(first), str(second)),
            (0, "OK: 4 case(s) passed in 2 file(s)\n", ""),
        )

    def test_unusable_cases(self) -> None:
        """Malformed cases are reported with file, line and key, exit 2, and nothing runs."""
        cases = self.write(
            "cases.yaml",
            """\
            config: promgate.yaml
            colour: red
            tests:
              - as: nobody
                url: /sd
                expect: maybe
              - {as: ops, url: "ftp://x/sd", expect: allow, status: 99, extra: 1}
              - 3
              - {url: /sd}
            """,
        )
        code, out, err = run("test-policy", str(cases))
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(
            err.splitlines(),
            [
                f"{cases}:2: colour: unknown key (expected config, tests)",
                f"{cases}:6: tests[0].expect: must be allow or deny",
                f"{cases}:4: tests[0].as: no identity 'nobody' (known: ops, prometheus)",
                f"{cases}:7: tests[1].extra: unknown key "
                "(expected name, as, listener, url, expect, status, reason)",
                f"{cases}:7: tests[1].url: URL 'ftp://x/sd': "
                "give https://HOST/scrape?... or /scrape?...",
                f"{cases}:7: tests[1].status: must be an HTTP status code",
                f"{cases}:8: tests[2]: must be a mapping with as, url and expect",
                f"{cases}:9: tests[3]: missing required key 'as'",
                f"{cases}:9: tests[3]: missing required key 'expect'",
                "promgate test-policy: 9 problem(s) in the test files",
            ],
        )

    def test_unusable_files(self) -> None:
        """A missing file, bad YAML, no tests, or an invalid configuration: exit 2."""
        missing = self.dir / "missing.yaml"
        bad_yaml = self.write("bad.yaml", "tests: [\n")
        no_tests = self.write("empty.yaml", "config: promgate.yaml\ntests: []\n")
        bad_config = self.write(
            "conf.yaml", "config: nowhere.yaml\ntests: [{as: a, url: /sd, expect: allow}]\n"
        )
        for file, message in (
            (missing, "cannot read file"),
            (bad_yaml, "YAML error"),
            (no_tests, "tests: must be a non-empty list of cases"),
            (bad_config, "config: " + str(self.dir / "nowhere.yaml") + " is not a valid"),
        ):
            code, out, err = run("test-policy", str(file))
            self.assertEqual((code, out), (2, ""), file)
            self.assertIn(message, err)
        code, _, err = run("test-policy", str(bad_config))
        self.assertIn("configuration is NOT valid", err)


class ShippedPolicyTests(SynchronousTestCase):
    """etc/policy-tests.yaml passes against the shipped example configuration."""

    def test_shipped_policy_tests(self) -> None:
        """A copy of etc/ with a development PKI: every shipped case passes."""
        etc = Path(self.mktemp()).resolve() / "etc"
        shutil.copytree(ROOT / "etc", etc, ignore=shutil.ignore_patterns("pki", "audit.*"))
        init_dev_pki(etc / "pki", ["prometheus", "ops"])
        code, out, err = run("test-policy", str(etc / "policy-tests.yaml"))
        self.assertEqual((code, err), (0, ""), out)
        self.assertRegex(out, r"^OK: \d+ case\(s\) passed in 1 file\(s\)\n$")

    def test_shipped_explain(self) -> None:
        """``promgate explain`` on the shipped example: prometheus may scrape self."""
        etc = Path(self.mktemp()).resolve() / "etc"
        shutil.copytree(ROOT / "etc", etc, ignore=shutil.ignore_patterns("pki", "audit.*"))
        init_dev_pki(etc / "pki", ["prometheus", "ops"])
        code, out, _ = run(
            "explain",
            "--config",
            str(etc / "promgate.yaml"),
            "--as",
            "prometheus",
            "https://localhost:9443/scrape?route=self&target=127.0.0.1%3A9099",
        )
        self.assertEqual(code, 0, out)
        self.assertIn("rule: routes.self.allow: role:scraper\n", out)
        self.assertIn("rate 5/s, burst 10, per identity_target, max_concurrent 50", out)


TWO_LISTENERS = CONFIG.replace(
    'listeners: [{name: scrape, protocol: http, endpoint: "tcp:9443"}]',
    'listeners: [{name: scrape, protocol: http, endpoint: "tcp:9443"},'
    ' {name: inner, protocol: http, endpoint: "tcp:9444"}]',
).replace(
    "    allow: [prometheus, ops]\n", "    allow: [prometheus, ops]\n    listeners: [inner]\n"
)


class ListenerTests(PolicyCLITestCase):
    """explain and test-policy ask one listener, which sees only the routes it serves."""

    def setUp(self) -> None:
        super().setUp()
        self.config = self.write("promgate.yaml", TWO_LISTENERS)

    def test_explain_listener(self) -> None:
        """A route served by another listener is an unknown route (404) to this one."""
        url = "https://gate:9443/scrape?route=blackbox&target=127.0.0.1%3A9115&module=x"
        base = ("explain", "--config", str(self.config), "--as", "ops")
        code, out, _ = run(*base, url)
        self.assertEqual(code, 1)
        self.assertIn("404", out)
        code, out, _ = run(*base, "--listener", "inner", url)
        self.assertEqual(code, 0, out)

    def test_explain_unknown_listener(self) -> None:
        """A listener the configuration does not have: exit 2."""
        code, _, err = run(
            "explain", "--config", str(self.config), "--as", "ops", "--listener", "nope", "/sd"
        )
        self.assertEqual(code, 2)
        self.assertIn("no listener 'nope' (listeners: scrape, inner)", err)

    def test_policy_cases_name_listener(self) -> None:
        """``listener:`` in a case picks the listener; without it, the first http one."""
        tests = self.write(
            "tests.yaml",
            """\
            config: promgate.yaml
            tests:
              - as: ops
                url: /scrape?route=blackbox&target=127.0.0.1%3A9115&module=x
                expect: deny
                status: 404
              - as: ops
                listener: inner
                url: /scrape?route=blackbox&target=127.0.0.1%3A9115&module=x
                expect: allow
            """,
        )
        code, out, err = run("test-policy", str(tests))
        self.assertEqual(code, 0, out + err)


EVERY_KIND = (
    CONFIG.replace(
        'listeners: [{name: scrape, protocol: http, endpoint: "tcp:9443"}]',
        """listeners:
  - {name: scrape, protocol: http, endpoint: "tcp:9443"}
  - {name: egress, protocol: forward, endpoint: "tcp:3128"}
  - {name: raw, protocol: tcp, endpoint: "tcp:9101", route: node, target: "10.0.0.5:9100"}
  - name: pass
    protocol: tcp
    endpoint: "tcp:9102"
    mode: passthrough
    sni: {web.example.org: web}""",
    )
    .replace("  node:\n", "  node:\n    listeners: [scrape, egress, raw]\n")
    .replace(
        "audit:",
        """  web:
    scheme: https
    allow: ["sni:web.example.org"]
    targets: {static: ["10.0.1.1:443"]}
audit:""",
    )
)


class EveryListenerKindTests(PolicyCLITestCase):
    """explain and test-policy ask forward and tcp listeners what they receive: absolute
    URLs and CONNECT, and server names; the answer is the one the gateway's own policy
    objects give."""

    def setUp(self) -> None:
        super().setUp()
        self.config = self.write("promgate.yaml", EVERY_KIND)

    def ask(self, listener: str, identity: str, request: str) -> tuple[int, str, str]:
        return run(
            "explain",
            "--config",
            str(self.config),
            "--as",
            identity,
            "--listener",
            listener,
            request,
        )

    def test_forward_absolute_url(self) -> None:
        code, out, err = self.ask("egress", "prometheus", "http://10.0.0.5:9100/metrics")
        self.assertEqual(code, 0, out + err)
        self.assertTrue(out.startswith("allow 200 ok\n"), out)
        self.assertIn("upstream: GET http://10.0.0.5:9100/metrics\n", out)
        code, out, _ = self.ask("egress", "prometheus", "http://10.0.0.5:9100/debug/pprof")
        self.assertEqual(code, 1)
        self.assertTrue(out.startswith("deny 403 path_refused\n"), out)
        code, out, _ = self.ask("egress", "ops", "http://10.0.0.5:9100/metrics")
        self.assertEqual(code, 1)
        self.assertTrue(out.startswith("deny 403 authz_denied\n"), out)

    def test_forward_connect(self) -> None:
        """CONNECT reaches https routes only; an unknown target is the same 403."""
        code, out, _ = self.ask("egress", "ops", "CONNECT 127.0.0.1:9115")
        self.assertEqual(code, 0, out)
        self.assertIn("upstream: https://127.0.0.1:9115\n", out)
        code, out, _ = self.ask("egress", "ops", "CONNECT 10.0.0.5:9100")
        self.assertEqual(code, 1)
        self.assertTrue(out.startswith("deny 403 not_found\n"), out)
        code, out, _ = self.ask("egress", "ops", "CONNECT nonsense")
        self.assertEqual(code, 1)
        self.assertTrue(out.startswith("deny 400 bad_request\n"), out)

    def test_forward_unusable_request(self) -> None:
        code, _, err = self.ask("egress", "ops", "/scrape?route=node&target=10.0.0.5%3A9100")
        self.assertEqual(code, 2)
        self.assertIn("give http://HOST:PORT/PATH or CONNECT HOST:PORT", err)

    def test_tcp_terminate(self) -> None:
        """A terminating tcp listener judges the caller's identity; no HTTP status."""
        code, out, _ = self.ask("raw", "prometheus", "")
        self.assertEqual(code, 0, out)
        self.assertTrue(out.startswith("allow ok\n"), out)
        self.assertIn("upstream: http://10.0.0.5:9100\n", out)
        code, out, _ = self.ask("raw", "ops", "")
        self.assertEqual(code, 1)
        self.assertTrue(out.startswith("deny authz_denied\n"), out)

    def test_tcp_passthrough_by_server_name(self) -> None:
        """A passthrough listener routes and admits by server name alone."""
        code, out, _ = self.ask("pass", "ops", "web.example.org")
        self.assertEqual(code, 0, out)
        self.assertIn("routes.web.allow: sni:web.example.org", out)
        self.assertIn("passthrough: the connection carries no identity", out)
        code, out, _ = self.ask("pass", "ops", "other.example.org")
        self.assertEqual(code, 1)
        self.assertTrue(out.startswith("deny unknown_server_name\n"), out)
        code, out, _ = self.ask("pass", "ops", "")
        self.assertTrue(out.startswith("deny no_server_name\n"), out)

    def test_policy_cases_for_every_kind(self) -> None:
        tests = self.write(
            "tests.yaml",
            """\
            config: promgate.yaml
            tests:
              - {as: prometheus, listener: egress, url: "http://10.0.0.5:9100/metrics",
                 expect: allow, status: 200}
              - {as: ops, listener: egress, url: "CONNECT 10.0.0.5:9100", expect: deny,
                 status: 403, reason: not_found}
              - {as: ops, listener: raw, url: "", expect: deny, reason: authz_denied}
              - {as: ops, listener: pass, url: web.example.org, expect: allow}
            """,
        )
        code, out, err = run("test-policy", str(tests))
        self.assertEqual((code, err), (0, ""), out)
        self.assertIn("OK: 4 case(s) passed", out)

    def test_policy_status_on_tcp_is_a_problem(self) -> None:
        tests = self.write(
            "tests.yaml",
            """\
            config: promgate.yaml
            tests:
              - {as: ops, listener: raw, url: "", expect: deny, status: 403}
            """,
        )
        code, _, err = run("test-policy", str(tests))
        self.assertEqual(code, 2)
        self.assertIn("tests[0].status: a tcp listener answers no HTTP status", err)
