"""Redis for tests of the limits shared through Redis (``shared_limits``).

``RedisServer`` is a real ``redis-server`` on a free port of 127.0.0.1, in a directory of
its own, persisting nothing; it can be stopped and started again on the same port, and
paused (SIGSTOP) to play a Redis that stops answering; it can be a replica of another,
or a Redis Sentinel watching one. ``ScriptedRedis`` stands in for the connection in
memory: the test answers each call when it likes (or never). ``until`` waits, on the
reactor, for something to become true.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest

__all__ = ["RedisServer", "ScriptedRedis", "redis_server_path", "require_redis_server", "until"]


async def until(probe: Any, what: str, limit: int = 300, every: float = 0.05) -> Any:
    """Ask ``probe`` (a coroutine function) every ``every`` seconds, at most ``limit``
    times, until it answers something true; that answer."""
    from twisted.internet import reactor

    for _ in range(limit):
        answer = await probe()
        if answer:
            return answer
        await deferLater(reactor, every, lambda: None)
    raise AssertionError(f"gave up waiting for {what}")


def redis_server_path() -> str | None:
    """Where ``redis-server`` is, if installed."""
    return shutil.which("redis-server")


def require_redis_server() -> None:
    """Skip the test calling it if ``redis-server`` is not installed; under CI (which
    installs it), fail it instead."""
    if redis_server_path() is not None:
        return
    if os.environ.get("CI"):
        raise AssertionError("redis-server is not installed; CI installs it")
    raise SkipTest("redis-server is not installed")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` subprocess on 127.0.0.1. ``start`` waits until it answers
    ``PING``; ``stop`` ends it; ``start`` again uses the same port. With ``tls`` (its
    certificate, key and the CA that signed it), it speaks TLS only, and ``endpoint`` is a
    ``tls:`` endpoint trusting that CA. With ``replica_of``, it replicates that server;
    with ``sentinel`` (a name and a master), it is a Redis Sentinel watching the master
    under that name (with its password, if it has one), with a quorum of one, taking a
    master for down after 1s."""

    def __init__(
        self,
        directory: Path | None = None,
        *,
        password: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
        replica_of: RedisServer | None = None,
        sentinel: tuple[str, RedisServer] | None = None,
    ) -> None:
        self.directory = Path(directory or tempfile.mkdtemp(prefix="redis-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.tls = tls
        self.replica_of = replica_of
        self.sentinel = sentinel
        self.trust = self.directory / "trust"
        if tls is not None:
            self.trust.mkdir(exist_ok=True)
            shutil.copy(tls[2], self.trust / "ca.pem")
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.directory / "redis.log"

    @property
    def endpoint(self) -> str:
        """The client endpoint string promgate's ``shared_limits.redis.endpoint`` takes."""
        if self.tls is not None:
            return f"tls:localhost:{self.port}:trustRoots={self.trust}"
        return f"tcp:127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> RedisServer:
        server = redis_server_path()
        if server is None:
            raise RuntimeError("redis-server is not installed")
        args = [
            server,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.log_path),
        ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
        if self.sentinel is not None:
            name, master = self.sentinel
            conf = self.directory / "sentinel.conf"
            conf.write_text(
                f"sentinel monitor {name} 127.0.0.1 {master.port} 1\n"
                f"sentinel down-after-milliseconds {name} 1000\n"
                f"sentinel failover-timeout {name} 5000\n"
                + (f"sentinel auth-pass {name} {master.password}\n" if master.password else "")
            )
            args = [server, str(conf), "--sentinel", "--port", str(self.port), "--bind"]
            args += ["127.0.0.1", "--dir", str(self.directory), "--logfile", str(self.log_path)]
        if self.tls is not None:
            cert, key, ca = self.tls
            args[2] = "0"  # no plain port
            args += ["--tls-port", str(self.port), "--tls-cert-file", str(cert)]
            args += ["--tls-key-file", str(key), "--tls-ca-cert-file", str(ca)]
            args += ["--tls-auth-clients", "no"]
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while self.command("PING") not in (b"+PONG", b"-NOAUTH Authentication required."):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start:\n{self.log()}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """End it (continued first, if paused)."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)
            process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def command(self, *words: str, timeout: float = 2.0) -> bytes | None:
        """One command, in a fresh connection (inline protocol): the first line of the
        reply, or None if nothing answered."""
        try:
            with self._connect(timeout) as s:
                if self.password is not None:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    _read_line(s)
                s.sendall((" ".join(words) + "\r\n").encode())
                return _read_line(s)
        except OSError:
            return None

    def keys(self, pattern: str = "*") -> list[str]:
        """The keys matching ``pattern`` (a few: for tests)."""
        try:
            with self._connect(2.0) as s:
                if self.password is not None:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    _read_line(s)
                s.sendall(f"KEYS {pattern}\r\n".encode())
                count = int(_read_line(s)[1:])
                keys = []
                for _ in range(count):
                    _read_line(s)
                    keys.append(_read_line(s).decode())
                return keys
        except OSError:
            return []

    def _connect(self, timeout: float) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        if self.tls is None:
            return s
        context = ssl.create_default_context(cafile=str(self.tls[2]))
        return context.wrap_socket(s, server_hostname="localhost")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError as e:
            return f"<{self.log_path}: {e}>"


def _prctl() -> Any:
    """libc's ``prctl``, looked up once, in this process (Linux only)."""
    try:
        import ctypes

        return ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: end with the process that started it (a test run that
    is killed leaves no redis-server behind). Only calls what was looked up before."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _read_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        data += chunk
    return data.rstrip(b"\r\n")


class ScriptedRedis:
    """A connection to Redis (``promgate.redis_link.RedisLink`` and its commands) whose
    script calls wait for the test to answer them (``calls``); other commands (``ZREM``,
    ``PING``) are noted in ``commands`` and answered at once (or, sent with ``forget``,
    not at all). A ``MemoryGateway`` with ``shared_limits`` has one, as ``redis``."""

    def __init__(self) -> None:
        #: Script calls not answered yet: (keys, args, the Deferred to fire).
        self.calls: list[tuple[list[str], list[Any], Deferred[Any]]] = []
        self.commands: list[tuple[Any, ...]] = []
        self.connected = True

    def connection(self) -> ScriptedRedis | None:
        return self if self.connected else None

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        self.connected = False
        return succeed(None)

    def abort(self) -> None:
        self.connected = False

    def eval(self, script: bytes, keys: list[str], args: list[Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((keys, args, d))
        return d

    def execute_command(self, *args: Any) -> Deferred[Any]:
        self.commands.append(args)
        return succeed(1)

    def forget(self, *args: Any) -> None:
        self.commands.append(args)

    def answer(self, reply: Any) -> None:
        """Answer the oldest call still waiting."""
        _, _, d = self.calls.pop(0)
        d.callback(reply)
