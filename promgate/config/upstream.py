"""How the gateway reaches a route's upstream: the ``tls`` it verifies, the credentials
it presents (``authorization`` or ``basic_auth``, as in a Prometheus scrape config).

Secrets are never written into the configuration itself: a route names the file that
holds them, and a problem names that file, never what is in it.
"""

from __future__ import annotations

import base64
import re

from service_identity.hazmat import DNS_ID

from promgate.config import files
from promgate.config.fields import Reader
from promgate.config.model import UpstreamAuth, UpstreamIdentity, UpstreamTLS
from promgate.config.yaml_source import Item
from promgate.spiffe import is_spiffe, spiffe_id_error

__all__ = ["authorization", "basic_auth", "upstream_tls"]

#: An HTTP token (RFC 9110), for an ``authorization.type``.
_AUTH_SCHEME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: A bearer credential: one line of visible ASCII, no spaces.
_AUTH_CREDENTIALS = re.compile(r"^[\x21-\x7e]+$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[\x21-\x7e]+$")


def upstream_tls(r: Reader, item: Item) -> UpstreamTLS | None:
    """A route's ``tls``: how the upstream is verified, and the client certificate shown."""
    t = r.fields(item, ("ca", "server_name", "cert", "key", "identity"))
    if t is None:
        return None
    ca = r.existing_file(t["ca"]) if "ca" in t else None
    if ca is not None:
        files.certificates(r, t["ca"], ca)
    server_name = r.string(t["server_name"]) if "server_name" in t else None
    cert = key = None
    if "cert" in t and "key" not in t:
        r.error(item.src, t["cert"].key, "a client certificate needs its 'key'")
    elif "key" in t and "cert" not in t:
        r.error(item.src, t["key"].key, "a client key needs its 'cert'")
    elif "cert" in t:
        cert, key = files.client_certificate(r, t["cert"], t["key"])
    identity = _upstream_identity(r, t["identity"]) if "identity" in t else None
    return UpstreamTLS(ca=ca, server_name=server_name, cert=cert, key=key, identity=identity)


def _upstream_identity(r: Reader, item: Item) -> UpstreamIdentity | None:
    """``{dns: NAME}`` or ``{uri: URI}``: what the upstream's certificate must name."""
    f = r.fields(item, ("dns", "uri"))
    if f is None:
        return None
    if len(f) != 1:
        r.error(item.src, item.key, "give exactly one of dns, uri")
        return None
    ((kind, value),) = f.items()
    text = r.string(value)
    if text is None:
        return None
    if kind == "dns":
        try:
            DNS_ID(text)
        except ValueError:
            r.error(value.src, value.key, "must be a DNS name (no wildcard, not an IP address)")
            return None
        return UpstreamIdentity(dns=text)
    if not _URI.fullmatch(text):
        r.error(
            value.src,
            value.key,
            "must be an absolute URI such as spiffe://example.org/ns/prod/sa/exporter",
        )
        return None
    if is_spiffe(text) and (why := spiffe_id_error(text)) is not None:
        r.error(value.src, value.key, f"not a valid SPIFFE ID: {why}")
        return None
    return UpstreamIdentity(uri=text)


def authorization(r: Reader, item: Item) -> UpstreamAuth | None:
    """``authorization: {type, credentials_file}``, as in a Prometheus scrape config."""
    f = r.fields(item, ("type", "credentials_file", "credentials"))
    if f is None:
        return None
    scheme = "Bearer"
    if "type" in f:
        text = r.string(f["type"])
        if text is None:
            return None
        if not _AUTH_SCHEME.fullmatch(text):
            r.error(f["type"].src, f["type"].key, "must be an HTTP auth scheme such as Bearer")
            return None
        if text.lower() == "basic":
            r.error(
                f["type"].src,
                f["type"].key,
                "Basic credentials are written as basic_auth (username, password_file)",
            )
            return None
        scheme = text
    if "credentials" in f:
        r.error(
            f["credentials"].src,
            f["credentials"].key,
            "secrets are not written into the configuration; "
            "put the token in a file and name it with credentials_file",
        )
        return None
    if "credentials_file" not in f:
        r.error(item.src, item.key, "missing required key 'credentials_file'")
        return None
    secret = files.secret_file(r, f["credentials_file"])
    if secret is None:
        return None
    path, token = secret
    if not _AUTH_CREDENTIALS.fullmatch(token):
        r.error(
            f["credentials_file"].src,
            f["credentials_file"].key,
            f"{path}: the credentials must be one line of printable ASCII without spaces",
        )
        return None
    header = b"Authorization: %s %s\r\n" % (scheme.encode("ascii"), token.encode("ascii"))
    return UpstreamAuth(scheme=scheme, source=path, header=header)


def basic_auth(r: Reader, item: Item) -> UpstreamAuth | None:
    """``basic_auth: {username, password_file}``, as in a Prometheus scrape config."""
    f = r.fields(item, ("username", "password_file", "password"), ("username",))
    if f is None:
        return None
    username = r.string(f["username"]) if "username" in f else None
    if username is not None and (
        ":" in username or any(ord(c) < 0x20 or ord(c) == 0x7F for c in username)
    ):
        r.error(
            f["username"].src,
            f["username"].key,
            "must not contain ':' or control characters",
        )
        username = None
    secret = None
    if "password" in f:
        r.error(
            f["password"].src,
            f["password"].key,
            "secrets are not written into the configuration; "
            "put the password in a file and name it with password_file",
        )
    elif "password_file" not in f:
        r.error(item.src, item.key, "missing required key 'password_file'")
    else:
        secret = files.secret_file(r, f["password_file"])
    if username is None or secret is None:
        return None
    path, password = secret
    token = base64.b64encode(f"{username}:{password}".encode())
    return UpstreamAuth(
        scheme="Basic", source=path, header=b"Authorization: Basic " + token + b"\r\n"
    )
