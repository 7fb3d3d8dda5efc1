"""Tests for the strict chunked-body decoder: payload out, framing checked and dropped."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from promgate.http.chunked import MAX_LINE, MAX_TRAILERS, ChunkedDecoder, ChunkedError

_TCHAR = st.sampled_from(list(b"!#$%&'*+-.^_`|~09AZaz"))
_TOKEN = st.lists(_TCHAR, min_size=1, max_size=6).map(bytes)
_QUOTED = st.lists(st.sampled_from(list(b"\t !#[]~\x80\xff\\")), max_size=6).map(
    lambda cs: b'"' + bytes(cs).replace(b"\\", b"\\\\") + b'"'
)
_EXTENSION = st.tuples(_TOKEN, st.one_of(st.none(), _TOKEN, _QUOTED)).map(
    lambda kv: b";" + kv[0] + (b"" if kv[1] is None else b"=" + kv[1])
)
_TRAILER = st.tuples(_TOKEN.filter(lambda t: t.lower() != b"te"), _TOKEN).map(
    lambda kv: b"X-" + kv[0] + b": " + kv[1] + b"\r\n"
)


def decode(*pieces: bytes) -> tuple[bytes, ChunkedDecoder]:
    """Feed ``pieces``; the payload, and the decoder (for done and excess)."""
    decoder = ChunkedDecoder()
    out = []
    for piece in pieces:
        out.extend(bytes(view) for view in decoder.feed(piece))
    return b"".join(out), decoder


class DecodeTests(SynchronousTestCase):
    """Valid bodies decode to their payload, however they are cut."""

    def test_simple(self) -> None:
        """Sizes in either case, extensions and trailers: the payload only."""
        payload, decoder = decode(
            b'5;a=b;c;d="x y"\r\nhello\r\nA\r\n0123456789\r\n0;z\r\nX-T: 1\r\nX-U:\r\n\r\n'
        )
        self.assertEqual(payload, b"hello0123456789")
        self.assertTrue(decoder.done)
        self.assertEqual(decoder.excess, 0)

    def test_excess(self) -> None:
        """Bytes after the message are counted, never decoded."""
        payload, decoder = decode(b"2\r\nok\r\n0\r\n\r\nHTTP/1.1", b"more")
        self.assertEqual((payload, decoder.done, decoder.excess), (b"ok", True, 12))

    def test_not_done(self) -> None:
        """Until the empty line after the last chunk, the body is not over."""
        for cut in (b"2\r\nok\r\n", b"2\r\nok\r\n0\r\n", b"2\r\nok\r\n0\r\nX: y\r\n"):
            self.assertFalse(decode(cut)[1].done, cut)

    def test_no_copy(self) -> None:
        """Payload comes back as slices of the bytes fed, not copies."""
        data = b"3\r\nabc\r\n2\r\nde\r\n"
        views = ChunkedDecoder().feed(data)
        self.assertEqual([bytes(v) for v in views], [b"abc", b"de"])
        for view in views:
            self.assertIs(view.obj, data)

    def test_leading_zeros(self) -> None:
        """Leading zeros are hex digits like any other (within the 15-digit cap)."""
        self.assertEqual(decode(b"000000000000002\r\nok\r\n0\r\n\r\n")[0], b"ok")

    @given(
        st.lists(
            st.tuples(st.binary(min_size=1, max_size=30), st.lists(_EXTENSION, max_size=2)),
            max_size=5,
        ),
        st.lists(_TRAILER, max_size=3),
        st.lists(st.integers(0, 400), max_size=8),
    )
    def test_any_body_any_cut(
        self, chunks: list[tuple[bytes, list[bytes]]], trailers: list[bytes], cuts: list[int]
    ) -> None:
        """Hypothesis: valid chunks, extensions and trailers, cut anywhere, decode to the
        payload and end exactly once."""
        body = b"".join(
            b"%x" % len(data) + b"".join(ext) + b"\r\n" + data + b"\r\n" for data, ext in chunks
        )
        body += b"0\r\n" + b"".join(trailers) + b"\r\n"
        points = [0, *sorted(min(c, len(body)) for c in cuts), len(body)]
        payload, decoder = decode(*(body[a:b] for a, b in itertools.pairwise(points)))
        self.assertEqual(payload, b"".join(data for data, _ in chunks))
        self.assertTrue(decoder.done)
        self.assertEqual(decoder.excess, 0)


class RefuseTests(SynchronousTestCase):
    """Anything another parser could read differently is refused, with a precise reason."""

    def assertRefused(self, body: bytes, message: str) -> None:
        for pieces in ((body,), tuple(bytes([b]) for b in body)):
            error = self.assertRaises(ChunkedError, decode, *pieces)
            self.assertIn(message, str(error), body)

    def test_sizes(self) -> None:
        """Sizes are 1 to 15 hex digits, nothing else on the line but extensions."""
        for line in (
            b"",
            b"zz",
            b"-1",
            b"+1",
            b"0x5",
            b" 5",
            b"5 ",
            b"5\t",
            b"5 ;a",
            b"1234567890abcdef",
            b"ffffffffffffffffffffffffffffffffffff",
            b"\xd9\xa3",
        ):
            self.assertRefused(line + b"\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line")

    def test_extensions(self) -> None:
        """Extensions are ;token or ;token=token|quoted-string, no white space, no controls."""
        for ext in (
            b";",
            b"; a",
            b";a =b",
            b";a= b",
            b";a=b c",
            b";a\rb",
            b";a\x00",
            b";a=\x00",
            b';a="b',
            b';a="\x00"',
            b';a="\\\x01"',
            b";a=b\x7f",
            b";a==b",
            b";\x80",
        ):
            self.assertRefused(b"5" + ext + b"\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line")

    def test_line_endings(self) -> None:
        """CRLF strictly: no bare LF, no bare CR, data followed by exactly CRLF."""
        self.assertRefused(b"5\nhello\r\n0\r\n\r\n", "bare LF")
        self.assertRefused(b"5\r\nhello\r\n0\n\r\n", "bare LF")
        self.assertRefused(b"5\r\nhello\r\n0\r\n\n", "bare LF")
        self.assertRefused(b"5\r\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line")
        self.assertRefused(b"5\r\nhello\n0\r\n\r\n", "chunk data not followed by CRLF")
        self.assertRefused(b"5\r\nhelloo\r\n0\r\n\r\n", "chunk data not followed by CRLF")
        self.assertRefused(b"5\r\nhello\r\r\n0\r\n\r\n", "chunk data not followed by CRLF")

    def test_trailers(self) -> None:
        """Trailer fields are well-formed fields, and never framing or routing fields."""
        for field, message in (
            (b"no colon", "malformed trailer field"),
            (b" X: folded", "malformed trailer field"),
            (b"\tX: folded", "malformed trailer field"),
            (b"X : y", "malformed trailer field"),
            (b": y", "malformed trailer field"),
            (b"X: a\rb", "control character"),
            (b"X: a\x00b", "control character"),
            (b"X: a\x1bb", "control character"),
            (b"Content-Length: 5", "not allowed as a trailer field"),
            (b"Transfer-Encoding: chunked", "not allowed as a trailer field"),
            (b"HOST: x", "not allowed as a trailer field"),
            (b"Trailer: X", "not allowed as a trailer field"),
        ):
            self.assertRefused(b"0\r\nX-Ok: 1\r\n" + field + b"\r\n\r\n", message)

    def test_folded_trailer_after_field(self) -> None:
        """A continuation line after a field (obsolete folding) is refused."""
        self.assertRefused(b"0\r\nX-A: 1\r\n folded\r\n\r\n", "malformed trailer field")

    def test_bounds(self) -> None:
        """Lines and trailer sections are bounded, whether or not a line ever ends."""
        self.assertRefused(b"5;" + b"a" * MAX_LINE + b"\r\n", "line too long")
        self.assertRefused(b"0\r\nX: " + b"a" * MAX_LINE, "line too long")
        self.assertRefused(b"0\r\n" + b"X: y\r\n" * (MAX_TRAILERS + 1) + b"\r\n", "trailer fields")
