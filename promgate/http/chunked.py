"""A strict decoder for chunked response bodies (RFC 9112, section 7.1).

The gateway never relays chunk framing as it received it: it decodes the upstream's
chunks and the relay writes chunks of its own. Chunk extensions and trailer fields are
checked (as strictly as llhttp checks them) and dropped, so no byte the gateway did not
understand reaches the client, and a framing quirk one parser reads differently from
another cannot travel through the gateway.

Strict means: a chunk size is 1 to 15 hex digits (no sign, no ``0x``, no spaces),
every line ends in CRLF (no bare LF, no bare CR, no NUL), the data of a chunk is followed
by exactly CRLF, an extension is ``;name`` or ``;name=value`` (a token, or a quoted
string) with no white space, and a trailer field is ``name: value`` with a token name,
no obsolete line folding and no control characters, and never one of the framing or
routing fields (``Content-Length``, ``Transfer-Encoding``, ``Host``, ...).

The decoder copies no payload: ``feed`` returns memoryview slices of the bytes it was
given.
"""

from __future__ import annotations

import enum
import re

#: The longest chunk-size line or trailer line accepted, CRLF included.
MAX_LINE = 4096
#: The most trailer fields accepted (they are dropped anyway).
MAX_TRAILERS = 100

_SIZE_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,15})"
    rb"((?:;[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
    rb"(?:=(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
    rb'|"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"))?)*)'
)
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: Fields that describe framing, routing or authentication: never valid as trailers.
_FORBIDDEN_TRAILERS = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"trailer",
        b"host",
        b"connection",
        b"te",
        b"content-type",
        b"content-encoding",
        b"content-range",
        b"authorization",
        b"proxy-authorization",
        b"set-cookie",
    }
)


class ChunkedError(Exception):
    """The body is not valid chunked framing; the message says precisely why."""


class _State(enum.Enum):
    SIZE = "reading a chunk-size line"
    DATA = "reading chunk data"
    DATA_END = "expecting the CRLF after chunk data"
    TRAILER = "reading trailer fields"
    DONE = "after the last chunk"


class ChunkedDecoder:
    """Decodes one chunked body fed in pieces of any size.

    ``feed`` returns the payload bytes found in a piece as memoryview slices of it. After
    the last chunk and the trailer section, ``done`` is true and ``excess`` is how many
    bytes of the last piece followed the message (bytes nobody asked for).
    """

    __slots__ = ("_line", "_remaining", "_state", "_trailers", "excess")

    def __init__(self) -> None:
        self._state = _State.SIZE
        self._remaining = 0
        self._line = b""
        self._trailers = 0
        self.excess = 0

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    @property
    def state(self) -> str:
        """Where the decoder is, in words (for the audit record of a cut body)."""
        return self._state.value

    def feed(self, data: bytes) -> list[memoryview]:
        """Decode ``data``; the payload slices it holds. Raises ChunkedError."""
        out: list[memoryview] = []
        state = self._state
        if state is _State.DONE:
            self.excess += len(data)
            return out
        view = memoryview(data)
        n = len(data)
        pos = 0
        while pos < n:
            if state is _State.DATA:
                remaining = self._remaining
                end = pos + remaining
                if end <= n:
                    out.append(view[pos:end])
                    pos = end
                    self._remaining = 0
                    state = _State.DATA_END
                else:
                    out.append(view[pos:])
                    self._remaining = remaining - (n - pos)
                    pos = n
                continue
            if state is _State.DATA_END and not self._line and n - pos >= 2:
                # The usual case, without building a line: exactly CRLF, then the next size.
                if data[pos] != 13 or data[pos + 1] != 10:
                    raise ChunkedError("chunk data not followed by CRLF")
                pos += 2
                state = _State.SIZE
                continue
            idx = data.find(b"\n", pos)
            if idx < 0:
                line = self._line + data[pos:]
                if len(line) >= MAX_LINE:
                    raise ChunkedError(f"line too long ({state.value})")
                self._line = line
                pos = n
                break
            line = self._line + data[pos:idx] if self._line else data[pos:idx]
            self._line = b""
            pos = idx + 1
            if len(line) >= MAX_LINE:
                raise ChunkedError(f"line too long ({state.value})")
            if state is _State.DATA_END:
                if line != b"\r":
                    raise ChunkedError("chunk data not followed by CRLF")
                state = _State.SIZE
                continue
            if not line.endswith(b"\r"):
                raise ChunkedError(f"bare LF ({state.value})")
            line = line[:-1]
            if state is _State.SIZE:
                match = _SIZE_LINE.fullmatch(line)
                if match is None:
                    raise ChunkedError(f"malformed chunk-size line {_show(line)}")
                size = int(match.group(1), 16)
                if size:
                    self._remaining = size
                    state = _State.DATA
                else:
                    state = _State.TRAILER
            elif line:
                self._trailer(line)
            else:
                state = _State.DONE
                self.excess = n - pos
                break
        self._state = state
        return out

    def _trailer(self, line: bytes) -> None:
        self._trailers += 1
        if self._trailers > MAX_TRAILERS:
            raise ChunkedError(f"more than {MAX_TRAILERS} trailer fields")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise ChunkedError(f"malformed trailer field {_show(line)}")
        if _BAD_VALUE.search(value):
            raise ChunkedError(f"control character in trailer field {_show(name)}")
        if name.lower() in _FORBIDDEN_TRAILERS:
            raise ChunkedError(f"{_show(name)} is not allowed as a trailer field")


def _show(data: bytes) -> str:
    """``data`` for an audit record's detail: escaped, at most 64 bytes of it."""
    text = repr(data[:64])[1:]
    return text + "..." if len(data) > 64 else text


__all__ = ["MAX_LINE", "MAX_TRAILERS", "ChunkedDecoder", "ChunkedError"]
