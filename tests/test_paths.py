"""Tests for strict path normalisation: every known trick is refused with its reason, what is
accepted is canonical (normalising it again changes nothing), and nothing accepted can be
read by an upstream as a different path."""

from __future__ import annotations

import string
from typing import Any
from urllib.parse import unquote

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from promgate.paths import PathRefused, normalize_path

#: name -> (raw path, the reason PathRefused gives).
TRICKS: dict[str, tuple[str, str]] = {
    "empty": ("", "must start with '/'"),
    "relative": ("metrics", "must start with '/'"),
    "absolute_uri": ("http://evil/metrics", "must start with '/'"),
    "dot_dot_segment": ("/metrics/../debug/pprof", "'..' segment"),
    "dot_segment": ("/metrics/./x", "'.' segment"),
    "trailing_dot_dot": ("/metrics/..", "'..' segment"),
    "leading_dot_dot": ("/../etc/passwd", "'..' segment"),
    "encoded_dot_lower": ("/metrics/%2e%2e/debug", "encoded '.' (%2E)"),
    "encoded_dot_upper": ("/metrics/%2E%2E/debug", "encoded '.' (%2E)"),
    "encoded_dot_mixed": ("/metrics/.%2e/debug", "encoded '.' (%2E)"),
    "encoded_dot_in_name": ("/metrics%2ejson", "encoded '.' (%2E)"),
    "encoded_slash": ("/metrics%2f..%2fdebug", "encoded '/' (%2F)"),
    "encoded_slash_upper": ("/a%2Fb", "encoded '/' (%2F)"),
    "encoded_backslash": ("/metrics%5c..%5cdebug", "encoded '\\' (%5C)"),
    "double_encoded_dot": ("/metrics/%252e%252e/debug", "encoded '%' (%25, double encoding)"),
    "double_encoded_slash": ("/a%252fb", "encoded '%' (%25, double encoding)"),
    "encoded_semicolon": ("/metrics%3bjsessionid=x", "encoded ';' (%3B)"),
    "lone_percent": ("/metrics%", "malformed '%' escape"),
    "short_escape": ("/metrics%4", "malformed '%' escape"),
    "non_hex_escape": ("/metrics%zz", "malformed '%' escape"),
    "half_hex_escape": ("/metrics%4g", "malformed '%' escape"),
    "double_slash": ("/metrics//x", "empty segment ('//')"),
    "leading_double_slash": ("//evil.example/metrics", "empty segment ('//')"),
    "backslash": ("/metrics\\..\\debug", "backslash"),
    "semicolon": ("/metrics;x=1", "';' (path parameters)"),
    "semicolon_dot_dot": ("/metrics/..;/debug", "';' (path parameters)"),
    "nul": ("/metrics\x00.txt", "NUL character"),
    "encoded_nul": ("/metrics%00", "encoded NUL"),
    "newline": ("/metrics\r\nX-Injected: 1", "control character"),
    "tab": ("/me\ttrics", "control character"),
    "delete": ("/metrics\x7f", "control character"),
    "c1_control": ("/metrics\x85", "control character"),
    "encoded_newline": ("/metrics%0d%0aX: 1", "encoded control character"),
    "encoded_delete": ("/metrics%7F", "encoded control character"),
    "query": ("/metrics?debug=1", "'?' (a query does not belong in a path)"),
    "fragment": ("/metrics#x", "'#' (a fragment does not belong in a path)"),
    "space": ("/met rics", "character not allowed in a path (percent-encode it)"),
    "non_ascii": ("/caf\u00e9", "character not allowed in a path (percent-encode it)"),
    "bracket": ("/a[0]", "character not allowed in a path (percent-encode it)"),
}

#: raw -> canonical form.
CANONICAL: dict[str, str] = {
    "/": "/",
    "/metrics": "/metrics",
    "/metrics/": "/metrics/",
    "/a%7e%41b%2d%5F%30": "/a~Ab-_0",
    "/caf%c3%a9": "/caf%C3%A9",
    "/caf%C3%A9": "/caf%C3%A9",
    "/x/%e2%82%ac": "/x/%E2%82%AC",
    "/a%20b": "/a%20b",
    "/q%3f%23": "/q%3F%23",
    "/probe:x@y!$&'()*+,=": "/probe:x@y!$&'()*+,=",
    "/.well-known/x": "/.well-known/x",
    "/a/...": "/a/...",
    "/a/.b/c.": "/a/.b/c.",
}


class TrickTests(SynchronousTestCase):
    """Each path trick is refused, with a reason naming it (one test per trick)."""

    def check(self, raw: str, reason: str) -> None:
        with self.assertRaises(PathRefused) as caught:
            normalize_path(raw)
        self.assertEqual(caught.exception.reason, reason)
        self.assertEqual(str(caught.exception), reason)


def _trick_test(raw: str, reason: str) -> Any:
    def test(self: TrickTests) -> None:
        self.check(raw, reason)

    test.__doc__ = f"{raw!r} is refused: {reason}."
    return test


for _name, (_raw, _reason) in TRICKS.items():
    setattr(TrickTests, f"test_{_name}", _trick_test(_raw, _reason))


class CanonicalTests(SynchronousTestCase):
    """Accepted paths come out in one canonical spelling."""

    def test_canonical_forms(self) -> None:
        """Unreserved escapes are decoded, other escapes upper-cased, the rest kept as is."""
        for raw, canonical in CANONICAL.items():
            self.assertEqual(normalize_path(raw), canonical, raw)
            self.assertEqual(normalize_path(canonical), canonical, canonical)

    def test_escape_case_does_not_matter(self) -> None:
        """The same path with escapes in lower or upper case normalises to one string."""
        self.assertEqual(normalize_path("/a%c3%a9%7e"), normalize_path("/a%C3%A9%7E"))

    def test_refusal_is_a_value_error(self) -> None:
        """PathRefused is a ValueError, so generic validation code can catch it."""
        self.assertTrue(issubclass(PathRefused, ValueError))


_TOKENS = st.sampled_from(
    [
        "/", "/", "/", ".", "..", "a", "Z", "0", "-", "_", "~", ":", "@", "+", "=", "&", "'",
        "%", "%2e", "%2E", "%2f", "%2F", "%5c", "%25", "%41", "%61", "%7e", "%7E", "%2d",
        "%c3", "%A9", "%3b", "%3F", "%23", "%20", "%00", "%0a", "%1f", "%7f", "%80", "%ff",
        "%g1", "%4", ";", "?", "#", "\\", "\x00", "\n", "\x7f", " ", "\u00e9", "[", "metrics",
    ]
)  # fmt: skip
#: Mostly harmless pieces, so that many generated paths are accepted.
_GOOD_TOKENS = st.sampled_from(
    ["/a", "/b", "/", ".", "-", "_", "~", ":", "@", "%41", "%7e", "%c3", "%A9", "%20", "x.y"]
)
_PATHS = st.one_of(
    st.lists(_GOOD_TOKENS, max_size=12).map(lambda t: "/" + "".join(t)),
    st.lists(_TOKENS, max_size=24).map("".join),
    st.lists(_TOKENS, max_size=24).map(lambda t: "/" + "".join(t)),
    st.text(max_size=40),
    st.text(alphabet=string.printable, max_size=40).map(lambda t: "/" + t),
)
_PCHAR = set(string.ascii_letters + string.digits + "-._~!$&'()*+,=:@/")
_UNRESERVED_BYTES = {ord(c) for c in string.ascii_letters + string.digits + "-_~"}


def _accepted(raw: str) -> str | None:
    try:
        return normalize_path(raw)
    except PathRefused:
        return None


class PropertyTests(SynchronousTestCase):
    """Properties of whatever the normaliser accepts, over generated paths."""

    @given(_PATHS)
    def test_idempotent(self, raw: str) -> None:
        """normalize(normalize(x)) == normalize(x)."""
        path = _accepted(raw)
        if path is not None:
            self.assertEqual(normalize_path(path), path)

    @given(_PATHS)
    def test_nothing_dangerous_accepted(self, raw: str) -> None:
        """No dot segment, '//', backslash, ';', NUL, control character, '?' or '#', as
        written or after one more percent-decoding by an upstream."""
        path = _accepted(raw)
        if path is None:
            return
        self.assertTrue(path.startswith("/"))
        for seen in (path, unquote(path, errors="replace")):
            segments = seen.split("/")
            self.assertNotIn(".", segments, seen)
            self.assertNotIn("..", segments, seen)
            self.assertNotIn("//", seen)
            for bad in ("\\", ";", "\x00"):
                self.assertNotIn(bad, seen)
            self.assertFalse(any(c < " " or c == "\x7f" for c in seen), seen)
        self.assertNotIn("?", path)
        self.assertNotIn("#", path)

    @given(_PATHS)
    def test_canonical_alphabet(self, raw: str) -> None:
        """Accepted paths are ASCII pchar and '/', plus escapes with upper-case hex of
        characters that are not unreserved."""
        path = _accepted(raw)
        if path is None:
            return
        i = 0
        while i < len(path):
            if path[i] == "%":
                hex_digits = path[i + 1 : i + 3]
                self.assertEqual(hex_digits, hex_digits.upper())
                self.assertNotIn(int(hex_digits, 16), _UNRESERVED_BYTES)
                i += 3
            else:
                self.assertIn(path[i], _PCHAR)
                i += 1

    @given(_PATHS)
    def test_same_meaning(self, raw: str) -> None:
        """Normalising never changes what the path means once decoded."""
        path = _accepted(raw)
        if path is not None:
            self.assertEqual(unquote(path, errors="replace"), unquote(raw, errors="replace"))
