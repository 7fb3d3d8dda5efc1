"""``promgate check-config --resolve``: run discovery once and print every route's targets.

Driven in process through ``promgate.cli.main``. file_sd reads real files; dns_srv asks a
small UDP server on loopback (a thread answering every query with one fixed rcode, or
with SRV records and their glue), so a failing lookup is a quick SERVFAIL, not a timeout.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
from pathlib import Path

from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from promgate import cli
from promgate.testing import TestPKI
from promgate.testing.integration import Shared, workdir

SRV_NAME = "_node._tcp.example.org"
#: The TLS files check-config insists on, made once for every test.
PKI = Shared(lambda: TestPKI(workdir("resolve-pki")))


def resolve(config: Path) -> tuple[int, str, str]:
    """``promgate check-config --resolve CONFIG``; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["check-config", "--resolve", str(config)])
    return code, out.getvalue(), err.getvalue()


class FakeDNS:
    """A DNS server on 127.0.0.1 (UDP) answering from ``srv``, or with ``rcode`` for all."""

    def __init__(self, rcode: int = dns.OK, srv: list[tuple[str, int, str]] = ()) -> None:
        self.rcode = rcode
        self.srv = list(srv)  # (host, port, ip): an SRV record with its A record as glue
        self.queries: list[tuple[str, int]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)  # closing does not wake recvfrom(): poll a flag instead
        self.stopping = threading.Event()
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopping.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.Message()
            query.fromStr(data)
            q = query.queries[0]
            self.queries.append((q.name.name.decode(), q.type))
            answer = dns.Message(id=query.id, answer=1, rCode=self.rcode, recDes=query.recDes)
            answer.queries = query.queries
            if self.rcode == dns.OK and q.type == dns.SRV:
                for host, port, ip in self.srv:
                    answer.answers.append(
                        dns.RRHeader(
                            q.name.name, dns.SRV, ttl=60, payload=dns.Record_SRV(0, 0, port, host)
                        )
                    )
                    answer.additional.append(
                        dns.RRHeader(host, dns.A, ttl=60, payload=dns.Record_A(ip, 60))
                    )
            self.sock.sendto(answer.toStr(), peer)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


class ResolveTests(SynchronousTestCase):
    """What ``check-config --resolve`` prints, and its exit status."""

    def setUp(self) -> None:
        self.pki = PKI.get()
        self.dir = workdir("resolve")
        (self.dir / "targets").mkdir()

    def config(self, routes: str) -> Path:
        pki = self.pki
        path = self.dir / "promgate.yaml"
        path.write_text(
            f"""\
tls: {{certificate: "{pki.gate_cert}", key: "{pki.gate_key}", client_ca: "{pki.ca_cert}"}}
listeners:
  - {{name: scrape, endpoint: "tcp:0:interface=127.0.0.1"}}
identities:
  prometheus: {{cert: {{uri: "spiffe://promgate.local/prometheus"}}}}
routes:
{routes}
audit: {{path: audit.jsonl, key_file: "{pki.audit_key}"}}
"""
        )
        return path

    def write(self, name: str, text: str) -> Path:
        path = self.dir / "targets" / name
        path.write_text(text)
        return path

    def dns(self, **kw: object) -> FakeDNS:
        server = FakeDNS(**kw)  # type: ignore[arg-type]
        self.addCleanup(server.stop)
        return server

    def test_static_and_file_sd(self) -> None:
        """Every route's targets, static first, discovered ones with their labels after the
        selector (match, port rewrite) has had its say; exit 0 and nothing on stderr."""
        a = self.write(
            "a.json",
            json.dumps(
                [
                    {"targets": ["10.0.0.6:9100"], "labels": {"job": "node"}},
                    {"targets": ["10.0.0.9:9100"], "labels": {"job": "other"}},
                ]
            ),
        )
        b = self.write("b.yml", "- targets: ['10.0.0.7:1234']\n  labels: {job: node}\n")
        config = self.config(
            """\
  node:
    allow: [prometheus]
    targets:
      static: ["10.0.0.5:9100"]
      file_sd: {files: ["targets/*.json", "targets/*.yml"], poll_interval: 1s}
      match: {job: node}
      port: 9100
  db:
    allow: [prometheus]
    targets:
      static: ["10.0.1.1:9187", "10.0.1.2:9187"]
  empty:
    allow: [prometheus]
    targets:
      file_sd: ["targets/none-*.json"]
"""
        )
        code, out, err = resolve(config)
        self.assertEqual((code, err), (0, ""), out)
        lines = out.splitlines()
        self.assertIn(": OK: ", lines[0])
        self.assertIn("3 route(s), 3 target(s), 2 discovery provider(s)", lines[0])
        self.assertEqual(
            lines[1:],
            [
                "route db: 2 target(s)",
                "  10.0.1.1:9187",
                "  10.0.1.2:9187",
                "route empty: 0 target(s)",
                "route node: 3 target(s)",
                "  10.0.0.5:9100",
                f"  10.0.0.6:9100  {{__meta_filepath='{a}', job='node'}}",
                f"  10.0.0.7:9100  {{__meta_filepath='{b}', job='node'}}",
            ],
        )

    def test_malformed_file_sd_fails(self) -> None:
        """A file that is not host:port groups: the provider is named on stderr with the file
        and the problem, exit 1; the route's other targets are still printed."""
        self.write("good.json", json.dumps([{"targets": ["10.0.0.6:9100"]}]))
        bad = self.write("bad.json", json.dumps([{"targets": ["no-port-here"]}]))
        config = self.config(
            """\
  node:
    allow: [prometheus]
    targets:
      static: ["10.0.0.5:9100"]
      file_sd: ["targets/*.json"]
"""
        )
        code, out, err = resolve(config)
        self.assertEqual(code, 1, out + err)
        self.assertIn("route node: 2 target(s)\n  10.0.0.5:9100\n  10.0.0.6:9100  {", out)
        self.assertNotIn("no-port-here", out)
        self.assertEqual(err.count("FAILED"), 1, err)
        self.assertIn(f"provider file_sd FAILED: {bad}: group 0 target 0: 'no-port-here'", err)
        self.assertIn("is not host:port", err)

    def test_invalid_syntax_fails(self) -> None:
        """A file_sd YAML file that does not parse fails the same way."""
        bad = self.write("bad.yml", "- targets: [unclosed\n")
        config = self.config(
            """\
  node:
    allow: [prometheus]
    targets:
      file_sd: ["targets/*.yml"]
"""
        )
        code, out, err = resolve(config)
        self.assertEqual(code, 1, out + err)
        self.assertIn("route node: 0 target(s)", out)
        self.assertIn(f"provider file_sd FAILED: {bad}: not valid YAML", err)

    def test_dns_srv(self) -> None:
        """SRV records and their glue become IP:port targets; exit 0."""
        server = self.dns(srv=[("a.example.org", 9100, "10.0.2.1")])
        config = self.config(
            f"""\
  node:
    allow: [prometheus]
    targets:
      dns_srv: {{names: ["{SRV_NAME}"], servers: ["{server.address}"]}}
"""
        )
        code, out, err = resolve(config)
        self.assertEqual((code, err), (0, ""), out)
        self.assertIn(
            "route node: 1 target(s)\n  10.0.2.1:9100  {__meta_dns_name="
            f"'{SRV_NAME}', __meta_dns_srv_record_port='9100', "
            "__meta_dns_srv_record_target='a.example.org'}\n",
            out,
        )
        self.assertIn((SRV_NAME, dns.SRV), server.queries)

    def test_dns_srv_server_failure_fails(self) -> None:
        """A DNS server answering SERVFAIL: the dns_srv provider and the name are on stderr,
        exit 1; the route's static targets are still printed."""
        server = self.dns(rcode=dns.ESERVER)
        config = self.config(
            f"""\
  node:
    allow: [prometheus]
    targets:
      static: ["10.0.0.5:9100"]
      dns_srv: {{names: ["{SRV_NAME}"], servers: ["{server.address}"]}}
"""
        )
        code, out, err = resolve(config)
        self.assertEqual(code, 1, out + err)
        self.assertIn("route node: 1 target(s)\n  10.0.0.5:9100\n", out)
        self.assertIn(f"provider dns_srv FAILED: {SRV_NAME}: DNSServerError", err)
        self.assertTrue(server.queries, "the fake DNS server was never asked")

    def test_dns_srv_nxdomain_is_not_a_failure(self) -> None:
        """NXDOMAIN means the name has no targets, not that discovery failed: exit 0."""
        server = self.dns(rcode=dns.ENAME)
        config = self.config(
            f"""\
  node:
    allow: [prometheus]
    targets:
      static: ["10.0.0.5:9100"]
      dns_srv: {{names: ["{SRV_NAME}"], servers: ["{server.address}"]}}
"""
        )
        code, out, err = resolve(config)
        self.assertEqual((code, err), (0, ""), out)
        self.assertIn("route node: 1 target(s)\n  10.0.0.5:9100\n", out)

    def test_runs_again_in_process(self) -> None:
        """Twice in one process, leaving the global reactor as it found it: --resolve runs
        discovery on a reactor of its own (the global one cannot run again once stopped)."""
        from twisted.internet import reactor

        self.write("a.json", json.dumps([{"targets": ["10.0.0.6:9100"]}]))
        config = self.config(
            """\
  node:
    allow: [prometheus]
    targets:
      file_sd: ["targets/*.json"]
"""
        )
        before = (reactor.running, getattr(reactor, "_startedBefore", None))
        for _ in range(2):
            code, out, err = resolve(config)
            self.assertEqual((code, err), (0, ""), out)
            self.assertIn("route node: 1 target(s)\n  10.0.0.6:9100  {", out)
        self.assertEqual((reactor.running, getattr(reactor, "_startedBefore", None)), before)
