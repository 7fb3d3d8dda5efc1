"""Tests for recognising callers: certificate rules, URI wildcards and refusals."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from promgate.config.model import CertMatch, Identity
from promgate.identity import IdentityResolver, Recognition, cert_matches, uri_matches
from promgate.pki import CertificateAuthority
from promgate.tls import PeerCertificate

_CA = CertificateAuthority.create("identity test CA")


def _peer(
    cn: tuple[str, ...] = (), dns: tuple[str, ...] = (), uris: tuple[str, ...] = ()
) -> PeerCertificate:
    return PeerCertificate(sha256="00" * 32, subject="CN=x", cn=cn, dns=dns, uris=uris)


_segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._", min_size=1, max_size=8)


class URIMatchTests(SynchronousTestCase):
    """uri_matches: exact match, or ``*`` for exactly one non-empty path segment."""

    def test_exact(self) -> None:
        """A pattern without ``*`` matches only the identical URI."""
        self.assertTrue(uri_matches("spiffe://d/ns/prom", "spiffe://d/ns/prom"))
        self.assertFalse(uri_matches("spiffe://d/ns/prom", "spiffe://d/ns/prom2"))
        self.assertFalse(uri_matches("spiffe://d/ns/prom", "spiffe://d/ns/prom/"))
        self.assertFalse(uri_matches("spiffe://d/ns/prom", "SPIFFE://d/ns/prom"))

    def test_star_one_segment(self) -> None:
        """``*`` stands for any one segment."""
        self.assertTrue(uri_matches("spiffe://d/ns/*/sa/prom", "spiffe://d/ns/mon/sa/prom"))
        self.assertTrue(uri_matches("spiffe://d/ns/*", "spiffe://d/ns/anything"))

    def test_star_never_crosses_slash(self) -> None:
        """``*`` never matches two segments, nor a trailing extra segment."""
        self.assertFalse(uri_matches("spiffe://d/ns/*/sa/prom", "spiffe://d/ns/a/b/sa/prom"))
        self.assertFalse(uri_matches("spiffe://d/ns/*", "spiffe://d/ns/a/b"))
        self.assertFalse(uri_matches("spiffe://d/ns/*", "spiffe://d/ns"))

    def test_star_not_empty(self) -> None:
        """``*`` does not match an empty segment."""
        self.assertFalse(uri_matches("spiffe://d/ns/*", "spiffe://d/ns/"))
        self.assertFalse(uri_matches("spiffe://d/*/x", "spiffe://d//x"))

    def test_star_is_whole_segment(self) -> None:
        """A ``*`` inside a segment is literal, not a partial wildcard (and a SPIFFE ID
        never has one: the certificate's URI is then matched by nothing)."""
        self.assertFalse(uri_matches("spiffe://d/ns/prom*", "spiffe://d/ns/prometheus"))
        self.assertFalse(uri_matches("spiffe://d/ns/prom*", "spiffe://d/ns/prom*"))
        self.assertFalse(uri_matches("urn:x:prom*", "urn:x:prometheus"))
        self.assertTrue(uri_matches("https://d/ns/prom*", "https://d/ns/prom*"))

    @given(st.lists(_segment, min_size=1, max_size=5), st.data())
    def test_star_property(self, segments: list[str], data: st.DataObject) -> None:
        """Replacing any one segment by ``*`` still matches; adding a segment never does."""
        uri = "spiffe://example.org/" + "/".join(segments)
        i = data.draw(st.integers(0, len(segments) - 1))
        pattern_segments = list(segments)
        pattern_segments[i] = "*"
        pattern = "spiffe://example.org/" + "/".join(pattern_segments)
        self.assertTrue(uri_matches(pattern, uri))
        self.assertFalse(uri_matches(pattern, uri + "/extra"))
        self.assertFalse(uri_matches(pattern, uri.rsplit("/", 1)[0]))


class CertMatchTests(SynchronousTestCase):
    """cert_matches applies one configured rule to a peer certificate."""

    def test_cn(self) -> None:
        """A CN rule matches a certificate carrying exactly that CN (case-sensitive)."""
        self.assertTrue(cert_matches(CertMatch(cn="ops"), _peer(cn=("ops",))))
        self.assertFalse(cert_matches(CertMatch(cn="ops"), _peer(cn=("Ops",))))
        self.assertFalse(cert_matches(CertMatch(cn="ops"), _peer(cn=("ops2",))))
        self.assertFalse(cert_matches(CertMatch(cn="ops"), _peer()))

    def test_dns_case_insensitive(self) -> None:
        """DNS names compare case-insensitively and ignore a trailing dot."""
        rule = CertMatch(dns="Prom.Example.ORG")
        self.assertTrue(cert_matches(rule, _peer(dns=("prom.example.org",))))
        self.assertTrue(cert_matches(rule, _peer(dns=("other.org", "PROM.example.org."))))
        self.assertFalse(cert_matches(rule, _peer(dns=("prom.example.org.evil",))))

    def test_dns_is_not_cn(self) -> None:
        """A DNS rule is not satisfied by a CN, nor a CN rule by a DNS SAN."""
        self.assertFalse(cert_matches(CertMatch(dns="a.org"), _peer(cn=("a.org",))))
        self.assertFalse(cert_matches(CertMatch(cn="a.org"), _peer(dns=("a.org",))))

    def test_uri(self) -> None:
        """A URI rule matches any of the certificate's URI SANs, wildcards included."""
        rule = CertMatch(uri="spiffe://d/ns/*/prom")
        self.assertTrue(cert_matches(rule, _peer(uris=("spiffe://x/y", "spiffe://d/ns/m/prom"))))
        self.assertFalse(cert_matches(rule, _peer(uris=("spiffe://d/ns/m/n/prom",))))

    def test_empty_rule(self) -> None:
        """A rule with nothing set matches nothing."""
        self.assertFalse(cert_matches(CertMatch(), _peer(cn=("a",), dns=("a",), uris=("a",))))


class IdentityResolverTests(SynchronousTestCase):
    """IdentityResolver finds the one identity a certificate names."""

    def setUp(self) -> None:
        self.prometheus = Identity(
            "prometheus",
            cert=(CertMatch(uri="spiffe://d/prometheus"), CertMatch(cn="prometheus")),
            roles=frozenset({"scraper"}),
        )
        self.ops = Identity("ops", cert=(CertMatch(dns="ops.example.org"),))
        self.nobody = Identity("nobody")
        self.resolver = IdentityResolver(
            {"prometheus": self.prometheus, "ops": self.ops, "nobody": self.nobody}
        )

    def test_no_certificate(self) -> None:
        """No client certificate: no identity, reason no_credentials."""
        self.assertEqual(self.resolver.for_certificate(None), Recognition(None, "no_credentials"))

    def test_match_by_uri_cn_dns(self) -> None:
        """Any one of an identity's rules is enough."""
        for peer, ident in [
            (_peer(uris=("spiffe://d/prometheus",)), self.prometheus),
            (_peer(cn=("prometheus",)), self.prometheus),
            (_peer(dns=("OPS.example.org",)), self.ops),
        ]:
            self.assertEqual(self.resolver.for_certificate(peer), Recognition(ident, "ok"))

    def test_both_rules_of_one_identity(self) -> None:
        """A certificate matching two rules of the same identity is not ambiguous."""
        peer = _peer(cn=("prometheus",), uris=("spiffe://d/prometheus",))
        self.assertEqual(self.resolver.for_certificate(peer), Recognition(self.prometheus, "ok"))

    def test_unknown(self) -> None:
        """A verified certificate that no identity names is unknown_identity."""
        peer = _peer(cn=("stranger",), uris=("spiffe://d/stranger",))
        self.assertEqual(self.resolver.for_certificate(peer), Recognition(None, "unknown_identity"))

    def test_identity_without_rules_never_matches(self) -> None:
        """An identity with no certificate rules is never recognised."""
        self.assertEqual(
            self.resolver.for_certificate(_peer(cn=("nobody",))).reason, "unknown_identity"
        )

    def test_ambiguous(self) -> None:
        """A certificate that two identities claim is refused, not given either."""
        peer = _peer(cn=("prometheus",), dns=("ops.example.org",))
        self.assertEqual(
            self.resolver.for_certificate(peer), Recognition(None, "identity_ambiguous")
        )

    def test_ambiguous_wildcard(self) -> None:
        """Ambiguity through overlapping wildcards is refused too."""
        resolver = IdentityResolver(
            {
                "a": Identity("a", cert=(CertMatch(uri="spiffe://d/*/x"),)),
                "b": Identity("b", cert=(CertMatch(uri="spiffe://d/y/*"),)),
            }
        )
        self.assertEqual(
            resolver.for_certificate(_peer(uris=("spiffe://d/y/x",))).reason,
            "identity_ambiguous",
        )
        self.assertEqual(resolver.for_certificate(_peer(uris=("spiffe://d/z/x",))).reason, "ok")

    def test_no_identities(self) -> None:
        """With no identities configured every certificate is unknown."""
        resolver = IdentityResolver({})
        self.assertEqual(resolver.for_certificate(_peer(cn=("a",))).reason, "unknown_identity")


class PeerCertificateTests(SynchronousTestCase):
    """PeerCertificate.from_x509 extracts what identity matching and audit need."""

    def test_extracts_names(self) -> None:
        """CN, DNS and URI SANs, subject and SHA-256 fingerprint come from the certificate."""
        issued = _CA.issue_client(
            "prometheus",
            uris=["spiffe://d/prometheus", "spiffe://d/other"],
            dns=["prom.example.org"],
        )
        cert = x509.load_pem_x509_certificate(issued.cert_pem)
        peer = PeerCertificate.from_x509(cert)
        self.assertEqual(peer.cn, ("prometheus",))
        self.assertEqual(peer.dns, ("prom.example.org",))
        self.assertEqual(peer.uris, ("spiffe://d/prometheus", "spiffe://d/other"))
        self.assertEqual(peer.subject, "CN=prometheus")
        self.assertEqual(peer.sha256, cert.fingerprint(hashes.SHA256()).hex())
        self.assertEqual(len(peer.sha256), 64)

    def test_no_san(self) -> None:
        """A certificate without a SAN extension has no DNS names or URIs."""
        cert = x509.load_pem_x509_certificate(_CA.issue_client("bare").cert_pem)
        peer = PeerCertificate.from_x509(cert)
        self.assertEqual((peer.cn, peer.dns, peer.uris), (("bare",), (), ()))

    def test_resolves(self) -> None:
        """A real certificate resolves to the identity its URI SAN names."""
        cert = x509.load_pem_x509_certificate(
            _CA.issue_client("p", uris=["spiffe://d/ns/mon/prom"]).cert_pem
        )
        ident = Identity("prometheus", cert=(CertMatch(uri="spiffe://d/ns/*/prom"),))
        resolver = IdentityResolver({"prometheus": ident})
        self.assertEqual(
            resolver.for_certificate(PeerCertificate.from_x509(cert)), Recognition(ident, "ok")
        )
