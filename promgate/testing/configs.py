"""A configuration tree for tests: a standard gateway configuration split over drop-in
files, with a test PKI, and assertions on the problems ``check-config`` reports."""

from __future__ import annotations

import textwrap
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from promgate.config.errors import Problem
from promgate.config.loader import check_config
from promgate.config.model import Config
from promgate.testing.pki import TestPKI

__all__ = ["IDENTITIES", "MAIN", "NODE", "ConfigTree", "ProblemAssertions", "line_of"]

MAIN = """\
include: ["conf.d/*.yaml"]
tls:
  certificate: pki/gate.pem
  key: pki/gate-key.pem
  client_ca: pki/ca.pem
admin:
  endpoint: "tcp:9099:interface=127.0.0.1"
listeners:
  - name: scrape
    protocol: http
    endpoint: "tcp:9443"
    advertise: "gate.example.org:9443"
identities:
  prometheus:
    cert: {uri: "spiffe://promgate.local/prometheus"}
    roles: [scraper]
templates:
  exporter:
    scheme: http
    metrics_path: /metrics
    paths: [/metrics, /metrics/extra]
    allow: ["role:scraper"]
    timeout: 10s
    max_response_size: 1MiB
    limits: {rate: "5/s", burst: 10, per: identity_target, max_concurrent: 50}
    labels: {team: infra, env: prod}
audit:
  path: audit.jsonl
  key_file: pki/audit.key
  fsync: always
  on_failure: deny
"""

NODE = """\
routes:
  node:
    template: exporter
    timeout: 5s
    labels: {env: staging}
    targets:
      static:
        - "10.0.0.5:9100"
        - targets: ["[2001:db8::1]:9100", "node-b.example.org:9100"]
          labels: {az: a}
  blackbox:
    metrics_path: /probe
    params: [module]
    allow: [ops]
    targets: {static: ["127.0.0.1:9115"]}
"""

IDENTITIES = """\
identities:
  ops:
    cert:
      - {cn: ops}
      - {dns: ops.example.org}
    roles: [admin]
"""


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """The 1-based line of the ``nth`` line of ``text`` containing ``needle``."""
    found = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    return found[nth - 1]


class ConfigTree:
    """A configuration directory with a test PKI, written file by file."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "conf.d").mkdir(exist_ok=True)
        self.pki = TestPKI(self.root / "pki")
        self.texts: dict[str, str] = {}

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = textwrap.dedent(text)
        path.write_text(text)
        self.texts[name] = text
        return path

    def standard(self) -> ConfigTree:
        self.write("main.yaml", MAIN)
        self.write("conf.d/node.yaml", NODE)
        self.write("conf.d/identities.yaml", IDENTITIES)
        return self

    def path(self, name: str) -> Path:
        return self.root / name

    def line(self, name: str, needle: str, nth: int = 1) -> int:
        return line_of(self.texts[name], needle, nth)

    def check(self, name: str = "main.yaml") -> tuple[Config | None, list[Problem], list[Problem]]:
        return check_config(self.root / name)


class ProblemAssertions(SynchronousTestCase):
    """Shared assertions on the problems a configuration produces."""

    def setUp(self) -> None:
        self.tree = ConfigTree(Path(self.mktemp()))

    def assertProblem(
        self,
        problems: list[Problem],
        name: str | None,
        line: int | None,
        key: str,
        message: str,
    ) -> Problem:
        """Exactly one problem has ``key``; it is in ``name`` at ``line`` and says ``message``;
        it prints as ``FILE:LINE: key: message``."""
        matching = [p for p in problems if p.key == key]
        self.assertEqual(len(matching), 1, f"problems with key {key!r}: {problems}")
        (problem,) = matching
        file = self.tree.path(name) if name is not None else None
        self.assertEqual((problem.file, problem.line), (file, line), str(problem))
        self.assertIn(message, problem.message)
        where = f"{file}:{line}" if line is not None else f"{file}"
        prefix = f"{where}: {key}: " if key else f"{where}: "
        self.assertTrue(str(problem).startswith(prefix), f"{problem!s} vs {prefix}")
        self.assertTrue(str(problem).endswith(problem.message))
        return problem

    def errors_with(self, name: str, text: str) -> list[Problem]:
        """The errors of the standard configuration plus ``name`` containing ``text``."""
        self.tree.standard()
        self.tree.write(name, text)
        config, errors, _ = self.tree.check()
        self.assertIsNone(config)
        self.assertTrue(errors)
        return errors
