"""The one place addresses are split and spelled: ``promgate.addresses``."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from promgate.addresses import address_parts, host_port, peer_address


class HostPortTests(SynchronousTestCase):
    """``host_port`` brackets an IPv6 address exactly once."""

    def test_spellings(self) -> None:
        self.assertEqual(host_port("10.0.0.5", 9100), "10.0.0.5:9100")
        self.assertEqual(host_port("node.example.org", 9100), "node.example.org:9100")
        self.assertEqual(host_port("2001:db8::1", 9100), "[2001:db8::1]:9100")
        self.assertEqual(host_port("[2001:db8::1]", 9100), "[2001:db8::1]:9100")


class AddressPartsTests(SynchronousTestCase):
    """``address_parts`` splits at the last colon and checks nothing."""

    def test_parts(self) -> None:
        self.assertEqual(address_parts("10.0.0.5:9100"), ("10.0.0.5", "9100"))
        self.assertEqual(address_parts("[2001:db8::1]:9100"), ("[2001:db8::1]", "9100"))
        self.assertEqual(address_parts("node"), ("", "node"))
        self.assertEqual(address_parts("node:x"), ("node", "x"))

    def test_round_trip(self) -> None:
        """Parts put back together with ``host_port`` give the address again."""
        for text in ("10.0.0.5:9100", "[2001:db8::1]:9100", "a.example.org:1"):
            host, port = address_parts(text)
            self.assertEqual(host_port(host, int(port)), text)


class PeerAddressTests(SynchronousTestCase):
    """Twisted addresses as operators write them."""

    def test_peers(self) -> None:
        self.assertEqual(peer_address(IPv4Address("TCP", "127.0.0.1", 4000)), "127.0.0.1:4000")
        self.assertEqual(peer_address(IPv6Address("TCP", "::1", 4000)), "[::1]:4000")
        self.assertEqual(peer_address(UNIXAddress(b"/run/gate.sock")), "/run/gate.sock")
