"""Tests for the ClientHello reader: real ClientHellos from Python's ssl module and from
pyOpenSSL round-trip their server name, however they are split into records and reads;
truncated, garbage and oversized input gets a precise refusal, and nothing else ever
escapes the reader."""

from __future__ import annotations

import contextlib
import ssl
import struct

from hypothesis import assume, given
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from promgate.net.sni import (
    MAX_CLIENT_HELLO,
    NEED_MORE,
    ClientHello,
    ClientHelloError,
    read_client_hello,
)
from promgate.testing.hello import python_client_hello

# -- real ClientHellos -------------------------------------------------------------------------


_PYOPENSSL_CONTEXT = SSL.Context(SSL.TLS_METHOD)


def pyopenssl_client_hello(server_name: bytes | None) -> bytes:
    """The first flight of a pyOpenSSL client with ``set_tlsext_host_name``."""
    conn = SSL.Connection(_PYOPENSSL_CONTEXT, None)
    if server_name is not None:
        conn.set_tlsext_host_name(server_name)
    conn.set_connect_state()
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    data: bytes = conn.bio_read(65536)
    return data


# -- hand-built ClientHellos, for the structural cases ---------------------------------------------


def vec(length_bytes: int, data: bytes) -> bytes:
    return len(data).to_bytes(length_bytes, "big") + data


def sni_extension(*names: tuple[int, bytes]) -> bytes:
    body = b"".join(bytes([kind]) + vec(2, name) for kind, name in names)
    return struct.pack("!H", 0) + vec(2, vec(2, body))


def hello_body(extensions: bytes | None, *, version: int = 0x0303, session: bytes = b"") -> bytes:
    body = struct.pack("!H", version) + b"\x11" * 32 + vec(1, session)
    body += vec(2, b"\x13\x01\x13\x02") + vec(1, b"\x00")
    if extensions is not None:
        body += vec(2, extensions)
    return body


def handshake(body: bytes, kind: int = 1) -> bytes:
    return bytes([kind]) + len(body).to_bytes(3, "big") + body


def records(
    message: bytes, sizes: list[int] | None = None, *, version: bytes = b"\x03\x01"
) -> bytes:
    """``message`` in handshake records of the given sizes (one record if None)."""
    out = b""
    pos = 0
    for size in sizes or [len(message)]:
        if pos >= len(message):
            break
        chunk = message[pos : pos + size]
        out += b"\x16" + version + struct.pack("!H", len(chunk)) + chunk
        pos += size
    if pos < len(message):
        chunk = message[pos:]
        out += b"\x16" + version + struct.pack("!H", len(chunk)) + chunk
    return out


def built(server_name: bytes | None = b"a.example.org", extra: bytes = b"") -> bytes:
    ext = (sni_extension((0, server_name)) if server_name is not None else b"") + extra
    return records(handshake(hello_body(ext)))


def resplit(first_flight: bytes, sizes: list[int]) -> bytes:
    """Take the handshake message out of its record and re-frame it in records of
    ``sizes`` (a ClientHello split over several records, as TLS allows)."""
    length = struct.unpack("!H", first_flight[3:5])[0]
    return records(first_flight[5 : 5 + length], sizes)


DNS_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
#: DNS names; clients send no SNI for an IP address, so names ending in a number are left out.
SERVER_NAMES = (
    st.lists(DNS_LABEL, min_size=1, max_size=5)
    .map(".".join)
    .filter(lambda name: not name.rpartition(".")[2].isdigit())
)


class RealClientHelloTests(SynchronousTestCase):
    """What real TLS clients send is read back exactly."""

    def assertName(self, data: bytes, name: str | None) -> None:
        hello = read_client_hello(data)
        self.assertEqual(hello, ClientHello(name, len(data)))

    def test_python_tls13(self) -> None:
        """A Python ssl client (TLS 1.3 and 1.2 offered) names its server."""
        self.assertName(python_client_hello("metrics.example.org"), "metrics.example.org")

    def test_python_tls12_only(self) -> None:
        """A TLS 1.2-only client's ClientHello reads the same."""
        data = python_client_hello("node.example.org", maximum=ssl.TLSVersion.TLSv1_2)
        self.assertName(data, "node.example.org")

    def test_python_with_alpn(self) -> None:
        """ALPN and the other extensions around the server name are skipped correctly."""
        data = python_client_hello("a.example.org", alpn=["h2", "http/1.1"])
        self.assertName(data, "a.example.org")

    def test_python_without_server_name(self) -> None:
        """A client that sends no SNI: a ClientHello with no server name."""
        self.assertName(python_client_hello(None), None)

    def test_server_name_is_lower_cased(self) -> None:
        """Server names compare case-insensitively: the reader lower-cases them."""
        self.assertName(python_client_hello("Mixed.Example.ORG"), "mixed.example.org")

    def test_pyopenssl(self) -> None:
        """A pyOpenSSL client's server name round-trips."""
        self.assertName(pyopenssl_client_hello(b"b.example.org"), "b.example.org")

    def test_pyopenssl_without_server_name(self) -> None:
        """pyOpenSSL without set_tlsext_host_name: no server name."""
        self.assertName(pyopenssl_client_hello(None), None)

    def test_bytes_after_the_client_hello(self) -> None:
        """Bytes that follow the ClientHello (early data, say) are not counted in ``size``."""
        data = python_client_hello("a.example.org")
        hello = read_client_hello(data + b"\x17\x03\x03\x00\x05hello")
        self.assertEqual(hello, ClientHello("a.example.org", len(data)))

    def test_every_prefix_needs_more(self) -> None:
        """Every proper prefix of a real ClientHello asks for more bytes; with ``complete``
        (the client closed) it is refused as truncated."""
        data = python_client_hello("a.example.org")
        for end in range(len(data)):
            self.assertIs(read_client_hello(data[:end]), NEED_MORE, end)
            with self.assertRaises(ClientHelloError) as cm:
                read_client_hello(data[:end], complete=True)
            self.assertEqual(cm.exception.reason, "client_hello_truncated")

    @given(SERVER_NAMES)
    def test_python_round_trip(self, name: str) -> None:
        """Any DNS name a Python client sends is the name read back."""
        assume(len(name) <= 253)
        self.assertName(python_client_hello(name), name)

    @given(SERVER_NAMES)
    def test_pyopenssl_round_trip(self, name: str) -> None:
        """Any DNS name a pyOpenSSL client sends is the name read back."""
        assume(len(name) <= 253)
        self.assertName(pyopenssl_client_hello(name.encode("ascii")), name)

    @given(st.lists(st.integers(1, 300), min_size=1, max_size=40), st.data())
    def test_split_over_records_and_reads(self, sizes: list[int], data: st.DataObject) -> None:
        """The ClientHello split over several records, and the bytes delivered in pieces:
        NEED_MORE until the last record is complete, then the same name."""
        wire = resplit(python_client_hello("split.example.org"), sizes)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
        for cut in cuts:
            if cut < len(wire):
                self.assertIs(read_client_hello(wire[:cut]), NEED_MORE)
        self.assertEqual(read_client_hello(wire), ClientHello("split.example.org", len(wire)))


class RefusalTests(SynchronousTestCase):
    """Each kind of bad input gets its own reason, as early as the bytes show it."""

    def assertRefused(self, data: bytes, reason: str, **kw: bool) -> ClientHelloError:
        with self.assertRaises(ClientHelloError) as cm:
            read_client_hello(data, **kw)
        self.assertEqual(cm.exception.reason, reason, cm.exception.detail)
        self.assertTrue(cm.exception.detail)
        return cm.exception

    def test_plain_http(self) -> None:
        """An HTTP request is named as such, from its very first byte."""
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "plain_http")
        self.assertRefused(b"G", "plain_http")

    def test_not_tls(self) -> None:
        """An SSH banner, or anything not starting a handshake record, is not TLS."""
        self.assertRefused(b"SSH-2.0-OpenSSH_9.2\r\n", "not_tls")
        self.assertRefused(b"\x00", "not_tls")

    def test_sslv2(self) -> None:
        """An SSL 2.0-style ClientHello is recognised and refused."""
        self.assertRefused(b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10", "sslv2")

    def test_record_version(self) -> None:
        """A handshake record whose version is not 3.x is refused at its second byte."""
        self.assertRefused(b"\x16\x02", "malformed_client_hello")
        self.assertRefused(b"\x16\x03\x09", "malformed_client_hello")

    def test_record_lengths(self) -> None:
        """Empty records and records over 2^14 bytes are refused."""
        self.assertRefused(b"\x16\x03\x01\x00\x00", "malformed_client_hello")
        self.assertRefused(b"\x16\x03\x01\x40\x01", "malformed_client_hello")

    def test_not_a_client_hello(self) -> None:
        """A handshake record holding another message (a ServerHello) is refused at once."""
        self.assertRefused(b"\x16\x03\x03\x00\x40\x02", "malformed_client_hello")

    def test_huge_message_refused_early(self) -> None:
        """A ClientHello announcing more than the cap is refused from its header alone."""
        self.assertRefused(b"\x16\x03\x01\x00\x04\x01\x01\x00\x00", "client_hello_too_large")

    def test_too_many_records(self) -> None:
        """A ClientHello spread over records past the cap is refused before the cap."""
        message = handshake(
            hello_body(sni_extension((0, b"a.example.org")) + b"\x00\x15" + vec(2, b"\x00" * 14000))
        )
        self.assertLess(len(message), MAX_CLIENT_HELLO)
        wire = records(message, [10] * 2000)
        self.assertGreater(len(wire), MAX_CLIENT_HELLO)
        self.assertRefused(wire, "client_hello_too_large")
        self.assertRefused(wire, "client_hello_too_large", complete=True)

    def test_other_record_in_between(self) -> None:
        """An alert record between the fragments of a ClientHello is refused."""
        wire = resplit(built(), [20])
        first_len = 5 + 20
        mixed = wire[:first_len] + b"\x15\x03\x03\x00\x02\x02\x28" + wire[first_len:]
        self.assertRefused(mixed, "malformed_client_hello")

    def test_duplicate_extension(self) -> None:
        """Two server_name extensions: malformed."""
        self.assertRefused(
            built(extra=sni_extension((0, b"b.example.org"))), "malformed_client_hello"
        )

    def test_two_names(self) -> None:
        """A server_name list with two host names: malformed (RFC 6066)."""
        ext = sni_extension((0, b"a.example.org"), (0, b"b.example.org"))
        self.assertRefused(records(handshake(hello_body(ext))), "malformed_client_hello")

    def test_unknown_name_type(self) -> None:
        """A name of a type other than host_name: malformed."""
        ext = sni_extension((1, b"a.example.org"))
        self.assertRefused(records(handshake(hello_body(ext))), "malformed_client_hello")

    def test_bad_server_name(self) -> None:
        """Names that are not DNS names (spaces, NUL, non-ASCII, empty labels) are refused."""
        for name in (b"a b.example", b"a\x00.example", "\u00e9.example".encode(), b"a..b", b""):
            self.assertRefused(built(name), "bad_server_name")

    def test_no_extensions(self) -> None:
        """A ClientHello without any extensions block is valid and names no server."""
        wire = records(handshake(hello_body(None)))
        self.assertEqual(read_client_hello(wire), ClientHello(None, len(wire)))

    def test_structure_errors(self) -> None:
        """Broken inner structure: each refused as malformed, never an IndexError."""
        cases = [
            hello_body(b"", version=0x0200),  # not TLS inside
            hello_body(b"", session=b"\x00" * 33),  # session id too long
            hello_body(b"")[:40],  # cut inside the session id/cipher suites
            hello_body(b"") + b"\x00",  # a byte after the extensions
            hello_body(b"\x00\x00\x00\x10"),  # an extension longer than its block
            # a server_name list that claims more bytes than its extension holds
            hello_body(b"\x00\x00" + vec(2, b"\x00\x40\x00\x00\x01a")),
        ]
        for body in cases:
            self.assertRefused(records(handshake(body)), "malformed_client_hello")

    def test_empty_cipher_suites_or_compression(self) -> None:
        """No cipher suites, or no compression methods: malformed."""
        no_suites = (
            struct.pack("!H", 0x0303) + b"\x11" * 32 + b"\x00" + vec(2, b"") + vec(1, b"\x00")
        )
        no_compression = (
            struct.pack("!H", 0x0303) + b"\x11" * 32 + b"\x00" + vec(2, b"\x13\x01") + vec(1, b"")
        )
        for body in (no_suites, no_compression):
            self.assertRefused(records(handshake(body)), "malformed_client_hello")


class PropertyTests(SynchronousTestCase):
    """Whatever the bytes, the reader answers or refuses; it never raises anything else."""

    def check(self, data: bytes) -> None:
        for complete in (False, True):
            try:
                result = read_client_hello(data, complete=complete)
            except ClientHelloError as e:
                self.assertIsInstance(e.reason, str)
                continue
            if complete:
                self.assertIsInstance(result, ClientHello)
            if isinstance(result, ClientHello):
                self.assertLessEqual(result.size, len(data))
                self.assertLessEqual(result.size, MAX_CLIENT_HELLO)

    @given(st.binary(max_size=2048))
    def test_garbage(self, data: bytes) -> None:
        """Arbitrary bytes."""
        self.check(data)

    @given(st.binary(max_size=600))
    def test_garbage_after_a_record_header(self, data: bytes) -> None:
        """Arbitrary bytes behind a plausible handshake record header."""
        self.check(b"\x16\x03\x01" + struct.pack("!H", len(data) or 1) + data)
        self.check(
            b"\x16\x03\x01"
            + struct.pack("!H", len(data) + 4)
            + b"\x01"
            + (len(data)).to_bytes(3, "big")
            + data
        )

    @given(st.data())
    def test_mutated_real_client_hello(self, data: st.DataObject) -> None:
        """A real ClientHello with bytes changed, cut or inserted anywhere."""
        wire = bytearray(python_client_hello("mutant.example.org"))
        for _ in range(data.draw(st.integers(1, 8))):
            pos = data.draw(st.integers(0, len(wire) - 1))
            action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
            if action == "flip":
                wire[pos] = data.draw(st.integers(0, 255))
            elif action == "cut":
                del wire[pos]
            else:
                wire.insert(pos, data.draw(st.integers(0, 255)))
        self.check(bytes(wire))

    @given(st.binary(min_size=1, max_size=64))
    def test_server_name_bytes(self, name: bytes) -> None:
        """Any server name bytes: the name read back is the DNS name sent, or a refusal."""
        try:
            hello = read_client_hello(built(name))
        except ClientHelloError as e:
            self.assertEqual(e.reason, "bad_server_name")
            return
        assert isinstance(hello, ClientHello)
        self.assertEqual(hello.server_name, name.decode("ascii").lower().rstrip("."))
