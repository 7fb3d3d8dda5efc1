"""A test identity provider: signing keys, its discovery and JWKS documents, and tokens.

For unit tests of JWT bearer tokens, in memory (``fetch`` answers the gateway's key
requests at once) or over HTTP (``resource()`` is a ``twisted.web`` resource serving the
same documents). Tokens are minted with any claims, times and keys a test needs, including
wrong ones. It is no OAuth2 server: the end-to-end tests use a real one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from twisted.internet.defer import Deferred, fail, succeed
from twisted.web.resource import Resource
from twisted.web.server import Request

from promgate.jwks import FetchError

__all__ = ["TestIssuer", "unsigned_token"]

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class TestIssuer:
    """An issuer at ``issuer`` (a URL) with signing keys by ``kid``.

    ``fetch`` answers ``{issuer}/.well-known/openid-configuration`` and ``jwks_uri`` (its
    ``jwks`` document); ``fetched`` lists the URLs asked for. Set ``down = True`` to make
    every fetch fail, ``garbage`` to answer that instead of the JWKS.
    """

    __test__ = False  # not a trial test case, whatever its name

    def __init__(self, issuer: str = "https://issuer.test", *, kty: str = "RSA") -> None:
        self.issuer = issuer
        self.jwks_uri = issuer.rstrip("/") + "/keys"
        self.keys: dict[str, tuple[str, PrivateKey]] = {}
        self._kids = itertools.count(1)
        self.fetched: list[str] = []
        self.down = False
        self.garbage: bytes | None = None
        self.rotate(kty)

    # -- keys ------------------------------------------------------------------------------

    def rotate(self, kty: str = "RSA") -> str:
        """Add a new signing key (RSA, EC P-256 or Ed25519); returns its ``kid``."""
        kid = f"key-{next(self._kids)}"
        key: PrivateKey
        if kty == "RSA":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            alg = "RS256"
        elif kty == "EC":
            key = ec.generate_private_key(ec.SECP256R1())
            alg = "ES256"
        else:
            key = ed25519.Ed25519PrivateKey.generate()
            alg = "EdDSA"
        self.keys[kid] = (alg, key)
        return kid

    def retire(self, kid: str) -> None:
        """Stop publishing key ``kid`` (it can still sign: a stolen key, say)."""
        self.keys.pop(kid)

    @property
    def kid(self) -> str:
        """The newest key's ``kid``."""
        return list(self.keys)[-1]

    def jwks(self) -> bytes:
        keys = []
        for kid, (alg, key) in self.keys.items():
            public = key.public_key()
            if isinstance(public, rsa.RSAPublicKey):
                jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
            elif isinstance(public, ec.EllipticCurvePublicKey):
                jwk = ECAlgorithm.to_jwk(public, as_dict=True)
            else:
                jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": alg})
        return json.dumps({"keys": keys}).encode()

    def discovery(self) -> bytes:
        return json.dumps(
            {
                "issuer": self.issuer,
                "jwks_uri": self.jwks_uri,
                "token_endpoint": self.issuer.rstrip("/") + "/token",
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        ).encode()

    def documents(self) -> Mapping[str, bytes]:
        """What the issuer publishes, by URL."""
        return {
            self.issuer.rstrip("/") + "/.well-known/openid-configuration": self.discovery(),
            self.jwks_uri: self.garbage if self.garbage is not None else self.jwks(),
        }

    def fetch(self, url: str) -> Deferred[bytes]:
        """Answer one of the gateway's key requests at once (or fail it, when down)."""
        self.fetched.append(url)
        body = self.documents().get(url)
        if self.down or body is None:
            return fail(FetchError(f"HTTP status {503 if self.down else 404}"))
        return succeed(body)

    def resource(self) -> Resource:
        """The documents as a ``twisted.web`` resource, to serve at the issuer's URL."""
        return _Documents(self)

    # -- tokens ----------------------------------------------------------------------------

    def token(
        self,
        sub: str = "prometheus",
        *,
        aud: str | list[str] | None = "promgate",
        now: float,
        lifetime: float = 300.0,
        kid: str | None = None,
        alg: str | None = None,
        key: Any = None,
        headers: Mapping[str, Any] | None = None,
        **claims: Any,
    ) -> bytes:
        """A token issued at ``now`` for ``sub``, signed with key ``kid`` (the newest by
        default, and for a ``kid`` the issuer does not have); ``claims`` are added
        (``iss=None`` leaves a claim out)."""
        kid = kid if kid is not None else self.kid
        key_alg, private = self.keys.get(kid, self.keys[self.kid])
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            "aud": aud,
            "iat": int(now),
            "exp": int(now + lifetime),
            "jti": f"jti-{int(now)}-{sub}",
        }
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        signing_key: Any = key if key is not None else private
        header = {"kid": kid, **(headers or {})}
        return jwt.encode(payload, signing_key, algorithm=alg or key_alg, headers=header).encode()


class _Documents(Resource):
    isLeaf = True

    def __init__(self, issuer: TestIssuer) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.issuer = issuer

    def render_GET(self, request: Request) -> bytes:
        parts = urlsplit(self.issuer.issuer)
        url = f"{parts.scheme}://{parts.netloc}" + (request.path or b"").decode()
        self.issuer.fetched.append(url)
        body = self.issuer.documents().get(url)
        if self.issuer.down or body is None:
            request.setResponseCode(503 if self.issuer.down else 404)
            return b"unavailable\n"
        request.setHeader(b"content-type", b"application/json")
        return body


def unsigned_token(
    header: Mapping[str, Any], payload: Mapping[str, Any], secret: bytes = b""
) -> bytes:
    """A token with any header, signed with HMAC-SHA256 under ``secret`` when given, else
    with an empty signature: what no issuer should make (``alg: none``, key confusion)."""

    def part(value: Mapping[str, Any]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=")

    signing_input = part(header) + b"." + part(payload)
    signature = b""
    if secret:
        mac = hmac.new(secret, signing_input, hashlib.sha256).digest()
        signature = base64.urlsafe_b64encode(mac).rstrip(b"=")
    return signing_input + b"." + signature
