"""Fake exporters for tests: upstreams that answer, stall or misbehave on purpose."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterable, Mapping

from cryptography import x509

from promgate.addresses import host_port

__all__ = ["FakeExporter"]

_LINGER_RESET = struct.pack("ii", 1, 0)

Handler = Callable[
    [bytes, Mapping[str, str]], "tuple[int, Mapping[str, str], bytes | Iterable[bytes]]"
]


class FakeExporter:
    """A small HTTP/1.1 server on 127.0.0.1 serving fixed bodies, or misbehaving on purpose.

    ``routes`` maps a request path to either bytes (served with Content-Length) or a
    behaviour: ``"hang"`` (never answers), ``"held"`` (the registered body, with a
    Content-Length, once :meth:`release` is called), ``"reset"`` (closes at once),
    ``"chunked:N"`` (the registered body in N-byte chunks), ``"close"`` (no length,
    close-delimited), ``"garbage"`` (not HTTP), ``"reset_mid_body"`` (the head and the
    first half of the registered body, with the full Content-Length, then a TCP reset),
    ``"raw"`` (the registered body sent as the whole response, byte for byte, then a close:
    for responses no well-behaved server would send).
    Requests it saw are in ``requests``; ``connections`` counts the connections accepted.
    Over TLS, ``client_subjects`` lists the subject of each client certificate shown in a
    completed handshake, and ``tls_failures`` counts the handshakes that failed.
    """

    def __init__(
        self,
        routes: Mapping[str, bytes | str],
        bodies: Mapping[str, bytes] | None = None,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.tls = tls
        self.routes = dict(routes)
        self.bodies = dict(bodies or {})
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.connections = 0
        self.client_subjects: list[str] = []
        self.tls_failures = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.address = host_port("127.0.0.1", self.port)
        self._stopping = threading.Event()
        self._released = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: list[socket.socket] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    def release(self) -> None:
        """Let every ``"held"`` answer go, those waiting now and any later ones."""
        self._released.set()

    def stop(self) -> None:
        """Stop accepting and close every connection; the serving threads then end."""
        self._stopping.set()
        self._released.set()
        for s in [self._sock, *self._open]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept() or recv()
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            self._open.append(client)
            t = threading.Thread(target=self._serve, args=(client,), daemon=True)
            t.start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(60)
        if self.tls is not None:
            try:
                client = self.tls.wrap_socket(client, server_side=True)
            except (ssl.SSLError, OSError):
                self.tls_failures += 1
                client.close()
                return
            assert isinstance(client, ssl.SSLSocket)
            der = client.getpeercert(binary_form=True)
            if der:
                subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
                self.client_subjects.append(subject)
        buf = b""
        try:
            while not self._stopping.is_set():
                while b"\r\n\r\n" not in buf:
                    data = client.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                self.requests.append((target, headers))
                path = target.split("?", 1)[0]
                if not self._answer(client, method, path):
                    return
        except OSError:
            return
        finally:
            try:
                self._open.remove(client)
                client.close()
            except (OSError, ValueError):
                pass

    def _answer(self, client: socket.socket, method: str, path: str) -> bool:
        spec = self.routes.get(path)
        ctype = b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
        if spec is None:
            client.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\nnot found\n")
            return True
        if isinstance(spec, bytes):
            body = b"" if method == "HEAD" else spec
            client.sendall(
                b"HTTP/1.1 200 OK\r\n" + ctype + b"Content-Length: %d\r\n\r\n" % len(spec) + body
            )
            return True
        if spec == "hang":
            self._stopping.wait(120)
            return False
        if spec == "held":
            self._released.wait(120)
            if self._stopping.is_set():
                return False
            body = self.bodies.get(path, b"")
            client.sendall(
                b"HTTP/1.1 200 OK\r\n" + ctype + b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            return True
        if spec == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            return False
        if spec == "garbage":
            client.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
            return False
        body = self.bodies.get(path, b"")
        if spec.startswith("chunked:"):
            size = int(spec.split(":", 1)[1])
            client.sendall(b"HTTP/1.1 200 OK\r\n" + ctype + b"Transfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(body), size):
                piece = body[i : i + size]
                client.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            client.sendall(b"0\r\n\r\n")
            return True
        if spec == "raw":
            client.sendall(body)
            return False
        if spec == "close":
            client.sendall(b"HTTP/1.1 200 OK\r\n" + ctype + b"Connection: close\r\n\r\n" + body)
            return False
        if spec == "reset_mid_body":
            head = b"HTTP/1.1 200 OK\r\n" + ctype + b"Content-Length: %d\r\n\r\n" % len(body)
            client.sendall(head + body[: len(body) // 2])
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            return False
        raise ValueError(f"unknown behaviour {spec!r}")
