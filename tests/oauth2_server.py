"""A real OAuth 2.0 authorization server for the end-to-end tests: Authlib's.

Authlib's ``AuthorizationServer`` (Flask integration) answers the token endpoint: it
authenticates the client (``client_secret_basic`` or ``client_secret_post``), runs the
client-credentials grant, checks the scope, and issues RFC 9068 JWT access tokens with its
``JWTBearerTokenGenerator`` (RS256). This file only supplies what Authlib leaves to its
user: the client registry, the signing key, where the endpoints live, and the discovery
(RFC 8414 / OpenID) document, validated with Authlib's own metadata classes.

Run as ``python oauth2_server.py --port-file FILE --client ID:SECRET:SCOPES ...``; it
listens on 127.0.0.1, on an ephemeral port written to FILE once it accepts connections.
Not a test module (trial collects ``test_*.py`` only) and imported by none.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, grants
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
from authlib.oauth2.rfc9068 import JWTBearerTokenGenerator
from flask import Flask, jsonify
from joserfc.jwk import KeySet, RSAKey
from werkzeug.serving import make_server

AUDIENCE = "promgate"


class Client(ClientMixin):  # type: ignore[misc]
    """A registered confidential client allowed the client-credentials grant."""

    def __init__(self, client_id: str, secret: str, scopes: str) -> None:
        self.client_id = client_id
        self.secret = secret
        self.scopes = scopes.split()

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        return None

    def get_allowed_scope(self, scope: str) -> str:
        if not scope:
            return " ".join(self.scopes)
        return " ".join(s for s in scope.split() if s in self.scopes)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(self.secret, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials"


class ClientCredentials(grants.ClientCredentialsGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]


class Tokens(JWTBearerTokenGenerator):  # type: ignore[misc]
    """RFC 9068 access tokens for the audience the gateway expects."""

    def __init__(self, issuer: str, key: RSAKey) -> None:
        # Short-lived, as identity providers issue them: Prometheus fetches new ones.
        super().__init__(issuer=issuer, alg="RS256", expires_generator=lambda c, g: 300)
        self.keys = KeySet([key])

    def get_jwks(self) -> KeySet:
        return self.keys

    def get_audiences(self, client: Client, user: Any, scope: str) -> list[str]:
        return [AUDIENCE]


def build(issuer: str, clients: dict[str, Client]) -> Flask:
    app = Flask("oauth2-server")
    key = RSAKey.generate_key(2048, parameters={"kid": f"k{int(time.time())}", "use": "sig"})
    server = AuthorizationServer(
        app,
        query_client=clients.get,
        save_token=lambda token, request: None,  # JWTs are self-contained
    )
    server.register_grant(ClientCredentials)
    server.register_token_generator("default", Tokens(issuer, key))
    metadata = AuthorizationServerMetadata(
        {
            "issuer": issuer,
            "token_endpoint": issuer + "/token",
            "jwks_uri": issuer + "/jwks",
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
            ],
            "response_types_supported": ["token"],
            "scopes_supported": sorted({s for c in clients.values() for s in c.scopes}),
        }
    )
    metadata.validate()
    public = {"keys": [key.as_dict(private=False)]}

    @app.post("/token")
    def token() -> Any:
        return server.create_token_response()

    @app.get("/.well-known/openid-configuration")
    @app.get("/.well-known/oauth-authorization-server")
    def discovery() -> Any:
        return jsonify(dict(metadata))

    @app.get("/jwks")
    def jwks() -> Any:
        return jsonify(public)

    return app


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--client", action="append", default=[], help="ID:SECRET:SCOPES")
    args = parser.parse_args(argv)
    clients = {}
    for spec in args.client:
        client_id, secret, scopes = spec.split(":", 2)
        clients[client_id] = Client(client_id, secret, scopes)
    server = make_server("127.0.0.1", 0, None, threaded=True)  # type: ignore[arg-type]
    issuer = f"http://127.0.0.1:{server.server_port}"
    server.app = build(issuer, clients)
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"issuer": issuer}))
    tmp.replace(args.port_file)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
