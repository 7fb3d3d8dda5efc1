"""Give back the memory a TLS connection's outgoing buffer kept from its largest write.

Twisted's TLS (``TLSMemoryBIOProtocol``) has OpenSSL write each record into a memory BIO
and reads it out at once. The BIO keeps the capacity it once needed: after a response of
16 KiB or more, about 20 KiB per connection stay allocated for as long as it is open,
idle or not, a third of what an idle keep-alive connection costs (bench/README.md, Idle
connections). ``SSL_MODE_RELEASE_BUFFERS`` does not reach it: that mode concerns OpenSSL's
own record buffers.

When the connection is idle and that BIO holds no byte, it is replaced with a new, empty
one (``SSL_set_bio`` frees the old one). The TLS session is not touched: the BIO only
carries ciphertext between OpenSSL and Twisted. pyOpenSSL has no public call for this, so
it uses the attributes in which ``OpenSSL.SSL.Connection`` keeps its memory BIOs; if they
are not there (another pyOpenSSL), nothing is done.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib


def release_write_buffer(transport: Any) -> bool:
    """Replace the outgoing memory BIO of ``transport``'s TLS connection with an empty one,
    if it is a TLS transport over memory BIOs and nothing is waiting in it. Whether it
    was replaced."""
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
    if _lib.BIO_get_mem_data(from_ssl, _ffi.new("char **")) != 0:
        return False  # bytes not yet handed to the socket
    fresh = _lib.BIO_new(_lib.BIO_s_mem())
    if fresh == _ffi.NULL:
        return False
    # The read BIO is the one already set: SSL_set_bio takes over only the new write BIO
    # and frees the old one.
    _lib.SSL_set_bio(ssl, into_ssl, fresh)
    connection._from_ssl = fresh
    return True


__all__ = ["release_write_buffer"]
