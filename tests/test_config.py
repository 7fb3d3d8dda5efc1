"""Tests for configuration loading: drop-ins, templates, every error kind with its file,
line and key path, warnings, path resolution, units, and the ``check-config`` command."""

from __future__ import annotations

import copy
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from promgate import cli
from promgate.addresses import split_address
from promgate.config.errors import ConfigError
from promgate.config.loader import check_config, load_config
from promgate.config.model import (
    Admin,
    Audit,
    CertMatch,
    Identity,
    Limits,
    Listener,
    Route,
    Selector,
    Target,
    TLSFiles,
)
from promgate.config.units import parse_duration, parse_rate, parse_size
from promgate.testing.configs import (
    ProblemAssertions,
)


class ValidConfigTests(ProblemAssertions):
    """A valid configuration with drop-ins and templates loads to frozen models."""

    def setUp(self) -> None:
        super().setUp()
        self.tree.standard()

    def test_loads(self) -> None:
        """No errors and no warnings; every file read is listed, main first."""
        config, errors, warnings = self.tree.check()
        self.assertEqual((errors, warnings), ([], []))
        assert config is not None
        self.assertEqual(config.source, self.tree.path("main.yaml"))
        self.assertEqual(
            config.files,
            (
                self.tree.path("main.yaml"),
                self.tree.path("conf.d/identities.yaml"),
                self.tree.path("conf.d/node.yaml"),
            ),
        )
        self.assertEqual(config.warnings, ())

    def test_sections(self) -> None:
        """Listener, TLS files (resolved against main.yaml), admin and audit are as written."""
        config = load_config(self.tree.path("main.yaml"))
        pki = self.tree.pki
        tls = TLSFiles(pki.gate_cert, pki.gate_key, pki.ca_cert)
        self.assertEqual(
            config.listeners,
            (Listener("scrape", "http", "tcp:9443", tls, advertise="gate.example.org:9443"),),
        )
        self.assertEqual(config.admin, Admin("tcp:9099:interface=127.0.0.1"))
        self.assertEqual(
            config.audit,
            Audit(
                path=self.tree.path("audit.jsonl"),
                key_file=pki.audit_key,
                fsync="always",
                on_failure="deny",
            ),
        )

    def test_identities(self) -> None:
        """Identities from main and drop-in, with one or several certificate rules."""
        config = load_config(self.tree.path("main.yaml"))
        self.assertEqual(
            dict(config.identities),
            {
                "prometheus": Identity(
                    "prometheus",
                    (CertMatch(uri="spiffe://promgate.local/prometheus"),),
                    frozenset({"scraper"}),
                ),
                "ops": Identity(
                    "ops",
                    (CertMatch(cn="ops"), CertMatch(dns="ops.example.org")),
                    frozenset({"admin"}),
                ),
            },
        )

    def test_route_inherits_template(self) -> None:
        """A route takes every key from its template, and its own keys replace the template's."""
        config = load_config(self.tree.path("main.yaml"))
        self.assertEqual(
            config.routes["node"],
            Route(
                name="node",
                targets=(
                    Target("10.0.0.5:9100"),
                    Target("[2001:db8::1]:9100", {"az": "a"}),
                    Target("node-b.example.org:9100", {"az": "a"}),
                ),
                scheme="http",
                metrics_path="/metrics",
                paths=("/metrics", "/metrics/extra"),
                allow=("role:scraper",),
                limits=Limits(rate=5.0, burst=10, per="identity_target", max_concurrent=50),
                timeout=5.0,
                max_response_size=1024 * 1024,
                labels={"env": "staging"},
            ),
        )

    def test_route_without_template(self) -> None:
        """A route without a template gets the safe defaults for what it leaves out."""
        config = load_config(self.tree.path("main.yaml"))
        self.assertEqual(
            config.routes["blackbox"],
            Route(
                name="blackbox",
                targets=(Target("127.0.0.1:9115"),),
                metrics_path="/probe",
                paths=("/probe",),
                params=("module",),
                allow=("ops",),
            ),
        )
        self.assertEqual(config.routes["blackbox"].timeout, 30.0)
        self.assertEqual(config.routes["blackbox"].max_response_size, 64 * 1024 * 1024)

    def test_target_address_parts(self) -> None:
        """Targets split into host and port, IPv6 brackets removed."""
        targets = load_config(self.tree.path("main.yaml")).routes["node"].targets
        self.assertEqual(
            [(t.host, t.port) for t in targets][:2], [("10.0.0.5", 9100), ("2001:db8::1", 9100)]
        )

    def test_frozen(self) -> None:
        """The loaded models cannot be changed after the fact."""
        config = load_config(self.tree.path("main.yaml"))
        with self.assertRaises(attrs.exceptions.FrozenInstanceError):
            config.routes["node"].timeout = 1.0  # type: ignore[misc]
        with self.assertRaises(attrs.exceptions.FrozenInstanceError):
            config.listeners[0].name = "x"  # type: ignore[misc]

    def test_load_config_raises_with_every_problem(self) -> None:
        """load_config raises ConfigError carrying every problem, one per line of its text."""
        self.tree.write("conf.d/zz.yaml", "routs: {}\nroutes: {bad: {targets: {static: [x]}}}\n")
        error = self.assertRaises(ConfigError, load_config, self.tree.path("main.yaml"))
        self.assertEqual(len(error.problems), 2)
        self.assertEqual(str(error), "\n".join(str(p) for p in error.problems))


class SyntaxAndStructureTests(ProblemAssertions):
    """YAML and structural errors."""

    def test_yaml_syntax_error(self) -> None:
        """A YAML syntax error names the file and the line."""
        text = "routes:\n  x:\n    targets: [unclosed\n  y: 1\n"
        errors = self.errors_with("conf.d/zz.yaml", text)
        problem = self.assertProblem(errors, "conf.d/zz.yaml", 4, "", "YAML syntax error")
        self.assertEqual(len(errors), 1, errors)
        self.assertTrue(str(problem).startswith(f"{self.tree.path('conf.d/zz.yaml')}:4: YAML"))

    def test_unknown_top_level_key(self) -> None:
        """An unknown top-level key is reported at its line with the allowed keys."""
        errors = self.errors_with("conf.d/zz.yaml", "# comment\nroutez: {}\n")
        self.assertProblem(errors, "conf.d/zz.yaml", 2, "routez", "unknown key (expected one of:")

    def test_unknown_nested_keys(self) -> None:
        """Unknown keys deep inside a listener, a route and its limits are each reported."""
        text = """\
            listeners:
              - name: other
                endpoint: "tcp:9444"
                endpont: "tcp:1"
            routes:
              r:
                allow: [ops]
                targets: {static: ["a:1"]}
                limits:
                  brust: 3
                timeuot: 5s
            """
        errors = self.errors_with("conf.d/zz.yaml", text)
        name = "conf.d/zz.yaml"
        self.assertProblem(errors, name, 4, "listeners[0].endpont", "unknown key")
        self.assertProblem(errors, name, 10, "routes.r.limits.brust", "unknown key")
        self.assertProblem(errors, name, 11, "routes.r.timeuot", "unknown key")
        self.assertEqual(len(errors), 3, errors)

    def test_duplicate_key(self) -> None:
        """A key given twice in one mapping is reported at the second occurrence."""
        text = "routes:\n  r:\n    allow: [ops]\n    targets: {static: ['a:1']}\n    allow: [x]\n"
        errors = self.errors_with("conf.d/zz.yaml", text)
        self.assertProblem(
            errors, "conf.d/zz.yaml", 5, "routes.r.allow", "duplicate key in the same mapping"
        )

    def test_top_level_not_mapping(self) -> None:
        """A drop-in that is a list, not a mapping, is reported."""
        errors = self.errors_with("conf.d/zz.yaml", "- a\n- b\n")
        self.assertEqual(
            [str(p) for p in errors],
            [f"{self.tree.path('conf.d/zz.yaml')}: the top level must be a mapping"],
        )

    def test_merge_keys_refused(self) -> None:
        """YAML merge keys are refused rather than silently merged."""
        text = (
            "templates:\n  t: &t {timeout: 5s}\n"
            "routes:\n  r:\n    <<: *t\n    targets: {static: ['a:1']}\n"
        )
        errors = self.errors_with("conf.d/zz.yaml", text)
        self.assertProblem(errors, "conf.d/zz.yaml", 5, "routes.r", "merge keys")

    def test_recursive_alias(self) -> None:
        """A recursive YAML alias is an error, not a crash."""
        errors = self.errors_with("conf.d/zz.yaml", "routes: &a\n  r: [*a]\n")
        self.assertProblem(errors, "conf.d/zz.yaml", None, "", "nested too deeply")

    def test_non_string_key(self) -> None:
        """Mapping keys must be strings (a bare number is not a route name)."""
        errors = self.errors_with("conf.d/zz.yaml", "routes:\n  404: {targets: {static: []}}\n")
        self.assertProblem(errors, "conf.d/zz.yaml", 2, "routes", "mapping keys must be strings")

    def test_main_file_missing(self) -> None:
        """A main file that cannot be read is one error naming it."""
        config, errors, _ = self.tree.check("nope.yaml")
        self.assertIsNone(config)
        self.assertProblem(errors, "nope.yaml", None, "", "cannot read file")


class DefinedTwiceTests(ProblemAssertions):
    """A name defined twice across drop-ins is an error pointing at both places."""

    def assertTwice(self, section: str, name: str, first_file: str, first_needle: str) -> None:
        text = f"{section}:\n  {name}: {{}}\n"
        errors = self.errors_with("conf.d/zz.yaml", text)
        first = f"{self.tree.path(first_file)}:{self.tree.line(first_file, first_needle)}"
        self.assertProblem(
            errors, "conf.d/zz.yaml", 2, f"{section}.{name}", f"defined twice (first at {first})"
        )

    def test_route(self) -> None:
        """A route defined in two drop-ins."""
        self.assertTwice("routes", "node", "conf.d/node.yaml", "node:")

    def test_identity(self) -> None:
        """An identity defined in main and a drop-in."""
        self.assertTwice("identities", "prometheus", "main.yaml", "prometheus:")

    def test_template(self) -> None:
        """A template defined in main and a drop-in."""
        self.assertTwice("templates", "exporter", "main.yaml", "exporter:")

    def test_listener(self) -> None:
        """Two listeners with the same name."""
        text = "listeners:\n  - endpoint: 'tcp:9555'\n    name: scrape\n"
        errors = self.errors_with("conf.d/zz.yaml", text)
        first = f"{self.tree.path('main.yaml')}:{self.tree.line('main.yaml', 'name: scrape')}"
        self.assertProblem(
            errors,
            "conf.d/zz.yaml",
            3,
            "listeners[0].name",
            f"listener 'scrape' defined twice (first at {first})",
        )

    def test_singletons(self) -> None:
        """tls, audit and admin may each appear in one file only."""
        text = """\
            admin: {endpoint: "tcp:1"}
            audit: {path: a.jsonl, key_file: ../pki/audit.key}
            tls: {certificate: ../pki/gate.pem, key: ../pki/gate-key.pem, client_ca: ../pki/ca.pem}
            """
        errors = self.errors_with("conf.d/zz.yaml", text)
        for line, key in enumerate(("admin", "audit", "tls"), 1):
            first = f"{self.tree.path('main.yaml')}:{self.tree.line('main.yaml', key + ':')}"
            self.assertProblem(
                errors, "conf.d/zz.yaml", line, key, f"defined twice (first at {first})"
            )
        self.assertEqual(len(errors), 3, errors)


class FileErrorTests(ProblemAssertions):
    """Files named by the configuration must exist, parse, and match."""

    def setUp(self) -> None:
        super().setUp()
        self.tree.standard()

    def replace_main(self, old: str, new: str) -> None:
        text = self.tree.texts["main.yaml"]
        self.assertIn(old, text)
        self.tree.write("main.yaml", text.replace(old, new))

    def assertMainError(self, needle: str, key: str, message: str) -> None:
        config, errors, _ = self.tree.check()
        self.assertIsNone(config)
        self.assertProblem(errors, "main.yaml", self.tree.line("main.yaml", needle), key, message)

    def test_missing_certificate(self) -> None:
        """A certificate file that does not exist."""
        self.replace_main("pki/gate.pem", "pki/nope.pem")
        path = self.tree.path("pki/nope.pem")
        self.assertMainError("nope.pem", "tls.certificate", f"file {path} does not exist")

    def test_missing_key(self) -> None:
        """A key file that does not exist."""
        self.replace_main("pki/gate-key.pem", "pki/nope.pem")
        self.assertMainError("nope.pem", "tls.key", "does not exist")

    def test_missing_client_ca(self) -> None:
        """A client CA file that does not exist."""
        self.replace_main("pki/ca.pem", "pki/nope.pem")
        self.assertMainError("nope.pem", "tls.client_ca", "does not exist")

    def test_missing_audit_key(self) -> None:
        """An audit key file that does not exist."""
        self.replace_main("pki/audit.key", "pki/nope.key")
        self.assertMainError("nope.key", "audit.key_file", "does not exist")

    def test_empty_audit_key(self) -> None:
        """An empty audit key file is refused."""
        self.tree.pki.audit_key.write_text("  \n")
        self.assertMainError("audit.key", "audit.key_file", "is empty")

    def test_audit_directory_missing(self) -> None:
        """The audit log's directory must exist."""
        self.replace_main("path: audit.jsonl", "path: nodir/audit.jsonl")
        self.assertMainError("nodir", "audit.path", "does not exist")

    def test_missing_literal_include(self) -> None:
        """A literal (non-glob) include that does not exist is an error; a glob may match none."""
        self.replace_main(
            'include: ["conf.d/*.yaml"]', 'include: ["conf.d/*.yaml", "x/*.yaml", "extra.yaml"]'
        )
        path = self.tree.path("extra.yaml")
        self.assertMainError("include", "include[2]", f"included file {path} does not exist")
        _, errors, _ = self.tree.check()
        self.assertEqual(len(errors), 1, errors)

    def test_certificate_does_not_parse(self) -> None:
        """A certificate file that is not PEM."""
        self.tree.pki.gate_cert.write_text("not a certificate\n")
        self.assertMainError("gate.pem", "tls.certificate", "not a PEM certificate")

    def test_client_ca_does_not_parse(self) -> None:
        """A client CA file that is not PEM."""
        self.tree.pki.ca_cert.write_bytes(b"\x00\x01")
        self.assertMainError("client_ca", "tls.client_ca", "not a PEM certificate")

    def test_key_does_not_parse(self) -> None:
        """A key file that is not a private key."""
        self.tree.pki.gate_key.write_bytes(self.tree.pki.gate_cert.read_bytes())
        self.assertMainError("gate-key.pem", "tls.key", "not an unencrypted PEM private key")

    def test_key_does_not_match(self) -> None:
        """A key that belongs to another certificate."""
        _, other_key = self.tree.pki.client("someone")
        self.tree.pki.gate_key.write_bytes(other_key.read_bytes())
        self.assertMainError(
            "gate-key.pem",
            "tls.key",
            f"key {self.tree.pki.gate_key} does not match certificate {self.tree.pki.gate_cert}",
        )


class ValueErrorTests(ProblemAssertions):
    """Values that do not resolve or parse, each at its own key path."""

    def assertZZ(self, text: str, needle: str, key: str, message: str, nth: int = 1) -> None:
        errors = self.errors_with("conf.d/zz.yaml", text)
        line = self.tree.line("conf.d/zz.yaml", needle, nth)
        self.assertProblem(errors, "conf.d/zz.yaml", line, key, message)

    def test_undefined_identity(self) -> None:
        """allow naming an identity nobody defined."""
        self.assertZZ(
            "routes:\n  r:\n    allow: [ops, nobody]\n    targets: {static: ['a:1']}\n",
            "allow",
            "routes.r.allow",
            "undefined identity 'nobody'",
        )

    def test_undefined_identity_in_template(self) -> None:
        """An undefined identity in a template's allow is reported once, at the template."""
        text = """\
            templates:
              t: {allow: [nobody]}
            routes:
              r1: {template: t, targets: {static: ['a:1']}}
              r2: {template: t, targets: {static: ['a:2']}}
            """
        self.assertZZ(text, "allow", "templates.t.allow", "undefined identity 'nobody'")

    def test_undefined_template(self) -> None:
        """A route naming a template nobody defined."""
        self.assertZZ(
            "routes:\n  r:\n    template: nope\n    allow: [ops]\n    targets: {static: ['a:1']}\n",
            "template",
            "routes.r.template",
            "undefined template 'nope'",
        )

    def test_bad_duration(self) -> None:
        """A duration Prometheus would not accept."""
        self.assertZZ(
            "routes:\n  r: {allow: [ops], timeout: 10, targets: {static: ['a:1']}}\n",
            "timeout",
            "routes.r.timeout",
            "duration",
        )

    def test_zero_timeout_and_size(self) -> None:
        """A zero timeout or size cap is refused, never silently replaced by the default."""
        text = (
            "routes:\n"
            "  r: {allow: [ops], timeout: 0s, max_response_size: 0, targets: {static: ['a:1']}}\n"
        )
        errors = self.errors_with("conf.d/zz.yaml", text)
        line = self.tree.line("conf.d/zz.yaml", "timeout")
        self.assertProblem(errors, "conf.d/zz.yaml", line, "routes.r.timeout", "greater than zero")
        self.assertProblem(
            errors, "conf.d/zz.yaml", line, "routes.r.max_response_size", "greater than zero"
        )

    def test_bad_duration_in_template(self) -> None:
        """A bad duration in a template is reported once, at the template's line."""
        text = """\
            templates:
              t:
                timeout: 5 minutes
            routes:
              r1: {template: t, allow: [ops], targets: {static: ['a:1']}}
              r2: {template: t, allow: [ops], targets: {static: ['a:2']}}
            """
        self.assertZZ(text, "timeout", "templates.t.timeout", "not a duration: '5 minutes'")

    def test_bad_size(self) -> None:
        """A size with an unknown unit."""
        self.assertZZ(
            "routes:\n  r:\n    allow: [ops]\n    max_response_size: 64MB/s\n"
            "    targets: {static: ['a:1']}\n",
            "max_response_size",
            "routes.r.max_response_size",
            "not a size",
        )

    def test_bad_rate(self) -> None:
        """A rate that is not N/s, N/m or N/h."""
        self.assertZZ(
            "routes:\n  r:\n    allow: [ops]\n    limits:\n      rate: 5/d\n"
            "    targets: {static: ['a:1']}\n",
            "rate",
            "routes.r.limits.rate",
            "not a rate",
        )

    def test_bad_burst_and_per(self) -> None:
        """Burst must be a positive integer and per one of the known keys."""
        text = (
            "routes:\n  r:\n    allow: [ops]\n    limits: {burst: 0, per: everyone}\n"
            "    targets: {static: ['a:1']}\n"
        )
        errors = self.errors_with("conf.d/zz.yaml", text)
        self.assertProblem(errors, "conf.d/zz.yaml", 4, "routes.r.limits.burst", ">= 1")
        self.assertProblem(errors, "conf.d/zz.yaml", 4, "routes.r.limits.per", "must be one of")

    def test_bad_targets(self) -> None:
        """Target addresses must be host:port with a valid port and host."""
        bad = [
            "10.0.0.5",
            "10.0.0.5:0",
            "h:65536",
            "h:99999",
            "h:x",
            "::1:9100",
            "[nothost]:1",
            "-h:1",
            "h h:1",
            "1.2.3.4.5:1",
            "h:²",
            "h:٩١٠٠",
        ]
        text = "routes:\n  r:\n    allow: [ops]\n    targets:\n      static:\n"
        text += "".join(f"        - {json.dumps(b)}\n" for b in bad)
        errors = self.errors_with("conf.d/zz.yaml", text)
        for i, b in enumerate(bad):
            self.assertProblem(
                errors,
                "conf.d/zz.yaml",
                6 + i,
                f"routes.r.targets.static[{i}]",
                f"target {b!r} must be host:port",
            )
        self.assertEqual(len(errors), len(bad), errors)

    def test_target_twice(self) -> None:
        """The same target listed twice in a route is an error."""
        self.assertZZ(
            "routes:\n  r:\n    allow: [ops]\n"
            "    targets:\n      static: ['a:1', {targets: ['a:1']}]\n",
            "static",
            "routes.r.targets.static",
            "target a:1 listed twice",
        )

    def test_target_group_not_list(self) -> None:
        """A target group whose targets is not a list is an error, not silently empty."""
        self.assertZZ(
            "routes:\n  r:\n    allow: [ops]\n"
            "    targets:\n      static:\n        - targets: a:1\n",
            "targets: a:1",
            "routes.r.targets.static[0].targets",
            "must be a list",
        )

    def test_missing_targets(self) -> None:
        """A route without targets is an error, not a crash."""
        self.assertZZ(
            "routes:\n  r: {allow: [ops]}\n", "r:", "routes.r", "missing required key 'targets'"
        )

    def test_bad_endpoint(self) -> None:
        """Endpoints must be tcp:, tcp6: or unix: strings Twisted can parse."""
        text = """\
            listeners:
              - {name: a, endpoint: "ssl:9443"}
              - {name: b, endpoint: "tcp:notaport"}
              - {name: c, endpoint: "tcp:1:bogus=1"}
              - {name: d, endpoint: "tcp:1\\\\"}
            """
        errors = self.errors_with("conf.d/zz.yaml", text)
        self.assertProblem(
            errors, "conf.d/zz.yaml", 2, "listeners[0].endpoint", "must be tcp:, tcp6: or unix:"
        )
        for i in (1, 2, 3):
            self.assertProblem(
                errors, "conf.d/zz.yaml", 2 + i, f"listeners[{i}].endpoint", "invalid endpoint"
            )

    def test_bad_advertise(self) -> None:
        """advertise must be host:port."""
        self.assertZZ(
            "listeners:\n  - {name: a, endpoint: 'tcp:1', advertise: 'gate.example.org'}\n",
            "advertise",
            "listeners[0].advertise",
            "must be host:port",
        )

    def test_bad_label_name(self) -> None:
        """Label names must be Prometheus label names, and __ names are reserved."""
        text = """\
            routes:
              r:
                allow: [ops]
                labels:
                  bad-name: x
                  __address__: evil:1
                  ok: [not, a, string]
                targets: {static: ['a:1']}
            """
        errors = self.errors_with("conf.d/zz.yaml", text)
        self.assertProblem(
            errors, "conf.d/zz.yaml", 5, "routes.r.labels.bad-name", "not a valid label name"
        )
        self.assertProblem(errors, "conf.d/zz.yaml", 6, "routes.r.labels.__address__", "reserved")
        self.assertProblem(
            errors, "conf.d/zz.yaml", 7, "routes.r.labels.ok", "label values must be strings"
        )

    def test_bad_paths(self) -> None:
        """Upstream paths must be absolute and normalised."""
        bad = ["metrics", "/a/../b", "/a//b", "/a/./b", "/a;x", "/a?x", "/a%2e"]
        text = "routes:\n  r:\n    allow: [ops]\n    targets: {static: ['a:1']}\n    paths:\n"
        text += "".join(f"      - {json.dumps(b)}\n" for b in bad)
        errors = self.errors_with("conf.d/zz.yaml", text)
        for i in range(len(bad)):
            self.assertProblem(
                errors, "conf.d/zz.yaml", 6 + i, f"routes.r.paths[{i}]", "absolute path"
            )

    def test_reserved_param(self) -> None:
        """route, target and path are the gateway's own query parameters."""
        self.assertZZ(
            "routes:\n  r:\n    allow: [ops]\n    params: [module, target]\n"
            "    targets: {static: ['a:1']}\n",
            "params",
            "routes.r.params",
            "parameter 'target' is the gateway's own",
        )

    def test_bad_name(self) -> None:
        """Names use a restricted alphabet."""
        self.assertZZ(
            "routes:\n  'a b': {allow: [ops], targets: {static: ['a:1']}}\n",
            "a b",
            "routes.a b",
            "names use letters",
        )

    def test_identity_cert_rules(self) -> None:
        """A certificate rule gives exactly one of cn, dns, uri."""
        text = "identities:\n  x:\n    cert: [{cn: a, dns: b}, {spki: c}]\n"
        errors = self.errors_with("conf.d/zz.yaml", text)
        self.assertProblem(
            errors, "conf.d/zz.yaml", 3, "identities.x.cert[0]", "exactly one of cn, dns, uri"
        )
        self.assertProblem(errors, "conf.d/zz.yaml", 3, "identities.x.cert[1].spki", "unknown key")

    def test_missing_audit(self) -> None:
        """Every gateway keeps an audit log: no audit section is an error naming the main file."""
        self.tree.standard()
        text = self.tree.texts["main.yaml"]
        self.tree.write("main.yaml", text[: text.index("audit:")])
        config, errors, _ = self.tree.check()
        self.assertIsNone(config)
        self.assertProblem(
            errors, "main.yaml", None, "audit", "missing: every gateway keeps an audit log"
        )

    def test_audit_choices(self) -> None:
        """fsync and on_failure take one of their documented values."""
        self.tree.standard()
        text = (
            self.tree.texts["main.yaml"]
            .replace("fsync: always", "fsync: sometimes")
            .replace("on_failure: deny", "on_failure: shrug")
        )
        self.tree.write("main.yaml", text)
        _, errors, _ = self.tree.check()
        self.assertProblem(
            errors,
            "main.yaml",
            self.tree.line("main.yaml", "fsync"),
            "audit.fsync",
            "must be one of: always, interval, never",
        )
        self.assertProblem(
            errors,
            "main.yaml",
            self.tree.line("main.yaml", "on_failure"),
            "audit.on_failure",
            "must be one of: deny, allow",
        )

    def test_audit_aggregate_interval(self) -> None:
        """audit.aggregate_interval is a duration, 10s unless said, never zero."""
        self.tree.standard()
        config, errors, _ = self.tree.check()
        self.assertEqual(errors, [])
        assert config is not None
        self.assertEqual(config.audit.aggregate_interval, 10.0)
        text = self.tree.texts["main.yaml"]
        self.tree.write("main.yaml", text.replace("fsync: always", "aggregate_interval: 1m"))
        config, errors, _ = self.tree.check()
        self.assertEqual(errors, [])
        assert config is not None
        self.assertEqual(config.audit.aggregate_interval, 60.0)
        self.tree.write("main.yaml", text.replace("fsync: always", "aggregate_interval: 0s"))
        _, errors, _ = self.tree.check()
        self.assertProblem(
            errors,
            "main.yaml",
            self.tree.line("main.yaml", "aggregate_interval"),
            "audit.aggregate_interval",
            "must be greater than zero",
        )

    def test_no_listeners(self) -> None:
        """A configuration without listeners is refused."""
        self.tree.standard()
        text = self.tree.texts["main.yaml"]
        start, end = text.index("listeners:"), text.index("identities:")
        self.tree.write("main.yaml", text[:start] + text[end:])
        _, errors, _ = self.tree.check()
        self.assertProblem(errors, "main.yaml", None, "listeners", "no listeners defined")

    def test_listener_without_tls(self) -> None:
        """Without a top-level tls section, each listener must say tls: false or give its own."""
        self.tree.standard()
        text = self.tree.texts["main.yaml"]
        start, end = text.index("tls:"), text.index("admin:")
        self.tree.write("main.yaml", text[:start] + text[end:])
        _, errors, _ = self.tree.check()
        self.assertProblem(
            errors,
            "main.yaml",
            self.tree.line("main.yaml", "- name: scrape"),
            "listeners[0]",
            "no top-level 'tls' section",
        )

    def test_unknown_protocol(self) -> None:
        """A listener's protocol is one of those the gateway speaks (forward listeners are
        tested in test_forward, tcp listeners in their own tests)."""
        text = """\
            listeners:
              - {name: odd, protocol: [http], endpoint: "tcp:9102"}
            """
        errors = self.errors_with("conf.d/zz.yaml", text)
        problem = self.assertProblem(
            errors, "conf.d/zz.yaml", 2, "listeners[0].protocol", "must be one of: http"
        )
        self.assertIn("forward", problem.message)

    def test_discovery_settings_checked(self) -> None:
        """Provider and selector settings are checked, each problem at its FILE:LINE: key."""
        text = """\
            routes:
              r:
                allow: [ops]
                targets:
                  file_sd: {files: ["targets/nodes.txt"], poll_interval: 0s}
                  dns_srv: {names: ["bad name"], servers: ["dns.example.org"]}
                  plugin: {name: no-such-plugin}
                  match: {job: "(unclosed", "bad-label": x}
                  port: 70000
            """
        errors = self.errors_with("conf.d/zz.yaml", text)
        self.assertProblem(
            errors, "conf.d/zz.yaml", 5, "routes.r.targets.file_sd.files[0]", "end in .json"
        )
        self.assertProblem(
            errors, "conf.d/zz.yaml", 5, "routes.r.targets.file_sd.poll_interval", "greater than"
        )
        self.assertProblem(
            errors, "conf.d/zz.yaml", 6, "routes.r.targets.dns_srv.names[0]", "not a DNS name"
        )
        self.assertProblem(
            errors, "conf.d/zz.yaml", 6, "routes.r.targets.dns_srv.servers[0]", "give IP"
        )
        self.assertProblem(
            errors,
            "conf.d/zz.yaml",
            7,
            "routes.r.targets.plugin.name",
            "no discovery plugin named 'no-such-plugin'",
        )
        self.assertProblem(
            errors, "conf.d/zz.yaml", 8, "routes.r.targets.match.job", "not a valid regular"
        )
        self.assertProblem(
            errors, "conf.d/zz.yaml", 8, "routes.r.targets.match.bad-label", "not a valid label"
        )
        self.assertProblem(errors, "conf.d/zz.yaml", 9, "routes.r.targets.port", "port number")

    def test_discovery_providers_loaded(self) -> None:
        """file_sd and dns_srv settings become ProviderSpecs, the selector a Selector."""
        text = """\
            templates:
              discovered: {allow: [ops], keep_meta_labels: true}
            routes:
              r:
                template: discovered
                targets:
                  static: ['a:1']
                  file_sd: ["targets/*.json", "/abs/x.yml"]
                  dns_srv:
                    names: ["_node._tcp.example.org"]
                    servers: ["127.0.0.1:5353", "::1"]
                    refresh_interval: 1m
                  match: {job: node, env: "prod|staging"}
                  address: "{host}:9100"
            """
        self.tree.standard()
        self.tree.write("conf.d/zz.yaml", text)
        config, errors, _ = self.tree.check()
        self.assertEqual(errors, [])
        assert config is not None
        route = config.routes["r"]
        self.assertTrue(route.keep_meta_labels)
        self.assertEqual([t.address for t in route.targets], ["a:1"])
        file_sd, dns_srv = route.providers
        self.assertEqual(file_sd.kind, "file_sd")
        self.assertEqual(
            file_sd.settings["files"],
            (str(self.tree.path("conf.d/targets/*.json")), "/abs/x.yml"),
        )
        self.assertEqual(dns_srv.settings["servers"], (("127.0.0.1", 5353), ("::1", 53)))
        self.assertEqual(dns_srv.settings["refresh_interval"], 60.0)
        self.assertEqual(
            route.selector, Selector({"job": "node", "env": "prod|staging"}, None, "{host}:9100")
        )

    def test_all_errors_collected(self) -> None:
        """check-config reports every independent error, not just the first: three in, three out."""
        text = """\
            routes:
              r:
                allow: [ops]
                timeout: soon
                targets: {static: ['nohost']}
            bogus: 1
            """
        errors = self.errors_with("conf.d/zz.yaml", text)
        self.assertEqual(
            sorted(p.key for p in errors),
            ["bogus", "routes.r.targets.static[0]", "routes.r.timeout"],
        )


class WarningTests(ProblemAssertions):
    """Things that load but deserve a warning."""

    def test_plain_text_listener(self) -> None:
        """A tls: false listener loads with no TLS files, and warns."""
        self.tree.standard()
        self.tree.write(
            "conf.d/zz.yaml",
            "listeners:\n  - name: plain\n    endpoint: 'tcp:8080'\n    tls: false\n",
        )
        config, errors, warnings = self.tree.check()
        self.assertEqual(errors, [])
        assert config is not None
        self.assertIsNone(config.listeners[1].tls)
        problem = self.assertProblem(
            warnings, "conf.d/zz.yaml", 4, "listeners[0].tls", "plain-text listener"
        )
        self.assertEqual(config.warnings, (str(problem),))

    def test_route_without_allow(self) -> None:
        """A route without allow loads (nobody may use it) and warns."""
        self.tree.standard()
        self.tree.write("conf.d/zz.yaml", "routes:\n  closed:\n    targets: {static: ['a:1']}\n")
        config, errors, warnings = self.tree.check()
        self.assertEqual(errors, [])
        assert config is not None
        self.assertEqual(config.routes["closed"].allow, ())
        self.assertProblem(
            warnings, "conf.d/zz.yaml", 2, "routes.closed", "route has no 'allow' list"
        )

    def test_unknown_role_and_readable_key(self) -> None:
        """An unknown role, a credential-less identity and a readable audit key warn."""
        self.tree.standard()
        self.tree.pki.audit_key.chmod(0o644)
        self.tree.write(
            "conf.d/zz.yaml",
            "identities:\n  ghost: {roles: [x]}\n"
            "routes:\n  r: {allow: ['role:nobody'], targets: {static: ['a:1']}}\n",
        )
        config, errors, warnings = self.tree.check()
        self.assertEqual(errors, [])
        self.assertIsNotNone(config)
        self.assertProblem(warnings, "conf.d/zz.yaml", 2, "identities.ghost", "can never match")
        self.assertProblem(
            warnings, "conf.d/zz.yaml", 4, "routes.r.allow", "no identity carries role 'nobody'"
        )
        self.assertProblem(
            warnings,
            "main.yaml",
            self.tree.line("main.yaml", "key_file"),
            "audit.key_file",
            "chmod 600",
        )


class PathResolutionTests(ProblemAssertions):
    """Relative paths resolve against the file that names them."""

    def test_drop_in_in_subdirectory(self) -> None:
        """A drop-in in a subdirectory resolves its own paths and includes against itself."""
        self.tree.standard()
        text = self.tree.texts["main.yaml"]
        self.tree.write(
            "main.yaml",
            text[: text.index("audit:")].replace(
                '"conf.d/*.yaml"', '"conf.d/*.yaml", "team/sub/team.yaml"'
            ),
        )
        keys = self.tree.root / "team" / "sub" / "keys"
        keys.mkdir(parents=True)
        (keys / "audit.key").write_text("k" * 64)
        (keys / "audit.key").chmod(0o600)
        (keys / "upstream-ca.pem").write_bytes(self.tree.pki.ca_cert.read_bytes())
        self.tree.write(
            "team/sub/team.yaml",
            """\
            include: [more.yaml]
            audit: {path: audit.jsonl, key_file: keys/audit.key}
            """,
        )
        self.tree.write(
            "team/sub/more.yaml",
            """\
            routes:
              secure:
                scheme: https
                tls: {ca: keys/upstream-ca.pem, server_name: exporter.internal}
                allow: [ops]
                targets: {static: ['exporter.internal:9100']}
            """,
        )
        config, errors, warnings = self.tree.check()
        self.assertEqual((errors, warnings), ([], []))
        assert config is not None
        sub = self.tree.root / "team" / "sub"
        self.assertEqual(config.audit.path, sub / "audit.jsonl")
        self.assertEqual(config.audit.key_file, keys / "audit.key")
        self.assertEqual(config.routes["secure"].upstream_tls.ca, keys / "upstream-ca.pem")
        self.assertIn(sub / "more.yaml", config.files)

    def test_include_cycle(self) -> None:
        """Files including each other are each read once."""
        self.tree.standard()
        self.tree.write("conf.d/a.yaml", "include: [b.yaml]\n")
        self.tree.write("conf.d/b.yaml", "include: [a.yaml, ../main.yaml]\n")
        config, errors, _ = self.tree.check()
        self.assertEqual(errors, [])
        assert config is not None
        self.assertEqual(len(config.files), len(set(config.files)))

    def test_home_of_unknown_user(self) -> None:
        """A path starting ~nosuchuser is taken literally, not a crash."""
        self.tree.standard()
        self.tree.write("conf.d/zz.yaml", "include: ['~no-such-user-promgate/x.yaml']\n")
        _, errors, _ = self.tree.check()
        self.assertProblem(errors, "conf.d/zz.yaml", 1, "include[0]", "does not exist")


#: JSON-ish values to put where the configuration expects something else.
_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**20), 10**20),
        st.floats(),
        st.text(max_size=20),
        st.sampled_from(
            ["", "~x/y", "a:0", "[::1]:1", "tcp:", "tcp:1\\", "role:", "/", "0s", "1/s"]
        ),
    ),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


class FuzzTests(SynchronousTestCase):
    """Hypothesis: whatever value sits at any key of a configuration, loading reports
    problems and never crashes."""

    BASE: dict[str, Any] = {
        "listeners": [
            {
                "name": "scrape",
                "protocol": "http",
                "endpoint": "tcp:9443",
                "advertise": "g:1",
                "tls": False,
            }
        ],
        "identities": {"p": {"cert": [{"uri": "spiffe://d/p"}], "roles": ["scraper"]}},
        "templates": {
            "t": {
                "allow": ["role:scraper"],
                "timeout": "10s",
                "limits": {"rate": "5/s", "burst": 10, "per": "identity", "max_concurrent": 3},
            }
        },
        "routes": {
            "r": {
                "template": "t",
                "scheme": "http",
                "metrics_path": "/m",
                "paths": ["/m", "/n"],
                "params": ["module"],
                "max_response_size": "1MiB",
                "labels": {"a": "b"},
                "targets": {"static": ["a:1", {"targets": ["b:2"], "labels": {"az": "x"}}]},
            }
        },
        "audit": {
            "path": "audit.jsonl",
            "key_file": "audit.key",
            "fsync": "interval",
            "fsync_interval": "1s",
            "on_failure": "deny",
            "max_field_length": 100,
        },
    }

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir()
        (self.root / "audit.key").write_text("k" * 64)
        (self.root / "audit.key").chmod(0o600)

    def test_base_is_valid(self) -> None:
        """The fuzzed configuration is valid before it is fuzzed."""
        path = self.root / "c.yaml"
        path.write_text(json.dumps(self.BASE))
        config, errors, _ = check_config(path)
        self.assertEqual(errors, [])
        self.assertIsNotNone(config)

    @settings(max_examples=150)
    @given(st.data(), _values)
    def test_never_crashes(self, data: st.DataObject, value: Any) -> None:
        """Replacing or deleting any one value yields a config or problems, never an exception."""
        config = copy.deepcopy(self.BASE)
        paths: list[tuple[Any, ...]] = []

        def walk(node: Any, prefix: tuple[Any, ...]) -> None:
            items = (
                node.items()
                if isinstance(node, dict)
                else enumerate(node)
                if isinstance(node, list)
                else ()
            )
            for k, v in items:
                paths.append((*prefix, k))
                walk(v, (*prefix, k))

        walk(config, ())
        path = data.draw(st.sampled_from(paths))
        parent = config
        for k in path[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        file = self.root / "c.yaml"
        file.write_text(json.dumps(config))
        loaded, errors, warnings = check_config(file)
        self.assertEqual(loaded is None, bool(errors))
        for problem in errors + warnings:
            self.assertEqual(problem.file, file)
            self.assertIsInstance(str(problem), str)


class UnitsTests(SynchronousTestCase):
    """Durations, sizes and rates are written the Prometheus way and parsed strictly."""

    def test_durations(self) -> None:
        """Prometheus durations, including compound ones and milliseconds."""
        for text, seconds in [
            ("30s", 30.0),
            ("5m", 300.0),
            ("1h30m", 5400.0),
            ("1m30s", 90.0),
            ("250ms", 0.25),
            ("1d", 86400.0),
            ("1w", 604800.0),
            ("1y", 365 * 86400.0),
            ("2h5ms", 7200.005),
            ("0s", 0.0),
        ]:
            self.assertAlmostEqual(parse_duration(text), seconds, msg=text)

    def test_bad_durations(self) -> None:
        """Bare numbers, wrong order, unknown units, spaces and signs are refused."""
        for text in ["", "30", "s", "1.5s", "-1s", "5m1h", "1 m", "1M", "3 minutes", "1s1s", "+1s"]:
            self.assertRaises(ValueError, parse_duration, text)
        self.assertRaises(ValueError, parse_duration, 30)

    def test_sizes(self) -> None:
        """Units as Prometheus reads them (KB and KiB are both 1024 bytes), plain integers
        and bytes."""
        for value, size in [
            ("64MiB", 64 * 1024**2),
            ("64MB", 64 * 1024**2),
            ("512KB", 512 * 1024),
            ("1GiB", 1024**3),
            ("1GB", 1024**3),
            ("2TB", 2 * 1024**4),
            ("1EiB", 1024**6),
            ("10B", 10),
            ("10", 10),
            (" 3 KiB ", 3072),
            (4096, 4096),
            (0, 0),
        ]:
            self.assertEqual(parse_size(value), size, value)

    def test_size_limit(self) -> None:
        """A size above the key's limit is refused, and the message names the limit."""
        self.assertEqual(parse_size("4GiB", 4 * 1024**3), 4 * 1024**3)
        for value in ["1EB", "100TB", "4097MiB", 4 * 1024**3 + 1]:
            with self.assertRaises(ValueError) as cm:
                parse_size(value, 4 * 1024**3)
            self.assertIn("larger than the limit of 4GiB", str(cm.exception))

    def test_duration_limit(self) -> None:
        """Durations beyond a year are refused with the limit (a timer cannot be that far)."""
        self.assertEqual(parse_duration("1y"), 365 * 86400.0)
        for text in ["100000y", "1y1ms", "53w"]:
            with self.assertRaises(ValueError) as cm:
                parse_duration(text)
            self.assertIn("longer than the limit of 1y", str(cm.exception))

    def test_bad_sizes(self) -> None:
        """Negative, fractional, boolean and unknown-unit sizes are refused."""
        for value in [-1, True, 1.5, "1.5MiB", "64mb", "64MiBs", "MiB", "", None, [1]]:
            self.assertRaises(ValueError, parse_size, value)

    def test_rates(self) -> None:
        """Rates per second, minute or hour, or a plain positive number per second."""
        self.assertEqual(parse_rate("10/s"), 10.0)
        self.assertEqual(parse_rate("30/m"), 0.5)
        self.assertEqual(parse_rate("1.5 / h"), 1.5 / 3600)
        self.assertEqual(parse_rate(2), 2.0)
        self.assertEqual(parse_rate(0.25), 0.25)

    def test_bad_rates(self) -> None:
        """Zero, negative, infinite, NaN, booleans and unknown periods are refused."""
        for value in [
            "0/s",
            "-1/s",
            "1/d",
            "1",
            "/s",
            "",
            0,
            -2,
            True,
            None,
            math.inf,
            math.nan,
            "1e3/s",
        ]:
            self.assertRaises(ValueError, parse_rate, value)

    @given(st.lists(st.integers(0, 10_000), min_size=7, max_size=7).filter(any))
    def test_duration_round_trip(self, parts: list[int]) -> None:
        """Any composition of units in Prometheus order parses to the sum of its parts, up
        to the one-year limit; beyond it, a refusal."""
        units = ["y", "w", "d", "h", "m", "s", "ms"]
        scale = [365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001]
        text = "".join(f"{n}{u}" for n, u in zip(parts, units, strict=True) if n)
        expected = sum(n * s for n, s in zip(parts, scale, strict=True))
        if expected > 365 * 86400:
            self.assertRaises(ValueError, parse_duration, text)
        else:
            self.assertAlmostEqual(parse_duration(text), expected, places=6)

    @given(
        st.integers(0, 2**40),
        st.sampled_from(["", "B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"]),
    )
    def test_size_round_trip(self, n: int, unit: str) -> None:
        """N followed by a unit is N times the unit's bytes, base 2 as in Prometheus."""
        scale = {
            "": 1,
            "B": 1,
            "KB": 1024,
            "MB": 1024**2,
            "GB": 1024**3,
            "TB": 1024**4,
            "KiB": 1024,
            "MiB": 1024**2,
            "GiB": 1024**3,
            "TiB": 1024**4,
        }
        self.assertEqual(parse_size(f"{n}{unit}"), n * scale[unit])

    @given(st.integers(1, 10**6), st.sampled_from([("s", 1.0), ("m", 60.0), ("h", 3600.0)]))
    def test_rate_round_trip(self, n: int, period: tuple[str, float]) -> None:
        """N/period is N divided by the period's seconds."""
        self.assertEqual(parse_rate(f"{n}/{period[0]}"), n / period[1])

    @given(st.one_of(st.text(max_size=12), st.floats(), st.integers(), st.none(), st.booleans()))
    def test_parsers_total(self, value: Any) -> None:
        """On any input the parsers return a sane value or raise ValueError, nothing else."""
        for parse in (parse_duration, parse_size, parse_rate):
            try:
                result = parse(value)
            except ValueError:
                continue
            self.assertTrue(0 <= result < math.inf, (parse, value, result))
        try:
            rate = parse_rate(value)
        except ValueError:
            return
        self.assertGreater(rate, 0)

    @given(st.text(max_size=24))
    def test_split_address_total(self, text: str) -> None:
        """split_address returns (host, port) with a port in range, or None; never raises."""
        result = split_address(text)
        if result is not None:
            self.assertTrue(0 < result[1] < 65536)
            self.assertTrue(text.isascii())


class CheckConfigCommandTests(ProblemAssertions):
    """``promgate check-config FILE``: exit status and output."""

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = cli.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_valid(self) -> None:
        """A valid configuration exits 0 with a one-line summary on stdout."""
        self.tree.standard()
        main = str(self.tree.path("main.yaml"))
        code, out, err = self.run_cli("check-config", main)
        self.assertEqual(code, 0)
        self.assertEqual(err, "")
        self.assertEqual(
            out,
            f"{main}: OK: 3 file(s), 1 listener(s), 2 identities, 2 route(s), "
            "4 target(s), 0 warning(s)\n",
        )

    def test_warnings(self) -> None:
        """Warnings go to stderr marked (warning); the exit status stays 0."""
        self.tree.standard()
        self.tree.write("conf.d/zz.yaml", "routes:\n  closed:\n    targets: {static: ['a:1']}\n")
        code, out, err = self.run_cli("check-config", str(self.tree.path("main.yaml")))
        self.assertEqual(code, 0)
        self.assertIn("1 warning(s)", out)
        self.assertEqual(
            err,
            f"{self.tree.path('conf.d/zz.yaml')}:2: routes.closed: route has no 'allow' list; "
            "nobody may use it (deny by default) (warning)\n",
        )

    def test_invalid(self) -> None:
        """Invalid: exit 1, each error as FILE:LINE: key: message on stderr, then a count."""
        self.tree.standard()
        zz = self.tree.write(
            "conf.d/zz.yaml",
            "routes:\n  r:\n    allow: [nobody]\n    timeout: 10\n    targets: {static: ['x']}\n",
        )
        main = str(self.tree.path("main.yaml"))
        code, out, err = self.run_cli("check-config", main)
        self.assertEqual(code, 1)
        self.assertEqual(out, "")
        self.assertEqual(
            err.splitlines(),
            [
                f"{zz}:4: routes.r.timeout: expected a duration such as 30s, 5m or 1h30m",
                f"{zz}:5: routes.r.targets.static[0]: "
                "target 'x' must be host:port ([v6]:port for IPv6)",
                f"{zz}:3: routes.r.allow: undefined identity 'nobody'",
                f"{main}: 3 error(s); configuration is NOT valid",
            ],
        )

    def test_missing_file(self) -> None:
        """A configuration file that does not exist exits 1."""
        code, _, err = self.run_cli("check-config", str(self.tree.path("nope.yaml")))
        self.assertEqual(code, 1)
        self.assertIn("cannot read file", err)
        self.assertIn("1 error(s); configuration is NOT valid", err)


class ReservedIdentityNameTests(ProblemAssertions):
    """``none`` and ``unrecognised`` are the metrics' values for callers without an
    identity: a configured identity cannot take them."""

    def test_reserved(self) -> None:
        self.tree.standard()
        for name in ("none", "unrecognised"):
            self.tree.write("conf.d/reserved.yaml", f"identities:\n  {name}: {{roles: [x]}}\n")
            config, errors, _ = self.tree.check()
            self.assertIsNone(config)
            self.assertProblem(
                errors,
                "conf.d/reserved.yaml",
                2,
                f"identities.{name}",
                f"'{name}' is reserved: the metrics' identity label uses it",
            )
