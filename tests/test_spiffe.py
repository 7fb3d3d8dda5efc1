"""SPIFFE IDs: the validator, certificates whose ``spiffe:`` URI SAN is not a valid ID
(refused before any rule is tried), and configured IDs and patterns (check-config)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from promgate.config.loader import check_config
from promgate.config.model import CertMatch, Identity
from promgate.identity import IdentityResolver, Recognition, uri_matches
from promgate.spiffe import is_spiffe, spiffe_id_error, spiffe_pattern_error
from promgate.tls import PeerCertificate

#: The grammar of the SPIFFE specification, written independently of the validator.
REFERENCE = re.compile(r"spiffe://[a-z0-9._-]+(/(?!\.{1,2}(/|$))[A-Za-z0-9._-]+)*")

VALID = [
    "spiffe://example.org",
    "spiffe://example.org/ns/prod/sa/prometheus",
    "spiffe://a_b-c.d/x.y/z-1/_",
    "spiffe://1/...",
    "spiffe://example.org/.well-known",
]

INVALID = {
    "spiffe://example.org/ns/../admin": "'..' segment",
    "spiffe://example.org/./admin": "'.' segment",
    "spiffe://example.org/a%2Fb": "'%'",
    "spiffe://example.org/a?b=c": "'?'",
    "spiffe://example.org/a#b": "'#'",
    "spiffe://example.org/a/": "empty segment",
    "spiffe://example.org/": "empty segment",
    "spiffe://example.org//a": "empty segment",
    "spiffe://Example.org/a": "'E'",
    "spiffe://example.org:8443/a": "':'",
    "spiffe://user@example.org/a": "'@'",
    "spiffe:///a": "trust domain is empty",
    "spiffe://": "trust domain is empty",
    "SPIFFE://example.org/a": "spiffe://",
    "spiffe:example.org/a": "spiffe://",
    "spiffe://example.org/caf\u00e9": "'\u00e9'",
    "spiffe://example.org/a b": "' '",
    "spiffe://" + "d" * 256: "longer than 255",
    "spiffe://d/" + "a" * 2048: "longer than 2048 bytes",
}

_DOMAIN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", min_size=1, max_size=12)
_SEGMENT = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_",
    min_size=1,
    max_size=8,
)
#: Characters a wire value may carry, the forbidden ones well represented.
_ANY = st.text(alphabet="aZ09.-_/%2F?#:@*. \u00e9", max_size=30)


class ValidatorTests(SynchronousTestCase):
    """spiffe_id_error and spiffe_pattern_error follow the SPIFFE specification."""

    def test_valid(self) -> None:
        """IDs the specification allows are accepted, as IDs and as patterns."""
        for uri in VALID:
            self.assertIsNone(spiffe_id_error(uri), uri)
            self.assertIsNone(spiffe_pattern_error(uri), uri)

    def test_invalid(self) -> None:
        """Each thing the specification forbids is refused, and the error names it."""
        for uri, why in INVALID.items():
            error = spiffe_id_error(uri)
            self.assertIsNotNone(error, uri)
            self.assertIn(why, error or "", uri)
            self.assertIsNotNone(spiffe_pattern_error(uri), uri)

    def test_patterns(self) -> None:
        """A pattern may have ``*`` for whole path segments only: not in the trust domain,
        not inside a segment; an ID never has ``*``."""
        self.assertIsNone(spiffe_pattern_error("spiffe://d/ns/*/sa/*"))
        self.assertIsNotNone(spiffe_id_error("spiffe://d/ns/*"))
        self.assertIsNotNone(spiffe_pattern_error("spiffe://*/ns/a"))
        self.assertIsNotNone(spiffe_pattern_error("spiffe://d/ns/prom*"))
        self.assertIsNotNone(spiffe_pattern_error("spiffe://d/ns/*/"))

    def test_is_spiffe(self) -> None:
        """The scheme decides, in any case; other URIs are not SPIFFE IDs."""
        self.assertTrue(is_spiffe("spiffe://d/a"))
        self.assertTrue(is_spiffe("SPIFFE://d/a"))
        self.assertTrue(is_spiffe("spiffe:d"))
        self.assertFalse(is_spiffe("https://d/a"))
        self.assertFalse(is_spiffe("urn:spiffe:d"))

    @given(_DOMAIN, st.lists(_SEGMENT, max_size=5))
    def test_built_from_the_grammar(self, domain: str, segments: list[str]) -> None:
        """An ID built from allowed parts is valid exactly when it has no ``.`` or ``..``
        segment."""
        uri = "spiffe://" + domain + "".join("/" + s for s in segments)
        dots = any(s in (".", "..") for s in segments)
        self.assertEqual(spiffe_id_error(uri) is None, not dots, uri)

    @given(_ANY, _ANY)
    def test_agrees_with_the_grammar(self, domain: str, path: str) -> None:
        """On any text at all, the validator agrees with the specification's grammar."""
        uri = "spiffe://" + domain + path
        self.assertEqual(spiffe_id_error(uri) is None, REFERENCE.fullmatch(uri) is not None, uri)

    @given(_DOMAIN, st.lists(_SEGMENT, min_size=1, max_size=4), st.data())
    def test_insertion_refused(self, domain: str, segments: list[str], data: st.DataObject) -> None:
        """Putting a forbidden segment or character anywhere in a valid path refuses it."""
        bad = data.draw(st.sampled_from(["..", ".", "", "%2F", "a?b", "a#b", "a:1", "a@b"]))
        i = data.draw(st.integers(0, len(segments)))
        uri = "spiffe://" + domain + "".join("/" + s for s in [*segments[:i], bad, *segments[i:]])
        self.assertIsNotNone(spiffe_id_error(uri), uri)


def _peer(*uris: str, cn: str = "prometheus") -> PeerCertificate:
    return PeerCertificate(sha256="00" * 32, subject="CN=x", cn=(cn,), dns=(), uris=uris)


class ResolverTests(SynchronousTestCase):
    """A certificate whose ``spiffe:`` URI SAN is not a valid ID names nobody."""

    def setUp(self) -> None:
        self.wild = Identity("wild", cert=(CertMatch(uri="spiffe://d/ns/*/prometheus"),))
        self.by_cn = Identity("by-cn", cert=(CertMatch(cn="prometheus"),))
        self.resolver = IdentityResolver({"wild": self.wild, "by-cn": self.by_cn})

    def test_valid_id_matches(self) -> None:
        """A valid ID is matched by its rules, as before."""
        found = self.resolver.for_certificate(_peer("spiffe://d/ns/mon/prometheus", cn="x"))
        self.assertEqual(found, Recognition(self.wild, "ok"))

    def test_invalid_id_refused_before_matching(self) -> None:
        """``..``, ``%2F``, ``?`` or ``#`` in the ID: unknown_identity, even though the
        CN rule would match, with a detail naming the URI and the problem."""
        for uri, why in [
            ("spiffe://d/ns/../prometheus", "'..' segment"),
            ("spiffe://d/ns/a%2Fb/prometheus", "'%'"),
            ("spiffe://d/ns/a/prometheus?x=1", "'?'"),
            ("spiffe://d/ns/a/prometheus#x", "'#'"),
        ]:
            found = self.resolver.for_certificate(_peer(uri))
            self.assertEqual((found.identity, found.reason), (None, "unknown_identity"), uri)
            self.assertIn(repr(uri), found.detail or "")
            self.assertIn(why, found.detail or "")
            self.assertIn("not a valid SPIFFE ID", found.detail or "")

    def test_other_schemes_untouched(self) -> None:
        """Only ``spiffe:`` URIs are checked: others are matched as they are."""
        found = self.resolver.for_certificate(_peer("https://d/a/../b"))
        self.assertEqual(found, Recognition(self.by_cn, "ok"))

    def test_long_uri_quoted_short(self) -> None:
        """The detail quotes at most 200 characters of the URI."""
        found = self.resolver.for_certificate(_peer("spiffe://d/" + "%" * 5000))
        self.assertLess(len(found.detail or ""), 400)

    def test_uri_matches_refuses(self) -> None:
        """uri_matches never matches an invalid ID, even against a pattern equal to it."""
        self.assertFalse(uri_matches("spiffe://d/ns/*", "spiffe://d/ns/.."))
        self.assertFalse(uri_matches("spiffe://d/a%2Fb", "spiffe://d/a%2Fb"))
        self.assertTrue(uri_matches("spiffe://d/ns/*", "spiffe://d/ns/a"))


class ConfigTests(SynchronousTestCase):
    """check-config refuses an invalid configured SPIFFE ID or pattern, with its place."""

    def check(self, identities: str, upstream_uri: str = "spiffe://d/exporter") -> list[str]:
        root = Path(self.mktemp())
        root.mkdir()
        (root / "audit.key").write_text("k" * 64 + "\n")
        text = textwrap.dedent(
            """\
            listeners:
              - {name: plain, protocol: http, endpoint: "tcp:9443", tls: false}
            identities:
            %s
            routes:
              node:
                scheme: https
                allow: ["role:scraper"]
                tls: {identity: {uri: "%s"}}
                targets: {static: ["10.0.0.5:9100"]}
            audit: {path: audit.jsonl, key_file: audit.key}
            """
        ) % (textwrap.indent(identities, "  "), upstream_uri)
        (root / "main.yaml").write_text(text)
        _, errors, _ = check_config(root / "main.yaml")
        return [str(e) for e in errors]

    def test_valid(self) -> None:
        """IDs and whole-segment patterns load."""
        errors = self.check(
            'p: {cert: {uri: "spiffe://example.org/ns/*/sa/prometheus"}, roles: [scraper]}\n'
            'q: {cert: [{uri: "spiffe://example.org"}, {uri: "https://x/%2F"}]}\n'
        )
        self.assertEqual(errors, [])

    def test_invalid_pattern(self) -> None:
        """A ``..`` segment, ``%2F``, a query, a partial ``*`` or a trust domain ``*``: each
        an error at its identity's key."""
        for uri, why in [
            ("spiffe://example.org/ns/../x", "'..' segment"),
            ("spiffe://example.org/a%2Fb", "'%'"),
            ("spiffe://example.org/a?b", "'?'"),
            ("spiffe://example.org/prom*", "'*'"),
            ("spiffe://*/prometheus", "'*'"),
            ("spiffe://example.org/a/", "empty segment"),
        ]:
            errors = self.check(f'p: {{cert: {{uri: "{uri}"}}, roles: [scraper]}}\n')
            self.assertEqual(len(errors), 1, (uri, errors))
            self.assertIn("identities.p.cert.uri: not a valid SPIFFE ID", errors[0])
            self.assertIn(why, errors[0])

    def test_invalid_upstream_identity(self) -> None:
        """A route's upstream ``identity: {uri}`` must be a valid ID (no wildcard there)."""
        ok = "p: {cert: {cn: p}, roles: [scraper]}\n"
        self.assertEqual(self.check(ok, "spiffe://d/ns/exporter"), [])
        for uri in ("spiffe://d/ns/../exporter", "spiffe://d/ns/*"):
            errors = self.check(ok, uri)
            self.assertEqual(len(errors), 1, (uri, errors))
            self.assertIn("routes.node.tls.identity.uri: not a valid SPIFFE ID", errors[0])
