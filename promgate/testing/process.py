"""The real ``twistd promgate`` in a subprocess on loopback, waited on through its own
readiness (``--ready-file``), never on sleeps."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from promgate.testing.clients import Response, https_get

__all__ = ["GatewayProcess", "StartFailure", "run_twistd"]


def _subprocess_env() -> dict[str, str]:
    """The environment for a child ``twistd``: it imports the same promgate as we do."""
    import promgate

    env = dict(os.environ)
    root = str(Path(promgate.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


@attrs.frozen
class StartFailure:
    """How a ``twistd promgate`` that refused to start ended: exit status, what it wrote
    on standard error, and its log (standard output)."""

    returncode: int
    stderr: str
    log: str


def run_twistd(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``twistd ARGS...`` to its end, with the same promgate as ours; its output as text."""
    return subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args],
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class GatewayProcess:
    """The real ``twistd promgate`` in a subprocess, on loopback, for integration tests."""

    def __init__(
        self,
        directory: Path,
        config: str,
        *,
        name: str = "promgate.yaml",
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        prelude: str = "",
    ) -> None:
        """``env`` adds to the child's environment, ``pass_fds`` are descriptors it
        inherits, and ``prelude`` is Python it runs before twistd (see
        :mod:`promgate.testing.systemd`)."""
        self.env = dict(env or {})
        self.pass_fds = tuple(pass_fds)
        self.prelude = prelude
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path = self.directory / name
        self.config_path.write_text(config)
        self.ready_file = self.directory / "ready.json"
        self.log_path = self.directory / "twistd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.addresses: dict[str, str] = {}

    def _spawn(self, stderr: Path | None = None) -> subprocess.Popen[bytes]:
        """Run ``twistd -n promgate``; its output goes to ``log_path`` (standard error too,
        unless ``stderr`` names a file of its own)."""
        if self.ready_file.exists():
            self.ready_file.unlink()
        with contextlib.ExitStack() as files:
            log = files.enter_context(self.log_path.open("ab"))
            err: Any = subprocess.STDOUT
            if stderr is not None:
                err = files.enter_context(stderr.open("wb"))
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    self.prelude + "from twisted.scripts.twistd import run; run()",
                    "-n",
                    "--pidfile=",
                    "promgate",
                    "--config",
                    str(self.config_path),
                    "--ready-file",
                    str(self.ready_file),
                ],
                cwd=self.directory,
                env={**_subprocess_env(), **self.env},
                pass_fds=self.pass_fds,
                stdout=log,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        return self.process

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        process = self._spawn()
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if process.poll() is not None:
                raise RuntimeError(f"twistd promgate exited {process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"twistd promgate not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.02)
        self.addresses = json.loads(self.ready_file.read_text())["listeners"]
        return self

    def start_expecting_failure(self, timeout: float = 30.0) -> StartFailure:
        """Start ``twistd promgate`` where it must refuse to start; wait for it to exit.

        Raises AssertionError if it becomes ready (it is then stopped) or does not exit in
        time. Standard error is kept apart from the log, as an operator's terminal or
        journal shows it.
        """
        stderr_path = self.directory / "twistd.stderr"
        process = self._spawn(stderr=stderr_path)
        try:
            returncode = process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"twistd promgate still running after {timeout}s") from None
        if self.ready_file.exists():
            raise AssertionError("twistd promgate wrote its ready file and then exited")
        return StartFailure(returncode, stderr_path.read_text(errors="replace"), self.log())

    def terminate(self) -> None:
        """Send SIGTERM (the gateway drains, then exits) without waiting for the exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the gateway to exit; its exit status."""
        assert self.process is not None, "never started"
        return self.process.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def address(self, listener: str) -> str:
        return self.addresses[listener]

    def get(self, listener: str, path: str, context: ssl.SSLContext | None, **kw: Any) -> Response:
        return https_get(self.address(listener), path, context, **kw)

    def audit_records(self, path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def last_audit_seq(self, path: Path) -> int:
        """The sequence number of the last complete record in ``path`` (0 if none): a mark
        to tell later records apart from earlier ones of the same peer address."""
        text = path.read_text() if path.exists() else ""
        for line in reversed(text.splitlines()):
            if line.endswith("}"):
                seq: int = json.loads(line)["seq"]
                return seq
        return 0

    def wait_for_audit_record(
        self,
        path: Path,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """The first record in the audit log ``path`` that ``predicate`` accepts.

        Waits (bounded by ``timeout``) because some records are written when the gateway
        sees a connection close, which can be just after the client gave up on it: a
        refused TLS handshake, for instance.
        """
        deadline = time.monotonic() + timeout
        while True:
            text = path.read_text() if path.exists() else ""
            for line in text.splitlines():
                if line.endswith("}"):  # skip a line still being written
                    record: dict[str, Any] = json.loads(line)
                    if predicate(record):
                        return record
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"no matching record in {path}, and the gateway exited")
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching record in {path} after {timeout}s")
            time.sleep(0.02)
