"""Give back the memory an idle TLS connection's buffers kept from its largest exchange.

Twisted's TLS (``TLSMemoryBIOProtocol``) has OpenSSL write each record into a memory BIO
and reads it out at once. The BIO keeps the capacity it once needed: after a response of
16 KiB or more, about 20 KiB per connection stay allocated for as long as it is open,
idle or not, a third of what an idle keep-alive connection costs (bench/README.md, Idle
connections). ``SSL_MODE_RELEASE_BUFFERS`` does not reach it: that mode concerns OpenSSL's
own record buffers. The incoming memory BIO does the same on a smaller scale (about 2 KiB
after the handshake and a request).

When the connection is idle, each of the two BIOs that holds no byte is replaced with a
new, empty one (``SSL_set_bio`` frees the old one). The TLS session is not touched: the
BIOs only carry ciphertext between OpenSSL and Twisted. pyOpenSSL has no public call for
this, so it uses the attributes in which ``OpenSSL.SSL.Connection`` keeps its memory BIOs;
if they are not there (another pyOpenSSL), nothing is done.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib


def _empty(bio: Any) -> bool:
    return bool(_lib.BIO_get_mem_data(bio, _ffi.new("char **")) == 0)


def release_idle_buffers(transport: Any) -> bool:
    """Replace each memory BIO of ``transport``'s TLS connection that holds no byte with a
    new, empty one, if it is a TLS transport over memory BIOs. Whether any was replaced."""
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return False
    connection = get_handle()
    if not isinstance(connection, SSL.Connection):
        return False  # plain TCP: the handle is the socket
    ssl = getattr(connection, "_ssl", None)
    into_ssl = getattr(connection, "_into_ssl", None)
    from_ssl = getattr(connection, "_from_ssl", None)
    if ssl is None or into_ssl is None or from_ssl is None:
        return False
    # A BIO with bytes in it is kept: received ciphertext not yet read by OpenSSL, or
    # ciphertext not yet handed to the socket.
    new_into = _lib.BIO_new(_lib.BIO_s_mem()) if _empty(into_ssl) else into_ssl
    new_from = _lib.BIO_new(_lib.BIO_s_mem()) if _empty(from_ssl) else from_ssl
    if new_into == _ffi.NULL or new_from == _ffi.NULL:
        for bio, old in ((new_into, into_ssl), (new_from, from_ssl)):
            if bio != _ffi.NULL and bio != old:
                _lib.BIO_free(bio)
        return False
    if new_into == into_ssl and new_from == from_ssl:
        return False
    # SSL_set_bio takes over each new BIO and frees the one it replaces; one passed again
    # as it was stays as it is.
    _lib.SSL_set_bio(ssl, new_into, new_from)
    connection._into_ssl = new_into
    connection._from_ssl = new_from
    return True


__all__ = ["release_idle_buffers"]
