"""Integration: the real ``twistd promgate`` on 127.0.0.1, probed with ``openssl s_client``
and ``curl``: the key exchange groups it accepts, the chain it sends, the alert a client
certificate without clientAuth gets (and the audit record of it), and a certificate whose
SPIFFE ID is invalid.

The scenario runs once (trial has no class-level fixtures): it starts the gateway, runs
every client, stops the gateway, and the tests then read what each client printed and what
the audit log holds. Every client run is bounded by a timeout; nothing waits on a sleep.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from promgate.testing import FakeExporter, GatewayProcess, TestPKI, https_get

#: Bound on every client run (a refused handshake ends at once; this only stops a hang).
CLIENT_TIMEOUT = 30

_cleanups: list[Callable[[], object]] = []


@atexit.register
def _run_cleanups() -> None:
    while _cleanups:
        with contextlib.suppress(Exception):
            _cleanups.pop()()


def _q(value: object) -> str:
    """A YAML scalar (JSON is YAML) for paths interpolated into the configuration."""
    return json.dumps(str(value))


class Ran:
    """What one client command printed and how it exited."""

    def __init__(self, argv: Sequence[str], stdin: bytes) -> None:
        done = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            timeout=CLIENT_TIMEOUT,
            check=False,
        )
        self.argv = list(argv)
        self.status = done.returncode
        self.output = (done.stdout + done.stderr).decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"{' '.join(self.argv)} -> {self.status}\n{self.output}"


class TLSScenario:
    """The gateway and every client run against it, then its audit log."""

    def __init__(self) -> None:
        if shutil.which("openssl") is None or shutil.which("curl") is None:
            raise SkipTest("needs the openssl and curl commands")
        self.dir = Path(tempfile.mkdtemp(prefix="tls-", dir=os.getcwd()))
        pki = self.pki = TestPKI(self.dir / "pki")
        self.prometheus = pki.client("prometheus", uris=["spiffe://promgate.local/ns/prometheus"])
        self.noeku = self.dir / "pki" / "noeku.pem", self.dir / "pki" / "noeku-key.pem"
        pki.ca.issue_client("noeku", client_auth=False).write(*self.noeku)
        self.dotdot = self.dir / "pki" / "dotdot.pem", self.dir / "pki" / "dotdot-key.pem"
        pki.ca.issue_client("dotdot", uris=["spiffe://promgate.local/x/../prometheus"]).write(
            *self.dotdot
        )
        self.exporter = FakeExporter({"/metrics": b"up 1\n"})
        _cleanups.append(self.exporter.stop)
        self.audit_log = self.dir / "audit.jsonl"
        config = f"""
tls: {{certificate: {_q(pki.gate_cert)}, key: {_q(pki.gate_key)}, client_ca: {_q(pki.ca_cert)}}}
admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
listeners:
  - {{name: scrape, endpoint: "tcp:0:interface=127.0.0.1"}}
identities:
  prometheus: {{cert: {{uri: "spiffe://promgate.local/*/prometheus"}}, roles: [scraper]}}
  by-cn: {{cert: {{cn: dotdot}}, roles: [scraper]}}
routes:
  node: {{allow: ["role:scraper"], targets: {{static: ["{self.exporter.address}"]}}}}
# Refused handshakes are counted one by one: no two folded into one counted record.
audit: {{path: {_q(self.audit_log)}, key_file: {_q(pki.audit_key)}, aggregate_interval: 1ms}}
"""
        gateway = self.gateway = GatewayProcess(self.dir / "gateway", config)
        _cleanups.append(gateway.stop)
        gateway.start()
        self.address = gateway.address("scrape")
        self.scrape = f"/scrape?route=node&target={self.exporter.address.replace(':', '%3A')}"

        self.groups = {
            (version, group): self.s_client(self.prometheus, version, "-groups", group)
            for version in ("-tls1_3", "-tls1_2")
            for group in ("X25519", "P-256", "P-384", "X448", "P-521")
        }
        self.chain = self.s_client(self.prometheus, "-tls1_3", "-showcerts")
        self.noeku_s_client = {
            version: self.s_client(self.noeku, version) for version in ("-tls1_3", "-tls1_2")
        }
        self.noeku_curl = self.curl(self.noeku)
        self.prometheus_curl = self.curl(self.prometheus)
        dotdot = ssl.create_default_context(cafile=str(pki.ca_cert))
        dotdot.load_cert_chain(*self.dotdot)
        self.dotdot_scrape = https_get(self.address, self.scrape, dotdot)
        gateway.stop()
        self.records = [
            json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip()
        ]

    def s_client(self, cert: tuple[Path, Path], *options: str) -> Ran:
        """``openssl s_client`` with ``cert``, sending one request and reading until the
        gateway closes (so that a TLS 1.3 refusal, which comes after the handshake, is
        read too)."""
        argv = [
            "openssl",
            "s_client",
            "-connect",
            self.address,
            "-servername",
            "localhost",
            "-CAfile",
            str(self.pki.ca_cert),
            "-verify_return_error",
            "-cert",
            str(cert[0]),
            "-key",
            str(cert[1]),
            "-ign_eof",
            *options,
        ]
        request = b"GET /-/none HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        return Ran(argv, request)

    def curl(self, cert: tuple[Path, Path]) -> Ran:
        argv = [
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            str(CLIENT_TIMEOUT),
            "--cacert",
            str(self.pki.ca_cert),
            "--cert",
            str(cert[0]),
            "--key",
            str(cert[1]),
            f"https://{self.address}{self.scrape}",
        ]
        return Ran(argv, b"")


_SCENARIO: TLSScenario | None = None
_FAILED: str | None = None


def scenario() -> TLSScenario:
    """The scenario, run on first use; a failure is kept and reported to every test."""
    global _SCENARIO, _FAILED
    if _SCENARIO is None:
        if _FAILED is not None:
            raise RuntimeError(f"the scenario failed earlier:\n{_FAILED}")
        try:
            _SCENARIO = TLSScenario()
        except SkipTest:
            raise
        except Exception as e:
            _FAILED = f"{type(e).__name__}: {e}"
            raise
    return _SCENARIO


def _established(ran: Ran) -> bool:
    """Did s_client complete a handshake and get an HTTP answer from the gateway?"""
    return "HTTP/1.1 " in ran.output and "alert" not in ran.output


class GroupsTests(SynchronousTestCase):
    """The gateway accepts X25519, P-256 and P-384 and refuses X448 and P-521."""

    def test_mozilla_groups_accepted(self) -> None:
        """TLS 1.3 with each of X25519, P-256, P-384 alone: a handshake, that group used."""
        s = scenario()
        for group, shown in [
            ("X25519", "X25519"),
            ("P-256", "ECDH, prime256v1"),
            ("P-384", "ECDH, secp384r1"),
        ]:
            ran = s.groups["-tls1_3", group]
            self.assertTrue(_established(ran), ran)
            self.assertIn(f"Server Temp Key: {shown}", ran.output, ran)

    def test_other_groups_refused(self) -> None:
        """X448 alone or P-521 alone, TLS 1.3 or 1.2: a handshake failure, nothing served,
        audited as no_shared_cipher."""
        s = scenario()
        for version in ("-tls1_3", "-tls1_2"):
            for group in ("X448", "P-521"):
                ran = s.groups[version, group]
                self.assertNotEqual(ran.status, 0, ran)
                self.assertNotIn("HTTP/1.1 ", ran.output, ran)
                self.assertIn("handshake failure", ran.output, ran)
        refused = [
            r
            for r in s.records
            if r["event"] == "tls_handshake_failed" and r["reason"] == "no_shared_cipher"
        ]
        self.assertEqual(len(refused), 4, refused)


class ChainTests(SynchronousTestCase):
    """The gateway sends its own certificate only (the client CA issued it: not the CA)."""

    def test_one_certificate_sent(self) -> None:
        """``s_client -showcerts`` shows one certificate, the gateway's, and verifies it."""
        ran = scenario().chain
        self.assertEqual(ran.output.count("-----BEGIN CERTIFICATE-----"), 1, ran)
        self.assertIn("Verify return code: 0 (ok)", ran.output, ran)
        self.assertNotIn("promgate test CA\n-----BEGIN", ran.output)
        self.assertIn("0 s:CN = localhost", ran.output, ran)
        self.assertNotIn("1 s:", ran.output, ran)


class ClientUsageTests(SynchronousTestCase):
    """A client certificate without clientAuth: the ``unsupported certificate`` alert, and
    an audit record with reason certificate_purpose."""

    def test_s_client_sees_the_alert(self) -> None:
        """TLS 1.3 and 1.2: s_client prints the alert's name, not ``internal error``."""
        for version, ran in scenario().noeku_s_client.items():
            self.assertIn("alert unsupported certificate", ran.output, (version, ran))
            self.assertNotIn("internal error", ran.output, (version, ran))
            self.assertNotIn("HTTP/1.1 ", ran.output, (version, ran))

    def test_curl_sees_the_alert(self) -> None:
        """curl's error names the alert; the same curl with a good certificate scrapes."""
        s = scenario()
        self.assertNotEqual(s.noeku_curl.status, 0, s.noeku_curl)
        self.assertIn("alert unsupported certificate", s.noeku_curl.output, s.noeku_curl)
        self.assertEqual((s.prometheus_curl.status, s.prometheus_curl.output), (0, "up 1\n"))

    def test_audited_with_the_precise_reason(self) -> None:
        """Every refusal is a tls_handshake_failed record, reason certificate_purpose,
        naming the certificate."""
        records = [
            r
            for r in scenario().records
            if r["event"] == "tls_handshake_failed" and r.get("cert_subject") == "CN=noeku"
        ]
        self.assertEqual(len(records), 3, records)  # two s_client runs and one curl
        for record in records:
            self.assertEqual(
                (record["reason"], record["decision"]), ("certificate_purpose", "deny")
            )


class SpiffeTests(SynchronousTestCase):
    """A certificate whose SPIFFE ID has a ``..`` segment names nobody, not even by CN."""

    def test_refused_with_detail(self) -> None:
        """The wildcard would match it and a CN rule names it: 403 unknown_identity, and
        the audit record says which URI is invalid and why."""
        s = scenario()
        self.assertEqual(s.dotdot_scrape.status, 403)
        (record,) = [
            r for r in s.records if r["event"] == "request" and r.get("cert_subject") == "CN=dotdot"
        ]
        detail: Any = record["detail"]
        self.assertEqual((record["decision"], record["reason"]), ("deny", "unknown_identity"))
        self.assertIn("'spiffe://promgate.local/x/../prometheus'", detail)
        self.assertIn("not a valid SPIFFE ID: the path has a '..' segment", detail)
