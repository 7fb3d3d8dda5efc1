"""Tests for the strict request-head parser: what it accepts and how it refuses the rest."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from promgate.http.wire import (
    MAX_HEAD,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    HTTPError,
    RequestHead,
    parse_request_head,
    simple_response,
)


def _head(*lines: bytes) -> bytes:
    return b"\r\n".join(lines)


class AcceptTests(SynchronousTestCase):
    """Well-formed scrape request heads parse to the expected RequestHead."""

    def test_get_11(self) -> None:
        """A plain HTTP/1.1 GET parses; header names are lower-cased, values trimmed."""
        head = _head(
            b"GET /scrape?route=node&target=a%3A1 HTTP/1.1",
            b"Host: gate:9443",
            b"Accept:  text/plain \t",
            b"User-Agent: Prometheus/2.42.0",
        )
        self.assertEqual(
            parse_request_head(head),
            RequestHead(
                method=b"GET",
                target=b"/scrape?route=node&target=a%3A1",
                version=b"HTTP/1.1",
                headers={
                    b"host": b"gate:9443",
                    b"accept": b"text/plain",
                    b"user-agent": b"Prometheus/2.42.0",
                },
                keep_alive=True,
                size=len(head) + 4,
            ),
        )

    def test_head_method(self) -> None:
        """HEAD is parsed like GET."""
        req = parse_request_head(_head(b"HEAD /sd HTTP/1.1", b"Host: g"))
        self.assertEqual((req.method, req.target), (b"HEAD", b"/sd"))

    def test_other_methods_are_parsed(self) -> None:
        """Any token method parses; refusing it (405) is the gateway's job, not the parser's."""
        self.assertEqual(parse_request_head(_head(b"POST / HTTP/1.1", b"Host: g")).method, b"POST")

    def test_11_keep_alive_rules(self) -> None:
        """HTTP/1.1 keeps the connection open unless the client says Connection: close."""
        self.assertTrue(parse_request_head(_head(b"GET / HTTP/1.1", b"Host: g")).keep_alive)
        self.assertFalse(
            parse_request_head(
                _head(b"GET / HTTP/1.1", b"Host: g", b"Connection: close")
            ).keep_alive
        )
        self.assertFalse(
            parse_request_head(
                _head(b"GET / HTTP/1.1", b"Host: g", b"Connection: Keep-Alive, CLOSE")
            ).keep_alive
        )

    def test_connection_is_a_token_list(self) -> None:
        """Connection is read as comma-separated tokens, never by substring."""
        for version, value, keep_alive in (
            (b"1.1", b"foo, close", False),
            (b"1.1", b"foo,close", False),
            (b"1.1", b"closed", True),
            (b"1.1", b"x-close", True),
            (b"1.1", b"close-not", True),
            (b"1.0", b"keep-alive-nope", False),
            (b"1.0", b"nope-keep-alive", False),
            (b"1.0", b"foo, keep-alive", True),
            (b"1.0", b" KEEP-ALIVE ,", True),
            (b"1.0", b"keep-alive, close", False),
        ):
            head = _head(b"GET / HTTP/" + version, b"Host: g", b"Connection: " + value)
            self.assertEqual(parse_request_head(head).keep_alive, keep_alive, (version, value))

    def test_10_keep_alive_rules(self) -> None:
        """HTTP/1.0 closes unless the client asks for keep-alive; Host is optional."""
        self.assertFalse(parse_request_head(b"GET / HTTP/1.0").keep_alive)
        req = parse_request_head(_head(b"GET / HTTP/1.0", b"Connection: Keep-Alive"))
        self.assertTrue(req.keep_alive)
        self.assertEqual(req.version, b"HTTP/1.0")

    def test_repeated_list_headers_joined(self) -> None:
        """Repeated non-singleton headers are joined with a comma, in order."""
        req = parse_request_head(_head(b"GET / HTTP/1.1", b"Host: g", b"Accept: a", b"Accept: b"))
        self.assertEqual(req.headers[b"accept"], b"a, b")

    def test_tab_and_empty_values(self) -> None:
        """A tab inside a value and an empty value are allowed."""
        req = parse_request_head(_head(b"GET / HTTP/1.1", b"Host: g", b"X-A: a\tb", b"X-B:"))
        self.assertEqual((req.headers[b"x-a"], req.headers[b"x-b"]), (b"a\tb", b""))

    def test_content_length_zero(self) -> None:
        """Content-Length: 0 is not a body."""
        req = parse_request_head(_head(b"GET / HTTP/1.1", b"Host: g", b"Content-Length: 0"))
        self.assertEqual(req.headers[b"content-length"], b"0")

    def test_limits_inclusive(self) -> None:
        """A request line of exactly MAX_REQUEST_LINE bytes and MAX_HEADERS headers pass."""
        prefix, suffix = b"GET /", b" HTTP/1.1"
        line = prefix + b"a" * (MAX_REQUEST_LINE - len(prefix) - len(suffix)) + suffix
        self.assertEqual(len(line), MAX_REQUEST_LINE)
        parse_request_head(_head(line, b"Host: g"))
        headers = [b"Host: g"] + [b"X-H%d: v" % i for i in range(MAX_HEADERS - 1)]
        self.assertEqual(len(parse_request_head(_head(b"GET / HTTP/1.1", *headers)).headers), 100)


class RefuseTests(SynchronousTestCase):
    """Malformed or unacceptable heads raise HTTPError with the right status."""

    def assertRefused(self, head: bytes, status: int = 400) -> HTTPError:
        error: HTTPError = self.assertRaises(HTTPError, parse_request_head, head)
        self.assertEqual(error.status, status, error.message)
        self.assertEqual(error.reason, "bad_request")
        return error

    def test_bad_request_line(self) -> None:
        """Request lines that are not exactly METHOD SP TARGET SP VERSION are 400."""
        for line in [
            b"",
            b"GET",
            b"GET /",
            b"GET  / HTTP/1.1",
            b"GET / HTTP/1.1 ",
            b"GET /a b HTTP/1.1",
            b"G(T / HTTP/1.1",
            b"GET / http/1.1",
            b"GET / HTTP/1",
            b"GET / HTTP/1.1x",
            b" GET / HTTP/1.1",
            b"GET /\x00 HTTP/1.1",
            b"GET /\x7f HTTP/1.1",
            b"GET /\x80 HTTP/1.1",
            b"GET /scrape?route=n\xc3\xa9 HTTP/1.1",
            b"GET /\xff HTTP/1.1",
            b"GET http://h\xffst/ HTTP/1.1",
            b"CONNECT h\xc3\xa9:443 HTTP/1.1",
            b"GET /a\tb HTTP/1.1",
        ]:
            self.assertRefused(_head(line, b"Host: g"))

    @given(st.binary(min_size=1, max_size=20).filter(lambda b: any(c >= 0x80 for c in b)))
    def test_target_bytes_over_7f(self, data: bytes) -> None:
        """Hypothesis: any target holding a byte >= 0x80 is a 400."""
        target = b"/" + data.replace(b" ", b"").replace(b"\r", b"").replace(b"\n", b"")
        self.assertRefused(_head(b"GET " + target + b" HTTP/1.1", b"Host: g"))

    def test_version_505(self) -> None:
        """Well-formed but unsupported HTTP versions are 505."""
        for version in (b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/3.0"):
            self.assertRefused(_head(b"GET / " + version, b"Host: g"), 505)

    def test_request_line_414(self) -> None:
        """A request line over MAX_REQUEST_LINE is 414."""
        line = b"GET /" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1"
        self.assertRefused(_head(line, b"Host: g"), 414)

    def test_too_many_headers_431(self) -> None:
        """More than MAX_HEADERS header fields is 431."""
        headers = [b"Host: g"] + [b"X-H%d: v" % i for i in range(MAX_HEADERS)]
        self.assertRefused(_head(b"GET / HTTP/1.1", *headers), 431)

    def test_head_too_large_431(self) -> None:
        """A head over MAX_HEAD bytes is 431, even with few fields."""
        big = b"X-Big: " + b"a" * MAX_HEAD
        self.assertRefused(_head(b"GET / HTTP/1.1", b"Host: g", big), 431)

    def test_obs_fold(self) -> None:
        """Obsolete line folding (a continuation line) is refused."""
        self.assertRefused(_head(b"GET / HTTP/1.1", b"Host: g", b"X-A: a", b" b"))
        self.assertRefused(_head(b"GET / HTTP/1.1", b"Host: g", b"X-A: a", b"\tb: c"))

    def test_bad_header_names(self) -> None:
        """Header names must be tokens: no spaces before the colon, no empty names."""
        for line in (b"Host : g", b": v", b"X A: v", b"X-\x00: v", b"novalue"):
            self.assertRefused(_head(b"GET / HTTP/1.1", b"Host: g", line))

    def test_control_characters_in_values(self) -> None:
        """Bare CR, bare LF, NUL and other controls in a value are refused."""
        for value in (b"a\rb", b"a\nb", b"a\x00b", b"a\x1bb", b"a\x7fb", b"\r"):
            self.assertRefused(_head(b"GET / HTTP/1.1", b"Host: g", b"X-A: " + value))

    def test_bare_lf_line_endings(self) -> None:
        """A head using bare LF line endings does not parse as separate fields."""
        self.assertRefused(b"GET / HTTP/1.1\nHost: g")
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: g\nX-A: b")

    def test_duplicate_host(self) -> None:
        """Two Host headers (in any case) are refused."""
        self.assertRefused(_head(b"GET / HTTP/1.1", b"Host: a", b"host: b"))

    def test_duplicate_content_length(self) -> None:
        """Two Content-Length headers are refused, even if they agree."""
        self.assertRefused(
            _head(b"GET / HTTP/1.1", b"Host: a", b"Content-Length: 0", b"Content-Length: 0")
        )

    def test_duplicate_authorization(self) -> None:
        """Credentials given twice are refused rather than guessed at."""
        self.assertRefused(
            _head(b"GET / HTTP/1.1", b"Host: a", b"Authorization: a", b"Authorization: b")
        )

    def test_missing_host_11(self) -> None:
        """An HTTP/1.1 request without Host is 400."""
        self.assertRefused(_head(b"GET / HTTP/1.1", b"Accept: */*"))

    def test_request_body(self) -> None:
        """Scrape requests carry no body: Content-Length > 0 and any Transfer-Encoding are 400."""
        for line in (
            b"Content-Length: 5",
            b"Content-Length: 00",
            b"Content-Length: x",
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding: identity",
        ):
            self.assertRefused(_head(b"GET / HTTP/1.1", b"Host: g", line))

    def test_empty_line_inside_head(self) -> None:
        """An empty line inside what was given as the head is refused."""
        self.assertRefused(_head(b"GET / HTTP/1.1", b"", b"Host: g"))

    @given(st.binary(max_size=300))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        """Arbitrary bytes either parse or raise HTTPError with a 4xx/505 status; nothing else."""
        try:
            req = parse_request_head(data)
        except HTTPError as e:
            self.assertIn(e.status, (400, 414, 431, 505))
        else:
            self.assertIn(req.version, (b"HTTP/1.1", b"HTTP/1.0"))

    @given(
        st.lists(
            st.tuples(
                st.sampled_from([b"Host", b"Accept", b"X-A", b"Connection", b"Content-Length"]),
                st.binary(max_size=20),
            ),
            max_size=6,
        ),
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.x"]),
        st.binary(max_size=20),
    )
    def test_structured_fuzz(
        self, headers: list[tuple[bytes, bytes]], version: bytes, target: bytes
    ) -> None:
        """Near-valid heads parse or raise HTTPError; parsed values carry no controls."""
        head = _head(b"GET /" + target + b" " + version, *(n + b": " + v for n, v in headers))
        try:
            req = parse_request_head(head)
        except HTTPError:
            return
        for value in req.headers.values():
            self.assertFalse(any((c < 0x20 and c != 0x09) or c == 0x7F for c in value))


class SimpleResponseTests(SynchronousTestCase):
    """simple_response builds the gateway's own complete responses."""

    def test_shape(self) -> None:
        """Status line, framing, no-store and the connection disposition, then the body."""
        data = simple_response(404, b"nope\n", keep_alive=True, extra=((b"X-A", b"b"),))
        self.assertEqual(
            data,
            b"HTTP/1.1 404 Not Found\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: 5\r\n"
            b"Cache-Control: no-store\r\n"
            b"X-Content-Type-Options: nosniff\r\n"
            b"Connection: keep-alive\r\n"
            b"X-A: b\r\n\r\nnope\n",
        )

    def test_head_only(self) -> None:
        """A HEAD answer keeps the Content-Length but has no body."""
        data = simple_response(200, b"abc", keep_alive=False, head_only=True)
        self.assertTrue(
            data.endswith(
                b"Content-Length: 3\r\nCache-Control: no-store\r\n"
                b"X-Content-Type-Options: nosniff\r\n"
                b"Connection: close\r\n\r\n"
            )
        )
