"""Tests for PROXY protocol v2 headers: byte-exact against the specification's layout
(HAProxy proxy-protocol.txt, section 2.2), and read back by Twisted's own v2 parser."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.trial.unittest import SynchronousTestCase

from promgate.net.proxyproto import (
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_PROMGATE_IDENTITY,
    PP2_TYPE_SSL,
    SIGNATURE,
    ProxyHeaderError,
    decode_ssl_tlv,
    decode_v2,
    encode_v2,
    ssl_tlv,
    tlv,
)

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")


class EncodingTests(SynchronousTestCase):
    """Headers built by hand from the specification equal what encode_v2 builds."""

    def test_signature(self) -> None:
        """The twelve-byte signature of section 2.2."""
        self.assertEqual(SIGNATURE, SIG)

    def test_ipv4_without_tlvs(self) -> None:
        """TCP over IPv4: version/command 0x21, family 0x11, 12 address bytes."""
        header = encode_v2(("192.0.2.1", 56324), ("198.51.100.2", 443))
        self.assertEqual(
            header,
            SIG
            + bytes.fromhex("21 11 000c")
            + bytes.fromhex("c0000201 c6336402")
            + bytes.fromhex("dc04 01bb"),
        )

    def test_ipv6_without_tlvs(self) -> None:
        """TCP over IPv6: family 0x21, 36 address bytes."""
        header = encode_v2(("2001:db8::1", 1234), ("2001:db8::2", 80))
        self.assertEqual(
            header,
            SIG
            + bytes.fromhex("21 21 0024")
            + bytes.fromhex("20010db8000000000000000000000001")
            + bytes.fromhex("20010db8000000000000000000000002")
            + bytes.fromhex("04d2 0050"),
        )

    def test_ipv4_with_tlvs(self) -> None:
        """TLVs follow the addresses; the length covers both."""
        header = encode_v2(
            ("10.0.0.1", 1), ("10.0.0.2", 2), [tlv(PP2_TYPE_AUTHORITY, b"a.example")]
        )
        self.assertEqual(
            header,
            SIG
            + bytes.fromhex("21 11 0018")
            + bytes.fromhex("0a000001 0a000002 0001 0002")
            + bytes.fromhex("02 0009")
            + b"a.example",
        )

    def test_ipv6_with_tlvs(self) -> None:
        """IPv6 with promgate's identity TLV (type 0xE0)."""
        header = encode_v2(
            ("::1", 40000), ("::1", 9101), [tlv(PP2_TYPE_PROMGATE_IDENTITY, b"prometheus")]
        )
        self.assertEqual(
            header,
            SIG
            + bytes.fromhex("21 21 0031")
            + bytes(15)
            + b"\x01"
            + bytes(15)
            + b"\x01"
            + bytes.fromhex("9c40 238d")
            + bytes.fromhex("e0 000a")
            + b"prometheus",
        )

    def test_ssl_tlv(self) -> None:
        """PP2_TYPE_SSL: client flags (SSL, certificate on this connection), verify = 0,
        then the version, CN and cipher sub-TLVs."""
        value = ssl_tlv(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", cn="prometheus")
        subs = (
            bytes.fromhex("21 0007")
            + b"TLSv1.3"
            + bytes.fromhex("22 000a")
            + b"prometheus"
            + bytes.fromhex("23 0016")
            + b"TLS_AES_256_GCM_SHA384"
        )
        body = bytes([PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN]) + bytes(4) + subs
        self.assertEqual(value, bytes([0x20]) + len(body).to_bytes(2, "big") + body)
        self.assertEqual(body[0], 0x03)
        client, verify, parsed = decode_ssl_tlv(value[3:])
        self.assertEqual((client, verify), (0x03, 0))
        self.assertEqual(
            parsed,
            [
                (PP2_SUBTYPE_SSL_VERSION, b"TLSv1.3"),
                (PP2_SUBTYPE_SSL_CN, b"prometheus"),
                (PP2_SUBTYPE_SSL_CIPHER, b"TLS_AES_256_GCM_SHA384"),
            ],
        )

    def test_ssl_tlv_unverified_and_minimal(self) -> None:
        """verify is non-zero for an unverified certificate; absent fields are left out."""
        self.assertEqual(
            ssl_tlv(version=None, cipher=None, cn=None, verified=False),
            bytes.fromhex("20 0005 03 00000001"),
        )

    def test_mixed_families_map_ipv4_into_ipv6(self) -> None:
        """An IPv4 client on an IPv6 listener: both as IPv6, the IPv4 one mapped."""
        header = decode_v2(encode_v2(("192.0.2.1", 1), ("2001:db8::2", 2)))
        assert header is not None
        self.assertEqual(header.source, ("::ffff:c000:201", 1))
        self.assertEqual(header.destination, ("2001:db8::2", 2))

    def test_unspec(self) -> None:
        """Without addresses (a UNIX socket listener): family UNSPEC, TLVs only."""
        self.assertEqual(encode_v2(None, None), SIG + bytes.fromhex("21 00 0000"))
        header = encode_v2(None, None, [tlv(0xE0, b"x")])
        self.assertEqual(header, SIG + bytes.fromhex("21 00 0004 e0 0001") + b"x")

    def test_limits(self) -> None:
        """TLV types are one byte, values and the whole payload fit 16 bits."""
        self.assertRaises(ProxyHeaderError, tlv, 256, b"")
        self.assertRaises(ProxyHeaderError, tlv, 0xE0, b"x" * 65536)
        big = [tlv(0xE0, b"x" * 40000), tlv(0xE1, b"y" * 40000)]
        self.assertRaises(ProxyHeaderError, encode_v2, None, None, big)


class DecodingTests(SynchronousTestCase):
    """decode_v2 reads back what encode_v2 writes, and refuses what is not a header."""

    def test_incomplete(self) -> None:
        """Any proper prefix of a header is 'not yet'."""
        header = encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2), [tlv(2, b"abc")])
        for end in range(len(header)):
            self.assertIsNone(decode_v2(header[:end]))

    def test_not_a_header(self) -> None:
        """Other bytes are refused."""
        self.assertRaises(ProxyHeaderError, decode_v2, b"GET / HTTP/1.1\r\n\r\n")
        self.assertRaises(ProxyHeaderError, decode_v2, SIG + b"\x11\x11\x00\x00")
        self.assertRaises(ProxyHeaderError, decode_v2, SIG + b"\x21\x11\x00\x04" + b"\x00" * 4)
        self.assertRaises(ProxyHeaderError, decode_v2, SIG + b"\x21\x00\x00\x02\xe0\x00")


_IPV4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
_IPV6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
_PORTS = st.integers(0, 65535)
_TLVS = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=6)


class RoundTripTests(SynchronousTestCase):
    """Headers for any addresses and TLVs read back the same, by decode_v2 and by
    Twisted's ``twisted.protocols.haproxy`` v2 parser."""

    @given(_IPV4, _PORTS, _IPV4, _PORTS, _TLVS, st.binary(max_size=50))
    def test_ipv4(
        self,
        src: str,
        sport: int,
        dst: str,
        dport: int,
        tlvs: list[tuple[int, bytes]],
        after: bytes,
    ) -> None:
        """IPv4 addresses, any TLVs, and the bytes that follow the header."""
        header = encode_v2((src, sport), (dst, dport), [tlv(k, v) for k, v in tlvs])
        parsed = decode_v2(header + after)
        assert parsed is not None
        self.assertEqual(
            (parsed.command, parsed.source, parsed.destination, list(parsed.tlvs), parsed.size),
            ("PROXY", (src, sport), (dst, dport), tlvs, len(header)),
        )
        info, rest = V2Parser().feed(header + after)
        assert info is not None
        self.assertEqual(info.source, IPv4Address("TCP", src, sport))
        self.assertEqual(info.destination, IPv4Address("TCP", dst, dport))
        self.assertEqual(rest, after)

    @given(_IPV6, _PORTS, _IPV6, _PORTS, _TLVS)
    def test_ipv6(
        self, src: str, sport: int, dst: str, dport: int, tlvs: list[tuple[int, bytes]]
    ) -> None:
        """IPv6 addresses (Twisted spells them uncompressed: compare as addresses)."""
        header = encode_v2((src, sport), (dst, dport), [tlv(k, v) for k, v in tlvs])
        parsed = decode_v2(header)
        assert parsed is not None
        self.assertEqual((parsed.source, parsed.destination), ((src, sport), (dst, dport)))
        self.assertEqual(list(parsed.tlvs), tlvs)
        info, rest = V2Parser().feed(header)
        assert info is not None
        assert isinstance(info.source, IPv6Address) and isinstance(info.destination, IPv6Address)
        self.assertEqual(ipaddress.IPv6Address(info.source.host), ipaddress.IPv6Address(src))
        self.assertEqual(ipaddress.IPv6Address(info.destination.host), ipaddress.IPv6Address(dst))
        self.assertEqual((info.source.port, info.destination.port), (sport, dport))
        self.assertEqual(rest, b"")

    def test_gateway_header(self) -> None:
        """A header as a terminate-mode listener sends it, read back TLV by TLV."""
        header = encode_v2(
            ("127.0.0.1", 50000),
            ("127.0.0.1", 9101),
            [
                tlv(PP2_TYPE_AUTHORITY, b"node.example.org"),
                ssl_tlv(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", cn="prometheus"),
                tlv(PP2_TYPE_PROMGATE_IDENTITY, b"prometheus"),
            ],
        )
        parsed = decode_v2(header)
        assert parsed is not None
        self.assertEqual(parsed.tlv(PP2_TYPE_AUTHORITY), b"node.example.org")
        self.assertEqual(parsed.tlv(PP2_TYPE_PROMGATE_IDENTITY), b"prometheus")
        ssl_value = parsed.tlv(PP2_TYPE_SSL)
        assert ssl_value is not None
        client, verify, _ = decode_ssl_tlv(ssl_value)
        self.assertEqual((client & PP2_CLIENT_CERT_CONN, verify), (PP2_CLIENT_CERT_CONN, 0))
        self.assertIsNone(parsed.tlv(0x05))
