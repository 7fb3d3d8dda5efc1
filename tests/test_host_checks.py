"""``promgate check-config`` checks endpoints and the audit path against this host."""

from __future__ import annotations

import io
import socket
import sys
import textwrap
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from promgate import cli
from promgate.config.host_checks import endpoint_findings
from promgate.config.loader import check_config
from promgate.testing import TestPKI


def config_text(endpoint: str, audit_path: str = "audit.jsonl") -> str:
    """A valid configuration but for what is under test."""
    return textwrap.dedent(
        f"""\
        tls: {{certificate: pki/gate.pem, key: pki/gate-key.pem, client_ca: pki/ca.pem}}
        admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
        listeners:
          - name: scrape
            protocol: http
            endpoint: "{endpoint}"
        identities:
          prometheus: {{cert: {{cn: prometheus}}}}
        routes:
          node: {{allow: [prometheus], targets: {{static: ["127.0.0.1:9100"]}}}}
        audit: {{path: "{audit_path}", key_file: pki/audit.key}}
        """
    )


class HostCheckTests(SynchronousTestCase):
    """Each finding carries FILE:LINE: key and says what start-up would run into."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        TestPKI(self.dir / "pki")
        self.main = self.dir / "promgate.yaml"

    def problems(self, text: str) -> tuple[list[str], list[str]]:
        self.main.write_text(text)
        _, errors, warnings = check_config(self.main, host_checks=True)
        return [str(e) for e in errors], [str(w) for w in warnings]

    def test_valid(self) -> None:
        """Port 0 on loopback and a writable audit path: nothing to say."""
        self.assertEqual(self.problems(config_text("tcp:0:interface=127.0.0.1")), ([], []))

    def test_port_overflow(self) -> None:
        """A port number that does not fit is an error at the endpoint's line."""
        errors, _ = self.problems(config_text("tcp:99999999999999999999"))
        self.assertEqual(
            errors,
            [
                f"{self.main}:6: listeners[0].endpoint: "
                "port number 99999999999999999999 must be 0-65535"
            ],
        )

    def test_interface_not_local(self) -> None:
        """An interface that is not an address of this host (TEST-NET-2) is an error."""
        errors, _ = self.problems(config_text("tcp:9443:interface=198.51.100.7"))
        self.assertEqual(
            errors,
            [
                f"{self.main}:6: listeners[0].endpoint: "
                "198.51.100.7:9443: 198.51.100.7 is not an address of this host"
            ],
        )

    def test_unix_folder_missing(self) -> None:
        """A unix socket in a folder that does not exist is an error."""
        errors, _ = self.problems(config_text(f"unix:{self.dir}/nowhere/gate.sock"))
        self.assertEqual(
            errors,
            [
                f"{self.main}:6: listeners[0].endpoint: {self.dir}/nowhere/gate.sock: "
                f"folder {self.dir}/nowhere does not exist"
            ],
        )

    def test_port_in_use_is_a_warning(self) -> None:
        """An address in use is a warning only: it may be this gateway's own, before a
        reload. The configuration stays valid."""
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        errors, warnings = self.problems(config_text(f"tcp:{port}:interface=127.0.0.1"))
        self.assertEqual(errors, [])
        self.assertEqual(len(warnings), 1, warnings)
        self.assertTrue(
            warnings[0].startswith(
                f"{self.main}:6: listeners[0].endpoint: 127.0.0.1:{port}: address already in use"
            ),
            warnings,
        )

    def test_audit_path_is_a_directory(self) -> None:
        """An audit path naming a directory is an error at audit.path."""
        (self.dir / "logs").mkdir()
        errors, _ = self.problems(config_text("tcp:0:interface=127.0.0.1", "logs"))
        self.assertEqual(errors, [f"{self.main}:11: audit.path: {self.dir}/logs is a directory"])

    def test_without_host_checks(self) -> None:
        """Loading for start-up leaves these to the bind, which names the listener."""
        self.main.write_text(config_text("tcp:9443:interface=198.51.100.7"))
        _, errors, _ = check_config(self.main)
        self.assertEqual(errors, [])

    def test_command(self) -> None:
        """``promgate check-config`` runs the host checks and exits 1 on an error."""
        self.main.write_text(config_text("tcp:70000"))
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        self.assertEqual(cli.main(["check-config", str(self.main)]), 1)
        self.assertIn(
            f"{self.main}:6: listeners[0].endpoint: port number 70000 must be 0-65535",
            err.getvalue(),
        )


class FindingTests(SynchronousTestCase):
    """The checks on their own."""

    def test_ipv6_loopback(self) -> None:
        """An IPv6 interface of this host is fine."""
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::1", 0))
        except OSError:
            raise self.skipTest("no IPv6 loopback here") from None
        self.assertEqual(endpoint_findings(r"tcp6:0:interface=\:\:1"), [])
