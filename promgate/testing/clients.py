"""Small HTTPS clients for tests, with client certificates, on loopback."""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Mapping

import attrs

from promgate.addresses import split_address

__all__ = ["Response", "https_connection", "https_get", "request"]


@attrs.frozen
class Response:
    """An HTTP response as a test sees it."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def https_connection(
    address: str, context: ssl.SSLContext | None, *, timeout: float = 30.0
) -> http.client.HTTPConnection:
    """A client connection to ``address`` (TLS unless ``context`` is None), not yet opened.

    Reuse it for several requests to exercise keep-alive. The certificate is checked
    against the literal address, which TestPKI's gateway certificate carries as an IP SAN.
    """
    split = split_address(address)
    if split is None:
        raise ValueError(f"not host:port: {address!r}")
    host, port = split
    if context is None:
        return http.client.HTTPConnection(host, port, timeout=timeout)
    return http.client.HTTPSConnection(host, port, context=context, timeout=timeout)


def https_get(
    address: str,
    path: str,
    context: ssl.SSLContext | None,
    *,
    headers: Mapping[str, str] | None = None,
    method: str = "GET",
    timeout: float = 30.0,
) -> Response:
    """One request over a fresh connection (TLS unless ``context`` is None)."""
    conn = https_connection(address, context, timeout=timeout)
    try:
        return request(conn, path, headers=headers, method=method)
    finally:
        conn.close()


def request(
    conn: http.client.HTTPConnection,
    path: str,
    *,
    headers: Mapping[str, str] | None = None,
    method: str = "GET",
) -> Response:
    """One request on ``conn`` (opened if need be), its body read to the end."""
    conn.request(method, path, headers=dict(headers or {}))
    resp = conn.getresponse()
    body = resp.read()
    return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
