"""Tests for the upstream relay: response framing, size caps, hop-by-hop headers and pooling."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from promgate.config.model import Route, Target
from promgate.http.upstream import (
    CHUNKED,
    CLOSE,
    LENGTH,
    MAX_RESPONSE_HEAD,
    NONE,
    UpstreamPool,
    UpstreamProtocol,
)

ROUTE = Route("node", (Target("10.0.0.5:9100"),))
TARGET = ROUTE.targets[0]
REQUEST = b"GET /metrics HTTP/1.1\r\nHost: 10.0.0.5:9100\r\n\r\n"

CHUNKED_BODY = (
    b"5;name=value\r\nhello\r\n"
    b"1A\r\n" + b"z" * 26 + b"\r\n"
    b'3;ext;q="a b"\r\n, w\r\n'
    b"0\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n"
)
CHUNKED_PAYLOAD = b"hello" + b"z" * 26 + b", w"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"


class Recorder:
    """An UpstreamHandler that writes down everything it is told, and can release the
    connection when the response ends, as the gateway's exchange does."""

    def __init__(self, release: UpstreamProtocol | None = None) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.details: list[str] = []
        self.release = release

    def upstream_head(
        self, status: int, reason: bytes, headers: bytes, framing: int, length: int
    ) -> None:
        self.events.append(("head", status, reason, headers, framing, length))

    def upstream_data(self, data: bytes) -> None:
        self.events.append(("data", data))

    def upstream_chunked(self, pieces: list[memoryview], size: int) -> None:
        data = b"".join(pieces)
        assert len(data) == size, (len(data), size)
        self.events.append(("data", data))

    def upstream_done(self) -> None:
        self.events.append(("done",))
        if self.release is not None:
            self.release.release()

    def upstream_failed(self, reason: str, detail: str, retryable: bool) -> None:
        self.events.append(("failed", reason, retryable))
        self.details.append(detail)

    # -- views --------------------------------------------------------------------------

    @property
    def head(self) -> tuple[Any, ...]:
        heads = [e for e in self.events if e[0] == "head"]
        assert len(heads) == 1, self.events
        return heads[0]

    @property
    def body(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "data")

    @property
    def ends(self) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] in ("done", "failed")]


class _Base(SynchronousTestCase):
    """A fresh pool, connection and transport per test."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.pool = UpstreamPool(self.clock, idle_timeout=60.0, max_idle_per_key=2)
        self.proto, self.transport = self.connection()

    def connection(self) -> tuple[UpstreamProtocol, StringTransport]:
        proto = UpstreamProtocol(self.pool, (ROUTE.name, TARGET.address))
        transport = StringTransport(lenient=True)
        proto.makeConnection(transport)
        return proto, transport

    def send(
        self,
        proto: UpstreamProtocol | None = None,
        *,
        head_only: bool = False,
        max_body: int = 1 << 20,
        release: bool = True,
    ) -> Recorder:
        proto = proto or self.proto
        rec = Recorder(proto if release else None)
        proto.send(rec, REQUEST, head_only=head_only, max_body=max_body)
        return rec

    def feed(self, *pieces: bytes, proto: UpstreamProtocol | None = None) -> None:
        for piece in pieces:
            if piece:  # transports never deliver empty reads
                (proto or self.proto).dataReceived(piece)

    def assertPooled(self, proto: UpstreamProtocol | None = None) -> None:
        proto = proto or self.proto
        self.assertEqual(self.pool.idle_count(), 1)
        self.assertFalse(self.transport.disconnecting)
        self.assertIs(self.pool.checkout(ROUTE, TARGET), proto)
        self.assertTrue(proto.reused)

    def assertClosed(self) -> None:
        self.assertEqual(self.pool.idle_count(), 0)
        self.assertTrue(self.transport.disconnected, "connection not aborted")


class ContentLengthTests(_Base):
    """Content-Length bodies end exactly at their length, however the bytes arrive."""

    RESPONSE = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world"
    )

    def test_request_written(self) -> None:
        """send() writes the request the gateway built, unchanged."""
        self.send()
        self.assertEqual(self.transport.value(), REQUEST)

    def test_every_split(self) -> None:
        """Split at every byte boundary: one head, the exact body, one end, then pooled."""
        for i in range(len(self.RESPONSE) + 1):
            self.pool = UpstreamPool(self.clock)
            self.proto, self.transport = self.connection()
            rec = self.send()
            self.feed(self.RESPONSE[:i], self.RESPONSE[i:])
            self.assertEqual(
                rec.head, ("head", 200, b"OK", b"Content-Type: text/plain\r\n", LENGTH, 11), i
            )
            self.assertEqual(rec.body, b"hello world", i)
            self.assertEqual(rec.ends, [("done",)], i)
            self.assertEqual(rec.events[-1], ("done",))
            self.assertPooled()

    @given(st.lists(st.integers(0, len(RESPONSE)), max_size=6))
    def test_any_splits(self, cuts: list[int]) -> None:
        """Hypothesis: any way of cutting the response gives the same result."""
        self.pool = UpstreamPool(self.clock)
        self.proto, self.transport = self.connection()
        rec = self.send()
        points = [0, *sorted(cuts), len(self.RESPONSE)]
        self.feed(*(self.RESPONSE[a:b] for a, b in itertools.pairwise(points)))
        self.assertEqual(rec.body, b"hello world")
        self.assertEqual(rec.ends, [("done",)])

    def test_zero_length(self) -> None:
        """Content-Length: 0 ends with the head and the connection is reusable."""
        rec = self.send()
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(rec.events, [("head", 200, b"OK", b"", LENGTH, 0), ("done",)])
        self.assertPooled()

    def test_duplicate_lengths(self) -> None:
        """Two Content-Length fields are refused, even when they agree (as llhttp does)."""
        rec = self.send()
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(rec.events, [("failed", "upstream_malformed", False)])
        self.assertEqual(rec.details, ["more than one Content-Length"])

    def test_reason_phrase(self) -> None:
        """The status code and reason phrase are passed on; a missing reason is empty."""
        rec = self.send()
        self.feed(b"HTTP/1.1 503\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(rec.head[1:3], (503, b""))


class ChunkedTests(_Base):
    """Chunked bodies are decoded: the handler gets the payload, never the upstream's
    chunk sizes, extensions or trailers."""

    def test_payload(self) -> None:
        """The payload is handed on; extensions and trailers are dropped; then pooled."""
        rec = self.send()
        self.feed(CHUNKED_HEAD + CHUNKED_BODY)
        self.assertEqual(
            rec.head, ("head", 200, b"OK", b"Content-Type: text/plain\r\n", CHUNKED, 0)
        )
        self.assertEqual(rec.body, CHUNKED_PAYLOAD)
        self.assertEqual(rec.ends, [("done",)])
        self.assertEqual(rec.events[-1], ("done",))
        self.assertPooled()

    def test_one_byte_at_a_time(self) -> None:
        """Fed one byte at a time, the payload is the same and the body ends once."""
        rec = self.send()
        self.feed(*(bytes([b]) for b in CHUNKED_HEAD + CHUNKED_BODY))
        self.assertEqual(rec.body, CHUNKED_PAYLOAD)
        self.assertEqual(rec.ends, [("done",)])
        self.assertEqual(rec.events[-1], ("done",))
        self.assertPooled()

    def test_one_call_per_read(self) -> None:
        """Every chunk of one read reaches the handler in one call (one write downstream)."""
        rec = self.send()
        self.feed(CHUNKED_HEAD, b"2\r\nab\r\n3\r\ncde\r\n1\r\nf\r\n", b"0\r\n\r\n")
        self.assertEqual(
            [e for e in rec.events if e[0] != "head"], [("data", b"abcdef"), ("done",)]
        )

    @given(st.lists(st.integers(0, len(CHUNKED_BODY)), max_size=8))
    def test_any_splits(self, cuts: list[int]) -> None:
        """Hypothesis: any split of a chunked body gives the same payload."""
        self.pool = UpstreamPool(self.clock)
        self.proto, self.transport = self.connection()
        rec = self.send()
        self.feed(CHUNKED_HEAD)
        points = [0, *sorted(cuts), len(CHUNKED_BODY)]
        self.feed(*(CHUNKED_BODY[a:b] for a, b in itertools.pairwise(points)))
        self.assertEqual(rec.body, CHUNKED_PAYLOAD)
        self.assertEqual(rec.ends, [("done",)])
        self.assertPooled()

    @given(st.lists(st.binary(min_size=1, max_size=40), max_size=5), st.data())
    def test_any_chunks(self, chunks: list[bytes], data: st.DataObject) -> None:
        """Hypothesis: any chunk sizes (upper- or lower-case hex) decode to their payload."""
        body = (
            b"".join(
                (b"%X" if data.draw(st.booleans()) else b"%x") % len(c) + b"\r\n" + c + b"\r\n"
                for c in chunks
            )
            + b"0\r\n\r\n"
        )
        self.pool = UpstreamPool(self.clock)
        self.proto, self.transport = self.connection()
        rec = self.send()
        self.feed(CHUNKED_HEAD + body)
        self.assertEqual(rec.body, b"".join(chunks))
        self.assertEqual(rec.ends, [("done",)])

    def test_bytes_after_terminal_chunk(self) -> None:
        """Bytes after the terminal chunk are not forwarded and the connection is not pooled."""
        rec = self.send()
        self.feed(CHUNKED_HEAD + CHUNKED_BODY + b"HTTP/1.1 200 OK\r\n")
        self.assertEqual(rec.body, CHUNKED_PAYLOAD)
        self.assertEqual(rec.ends, [("done",)])
        self.assertClosed()

    def test_only_terminal_chunk(self) -> None:
        """An empty chunked body is just the terminal chunk: no data, one end."""
        rec = self.send()
        self.feed(CHUNKED_HEAD + b"0\r\n\r\n")
        self.assertEqual((rec.body, rec.ends), (b"", [("done",)]))
        self.assertPooled()

    def test_transfer_encoding_case(self) -> None:
        """Transfer-Encoding is matched case-insensitively."""
        rec = self.send()
        self.feed(b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
        self.assertEqual((rec.body, rec.ends), (b"ok", [("done",)]))


class CloseDelimitedTests(_Base):
    """A body without Content-Length or chunking ends when the upstream closes."""

    HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"

    def test_clean_close_ends(self) -> None:
        """A clean close ends the response; the connection is never pooled."""
        rec = self.send()
        self.feed(self.HEAD + b"abc", b"def")
        self.assertEqual(rec.head[4], CLOSE)
        self.assertEqual(rec.ends, [])
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(rec.body, b"abcdef")
        self.assertEqual(rec.ends, [("done",)])
        self.assertEqual(self.pool.idle_count(), 0)

    def test_reset_fails(self) -> None:
        """A reset mid-body is a failure, never a clean end."""
        rec = self.send()
        self.feed(self.HEAD + b"abc")
        self.proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(rec.ends, [("failed", "upstream_reset", False)])

    def test_length_body_cut_short(self) -> None:
        """A Content-Length body cut short by a clean close is a failure."""
        rec = self.send()
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(rec.ends, [("failed", "upstream_reset", False)])

    def test_close_before_head(self) -> None:
        """A new connection closed before the head is a non-retryable failure."""
        rec = self.send()
        self.feed(b"HTTP/1.1 200")
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(rec.ends, [("failed", "upstream_reset", False)])

    def test_reused_connection_closed_is_retryable(self) -> None:
        """A pooled connection the upstream closed before answering may be retried."""
        rec = self.send()
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertPooled()
        rec = self.send()
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(rec.ends, [("failed", "upstream_reset", True)])

    def test_http10_keep_alive_without_length(self) -> None:
        """An HTTP/1.0 response without a length is close-delimited even if it says keep-alive."""
        rec = self.send()
        self.feed(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\nabc")
        self.assertEqual(rec.head[4], CLOSE)
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((rec.body, rec.ends), (b"abc", [("done",)]))


class MalformedTests(_Base):
    """Malformed responses fail as upstream_malformed and abort the connection."""

    def assertMalformed(self, data: bytes) -> Recorder:
        self.pool = UpstreamPool(self.clock)
        self.proto, self.transport = self.connection()
        rec = self.send()
        self.feed(data)
        self.assertEqual(rec.ends, [("failed", "upstream_malformed", False)], data)
        self.assertTrue(self.transport.disconnected, data)
        self.assertEqual(self.pool.idle_count(), 0)
        return rec

    def test_status_lines(self) -> None:
        """Anything but HTTP/1.x with a three-digit status is refused before any head."""
        for line in (
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 099 X",
            b"HTTP/2 200 OK",
            b"HTTP/1.2 200 OK",
            b"http/1.1 200 OK",
            b"ICY 200 OK",
            b"HTTP/1.1  200 OK",
            b"SSH-2.0-OpenSSH_9.2",
            b"HTTP/1.1 200 O\x00K",
            b"HTTP/1.1 200 O\x1bK",
        ):
            rec = self.assertMalformed(line + b"\r\nContent-Length: 0\r\n\r\n")
            self.assertEqual([e for e in rec.events if e[0] == "head"], [], line)

    def test_header_fields(self) -> None:
        """Header fields with bad names, no colon, folding or control characters are refused."""
        for field in (
            b"X-A : b",
            b"no colon",
            b" folded",
            b"X-A: a\rb",
            b"X-A: a\x00b",
            b"X\x01: b",
        ):
            self.assertMalformed(b"HTTP/1.1 200 OK\r\n" + field + b"\r\nContent-Length: 0\r\n\r\n")

    def test_framing_headers(self) -> None:
        """Bad or conflicting Content-Length and Transfer-Encoding are refused."""
        for fields in (
            b"Content-Length: 5\r\nTransfer-Encoding: chunked",
            b"Transfer-Encoding: chunked\r\nContent-Length: 5",
            b"Content-Length: 5\r\nContent-Length: 6",
            b"Content-Length: -1",
            b"Content-Length: 5x",
            b"Content-Length: 1 2",
            b"Transfer-Encoding: gzip, chunked",
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
            b"Transfer-Encoding: identity",
            b"Transfer-Encoding: chunked, chunked",
            b"Content-Length: 0\r\nContent-Length: 0",
            b"Content-Length: 0x10",
            b"Content-Length: +5",
            b"Content-Length: " + b"9" * 19,
            b"Content-Length: \xd9\xa3",
        ):
            self.assertMalformed(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n\r\n")

    def test_chunk_framing(self) -> None:
        """Bad chunk sizes, bare LF and chunks longer than their size are refused."""
        for body in (
            b"zz\r\n",
            b"-1\r\n",
            b"\r\n",
            b"0x5\r\n",
            b"1234567890abcdef0\r\n",
            b"5\nhello\r\n",
            b"3\r\nabcd\r\n0\r\n\r\n",
            b"3\r\nabc\n0\r\n\r\n",
            b"0\r\nTrailer: x\n\r\n",
            b"5" + b" " * 5000 + b"\r\n",
        ):
            self.assertMalformed(CHUNKED_HEAD + body)

    def test_chunked_quirks(self) -> None:
        """What one parser reads differently from another is refused, never relayed: the
        handler gets no byte of the body that follows, and the detail says what was wrong."""
        for body, detail in (
            (b"5;a=b\rc\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
            (b"5;a\x00\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
            (b"5   \r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
            (b"5 ;a\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
            (b"5; a\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
            (b" 5\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
            (b"+5\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
            (b"5\r\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
            (b"ffffffffffffffff\r\n", "malformed chunk-size line"),
            (b'5;a="b\r\nhello\r\n0\r\n\r\n', "malformed chunk-size line"),
            (b"5\r\nhelloXY0\r\n\r\n", "chunk data not followed by CRLF"),
            (b"5\r\nhello\n0\r\n\r\n", "chunk data not followed by CRLF"),
            (b"0\r\nno colon\r\n\r\n", "malformed trailer field"),
            (b"0\r\nX-A: 1\r\n folded\r\n\r\n", "malformed trailer field"),
            (b"0\r\nX-A : 1\r\n\r\n", "malformed trailer field"),
            (b"0\r\nX-A: a\rb\r\n\r\n", "control character in trailer field"),
            (b"0\r\nX-A: a\x00b\r\n\r\n", "control character in trailer field"),
            (b"0\r\nContent-Length: 5\r\n\r\n", "not allowed as a trailer field"),
            (b"0\r\ntransfer-encoding: chunked\r\n\r\n", "not allowed as a trailer field"),
            (b"0\r\n" + b"X: y\r\n" * 101 + b"\r\n", "more than 100 trailer fields"),
            (b"0\r\nX: " + b"y" * 5000 + b"\r\n\r\n", "line too long"),
        ):
            rec = self.assertMalformed(CHUNKED_HEAD + body)
            self.assertEqual(rec.body, b"", body)
            self.assertEqual(len(rec.details), 1, body)
            self.assertTrue(rec.details[0].startswith("chunked body: "), rec.details)
            self.assertIn(detail, rec.details[0], body)

    def test_interim_response_checked(self) -> None:
        """A 1xx response is dropped, but only after its fields were checked like any."""
        self.assertMalformed(
            b"HTTP/1.1 103 Early Hints\r\nLink </a>\r\n\r\nHTTP/1.1 200 OK\r\n"
            b"Content-Length: 0\r\n\r\n"
        )

    def test_detail_names_the_problem(self) -> None:
        """The failure's detail says precisely what was wrong (for the audit record)."""
        for head, detail in (
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip", "unsupported Transfer-Encoding"),
            (b"HTTP/1.1 200 OK\r\nX-A: a\x00b", "control character in response header"),
            (b"HTTP/1.1 200 OK\r\n folded", "malformed response header field"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked", "both"),
            (b"HTTP/9.9 200 OK", "malformed status line"),
        ):
            rec = self.assertMalformed(head + b"\r\n\r\n")
            self.assertIn(detail, rec.details[0], head)

    def test_switching_protocols(self) -> None:
        """An upstream that tries to switch protocols is refused."""
        self.assertMalformed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")

    def test_head_too_large(self) -> None:
        """A response head that never ends within MAX_RESPONSE_HEAD is refused."""
        self.assertMalformed(b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * MAX_RESPONSE_HEAD)

    def test_too_many_headers(self) -> None:
        """More than 100 response header fields are refused."""
        fields = b"".join(b"X-%d: v\r\n" % i for i in range(101))
        self.assertMalformed(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n")


class SizeCapTests(_Base):
    """Responses over the route's cap fail as response_too_large."""

    def test_content_length_over_cap(self) -> None:
        """A Content-Length over the cap fails before any head reaches the handler."""
        rec = self.send(max_body=10)
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n")
        self.assertEqual(rec.events, [("failed", "response_too_large", False)])
        self.assertTrue(self.transport.disconnected)

    def test_content_length_at_cap(self) -> None:
        """A Content-Length exactly at the cap is fine."""
        rec = self.send(max_body=10)
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789")
        self.assertEqual(rec.ends, [("done",)])

    def test_chunked_over_cap(self) -> None:
        """A chunked body crossing the cap fails mid-body, after the head."""
        rec = self.send(max_body=10)
        self.feed(CHUNKED_HEAD + b"6\r\nabcdef\r\n")
        self.assertEqual(rec.ends, [])
        self.feed(b"6\r\nghijkl\r\n0\r\n\r\n")
        self.assertEqual(rec.head[0], "head")
        self.assertEqual(rec.body, b"abcdef")  # nothing past the cap is handed on
        self.assertEqual(rec.ends, [("failed", "response_too_large", False)])
        self.assertTrue(self.transport.disconnected)

    def test_chunked_at_cap(self) -> None:
        """A chunked payload exactly at the cap is fine (chunk framing does not count)."""
        rec = self.send(max_body=10)
        self.feed(CHUNKED_HEAD + b"5\r\nabcde\r\n5\r\nfghij\r\n0\r\n\r\n")
        self.assertEqual(rec.ends, [("done",)])

    def test_close_delimited_over_cap(self) -> None:
        """A close-delimited body crossing the cap fails."""
        rec = self.send(max_body=4)
        self.feed(b"HTTP/1.1 200 OK\r\n\r\nabcd")
        self.assertEqual(rec.ends, [])
        self.feed(b"e")
        self.assertEqual(rec.ends, [("failed", "response_too_large", False)])
        self.assertEqual(rec.body, b"abcd")


class NoBodyTests(_Base):
    """Interim responses are skipped; HEAD, 204 and 304 responses have no body."""

    def test_interim_responses_skipped(self) -> None:
        """100 and 103 responses before the final one are not passed on."""
        rec = self.send()
        self.feed(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        self.assertEqual(
            rec.events, [("head", 200, b"OK", b"", LENGTH, 2), ("data", b"ok"), ("done",)]
        )

    def test_interim_split(self) -> None:
        """An interim response split across reads is still skipped."""
        rec = self.send()
        self.feed(b"HTTP/1.1 100 Cont", b"inue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(rec.events, [("head", 204, b"No Content", b"", NONE, 0), ("done",)])

    def test_head_response(self) -> None:
        """A HEAD response keeps its Content-Length header but has no body; it is reusable."""
        rec = self.send(head_only=True)
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1234\r\n\r\n")
        self.assertEqual(
            rec.events,
            [
                (
                    "head",
                    200,
                    b"OK",
                    b"Content-Type: text/plain\r\nContent-Length: 1234\r\n",
                    NONE,
                    1234,
                ),
                ("done",),
            ],
        )
        self.assertPooled()

    def test_204_and_304(self) -> None:
        """204 and 304 end with the head, whatever framing headers they carry."""
        for status in (b"204 No Content", b"304 Not Modified"):
            self.pool = UpstreamPool(self.clock)
            self.proto, self.transport = self.connection()
            rec = self.send()
            self.feed(b"HTTP/1.1 " + status + b"\r\nContent-Length: 10\r\n\r\n")
            self.assertEqual(rec.head[4], NONE)
            self.assertEqual(rec.ends, [("done",)])
            self.assertPooled()

    def test_204_with_trailing_bytes(self) -> None:
        """Bytes after a body-less response make the connection unusable."""
        rec = self.send()
        self.feed(b"HTTP/1.1 204 No Content\r\n\r\njunk")
        self.assertEqual(rec.ends, [("done",)])
        self.assertClosed()


class HopByHopTests(_Base):
    """Connection-level headers are removed from what the client sees."""

    def test_removed(self) -> None:
        """Hop-by-hop, Set-Cookie and Proxy-* headers go; end-to-end ones stay, in order."""
        rec = self.send()
        self.feed(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/plain; version=0.0.4\r\n"
            b"Connection: keep-alive\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"Proxy-Authenticate: Basic\r\n"
            b"Proxy-Authorization: Basic x\r\n"
            b"TE: trailers\r\n"
            b"Trailer: X-T\r\n"
            b"Upgrade: h2c\r\n"
            b"Set-Cookie: session=secret\r\n"
            b"set-cookie: other=secret\r\n"
            b"Content-Encoding: gzip\r\n"
            b"Transfer-Encoding: chunked\r\n"
            b"X-Custom: kept\r\n"
            b"\r\n0\r\n\r\n"
        )
        self.assertEqual(
            rec.head[3],
            b"Content-Type: text/plain; version=0.0.4\r\n"
            b"Content-Encoding: gzip\r\nX-Custom: kept\r\n",
        )

    def test_connection_nominated_removed(self) -> None:
        """Headers named in Connection are hop-by-hop too, and are removed."""
        rec = self.send()
        self.feed(
            b"HTTP/1.1 200 OK\r\nConnection: X-Hop, keep-alive\r\nX-Hop: 1\r\n"
            b"X-Kept: 2\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertEqual(rec.head[3], b"X-Kept: 2\r\n")
        self.assertPooled()


class ReuseTests(_Base):
    """Only clean, complete HTTP/1.1 exchanges put a connection back in the pool."""

    OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    def test_clean_response_pooled(self) -> None:
        """A complete keep-alive response: release() pools it; checkout hands it back once."""
        self.send()
        self.feed(self.OK)
        self.assertPooled()
        self.assertIsNone(self.pool.checkout(ROUTE, TARGET))

    def test_second_exchange(self) -> None:
        """A pooled connection carries a second exchange."""
        self.send()
        self.feed(self.OK)
        proto = self.pool.checkout(ROUTE, TARGET)
        assert proto is not None
        self.transport.clear()
        rec = self.send(proto)
        self.assertEqual(self.transport.value(), REQUEST)
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
        self.assertEqual((rec.body, rec.ends), (b"abc", [("done",)]))
        self.assertEqual(self.pool.idle_count(), 1)

    def test_connection_close_not_pooled(self) -> None:
        """Connection: close means the connection is closed after the response."""
        rec = self.send()
        self.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(rec.ends, [("done",)])
        self.assertClosed()

    def test_http10_not_pooled(self) -> None:
        """An HTTP/1.0 response is not reused unless it asks for keep-alive."""
        self.send()
        self.feed(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertClosed()

    def test_connection_tokens(self) -> None:
        """Connection is a list of tokens: ``foo, close`` closes, ``closed`` does not."""
        for field, pooled in (
            (b"Connection: foo, close", False),
            (b"Connection: CLOSE", False),
            (b"Connection: closed", True),
            (b"Connection: x-close-me", True),
        ):
            self.pool = UpstreamPool(self.clock)
            self.proto, self.transport = self.connection()
            self.send()
            self.feed(b"HTTP/1.1 200 OK\r\n" + field + b"\r\nContent-Length: 2\r\n\r\nok")
            self.assertEqual(self.pool.idle_count(), 1 if pooled else 0, field)

    def test_http10_keep_alive_token(self) -> None:
        """HTTP/1.0 is kept only for the ``keep-alive`` token, not for a longer word."""
        self.send()
        self.feed(b"HTTP/1.0 200 OK\r\nConnection: keep-alive-nope\r\nContent-Length: 2\r\n\r\nok")
        self.assertClosed()

    def test_http10_keep_alive_pooled(self) -> None:
        """An HTTP/1.0 response with Connection: keep-alive and a length is reusable."""
        self.send()
        self.feed(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok")
        self.assertPooled()

    def test_extra_bytes_not_pooled(self) -> None:
        """Bytes beyond the Content-Length are dropped and the connection is not reused."""
        rec = self.send()
        self.feed(self.OK + b"HTTP/1.1 200 OK\r\n")
        self.assertEqual(rec.body, b"ok")
        self.assertClosed()

    def test_released_mid_body_closed(self) -> None:
        """Releasing before the response ended closes the connection."""
        self.send(release=False)
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        self.proto.release()
        self.assertClosed()

    def test_idle_connection_gets_bytes(self) -> None:
        """A pooled idle connection that receives unexpected bytes is discarded and aborted."""
        self.send()
        self.feed(self.OK)
        self.assertEqual(self.pool.idle_count(), 1)
        self.feed(b"surprise")
        self.assertClosed()
        self.assertIsNone(self.pool.checkout(ROUTE, TARGET))

    def test_idle_connection_closed(self) -> None:
        """A pooled connection that the upstream closes leaves the pool."""
        self.send()
        self.feed(self.OK)
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.pool.idle_count(), 0)
        self.assertIsNone(self.pool.checkout(ROUTE, TARGET))

    def test_max_idle_per_key(self) -> None:
        """At most max_idle_per_key idle connections are kept per route and target."""
        protos = [self.proto] + [self.connection()[0] for _ in range(2)]
        for proto in protos:
            self.send(proto)
            self.feed(self.OK, proto=proto)
        self.assertEqual(self.pool.idle_count(), 2)
        assert protos[2].transport is not None
        self.assertTrue(protos[2].transport.disconnected)  # type: ignore[attr-defined]
        self.assertIs(self.pool.checkout(ROUTE, TARGET), protos[1])  # most recent first

    def test_checkout_other_key(self) -> None:
        """Connections are pooled per route and target."""
        self.send()
        self.feed(self.OK)
        other = Route("other", (TARGET,))
        self.assertIsNone(self.pool.checkout(other, TARGET))
        self.assertIsNone(self.pool.checkout(ROUTE, Target("10.0.0.6:9100")))

    def test_sweep(self) -> None:
        """The pool's sweeper closes connections idle longer than idle_timeout, on the clock."""
        self.pool.start()
        self.send()
        self.feed(self.OK)
        self.clock.advance(45)
        second, second_transport = self.connection()
        self.send(second)
        self.feed(self.OK, proto=second)
        self.assertEqual(self.pool.idle_count(), 2)
        self.clock.advance(15)  # t=60: idle exactly idle_timeout, not longer
        self.assertEqual(self.pool.idle_count(), 2)
        self.clock.advance(15)  # t=75: the first has been idle 75s
        self.assertEqual(self.pool.idle_count(), 1)
        self.assertTrue(self.transport.disconnected)
        self.assertFalse(second_transport.disconnected)
        self.clock.advance(45)  # t=120: the second has been idle 75s
        self.assertEqual(self.pool.idle_count(), 0)
        self.assertTrue(second_transport.disconnected)
        self.pool.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_closes_idle(self) -> None:
        """Stopping the pool aborts every idle connection."""
        self.pool.start()
        self.send()
        self.feed(self.OK)
        self.pool.stop()
        self.assertClosed()


class FlowControlTests(_Base):
    """pause() and resume() throttle the upstream transport."""

    def test_pause_resume(self) -> None:
        """pause() pauses reading from the upstream, resume() resumes it."""
        self.proto.pause()
        self.assertEqual(self.transport.producerState, "paused")
        self.proto.resume()
        self.assertEqual(self.transport.producerState, "producing")
