"""Real TLS ClientHellos for tests of anything that reads one (SNI routing, say)."""

from __future__ import annotations

import contextlib
import functools
import ssl

__all__ = ["python_client_hello"]


@functools.lru_cache
def _python_context(maximum: ssl.TLSVersion, alpn: tuple[str, ...]) -> ssl.SSLContext:
    # A client context as create_default_context() makes it, without loading the system
    # trust store (slow, and the handshake never gets as far as a certificate).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.maximum_version = maximum
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def python_client_hello(
    server_name: str | None,
    *,
    maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
    alpn: list[str] | None = None,
) -> bytes:
    """The first flight of a Python ssl client (MemoryBIO + SSLObject)."""
    ctx = _python_context(maximum, tuple(alpn or ()))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()
