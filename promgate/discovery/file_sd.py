"""The ``file_sd`` provider: Prometheus file_sd JSON and YAML files, found by glob.

Files are re-read when their modification time, size or inode changes (polled every
``poll_interval``), and all of them every ``refresh_interval`` as a safety net. A file
that cannot be read or parsed is reported and its previous contents kept; a file that
disappears takes its targets with it. The files are small and local, so they are read on
the reactor thread, as Prometheus reads them.
"""

from __future__ import annotations

import glob as _glob
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import yaml
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from promgate.config.model import Target
from promgate.discovery.provider import BaseProvider, Discovered, IDiscoveryProvider

Signature = tuple[int, int, int]
DEFAULT_REFRESH_INTERVAL = 300.0
_SUFFIXES = (".json", ".yml", ".yaml")


class FileSystem(Protocol):
    """The three things file_sd asks of the file system (in memory in tests)."""

    def glob(self, pattern: str) -> list[str]: ...

    def signature(self, path: str) -> Signature | None: ...

    def read(self, path: str) -> bytes: ...


class RealFileSystem:
    """The operating system's files."""

    def glob(self, pattern: str) -> list[str]:
        return _glob.glob(pattern)

    def signature(self, path: str) -> Signature | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read(16 * 1024 * 1024 + 1)


class FileSDError(ValueError):
    """A file_sd file that is not a list of ``{targets, labels}`` groups."""


def parse_file_sd(path: str, data: bytes) -> tuple[Target, ...]:
    """The targets of one file_sd file (JSON or YAML by suffix), or FileSDError."""
    from promgate.addresses import split_address
    from promgate.config.yaml_source import load_bounded

    if len(data) > 16 * 1024 * 1024:
        raise FileSDError("larger than 16MiB")
    try:
        if path.endswith(".json"):
            doc = json.loads(data)
        else:
            doc = load_bounded(data.decode("utf-8"), path)
    except (ValueError, yaml.YAMLError) as e:
        raise FileSDError(f"not valid {'JSON' if path.endswith('.json') else 'YAML'}: {e}") from e
    if doc is None:
        return ()
    if not isinstance(doc, list):
        raise FileSDError("must be a list of {targets, labels} groups")
    out: list[Target] = []
    for i, group in enumerate(doc):
        if not isinstance(group, dict) or not isinstance(group.get("targets"), list):
            raise FileSDError(f"group {i}: must be a mapping with a 'targets' list")
        unknown = set(group) - {"targets", "labels"}
        if unknown:
            raise FileSDError(f"group {i}: unknown key {sorted(unknown)[0]!r}")
        labels = group.get("labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise FileSDError(f"group {i}: labels must map names to strings")
        labels = dict(labels)
        labels["__meta_filepath"] = path
        for j, address in enumerate(group["targets"]):
            if not isinstance(address, str) or split_address(address) is None:
                raise FileSDError(f"group {i} target {j}: {address!r} is not host:port")
            out.append(Target(address, labels))
    return tuple(out)


@implementer(IDiscoveryProvider)
class FileSD(BaseProvider):
    """Targets from the files matching ``patterns`` (absolute paths or globs)."""

    def __init__(
        self,
        patterns: Sequence[str],
        clock: IReactorTime,
        *,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        poll_interval: float = 5.0,
        fs: FileSystem | None = None,
    ) -> None:
        self.patterns = tuple(patterns)
        self.clock = clock
        self.refresh_interval = refresh_interval
        self.poll_interval = poll_interval
        self.fs: FileSystem = fs if fs is not None else RealFileSystem()
        #: Per file: the signature last read (good or bad) and its last good targets.
        self.files: dict[str, tuple[Signature | None, tuple[Target, ...]]] = {}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], reactor: IReactorTime) -> FileSD:
        return cls(
            settings["files"],
            reactor,
            refresh_interval=settings.get("refresh_interval", DEFAULT_REFRESH_INTERVAL),
            poll_interval=settings.get("poll_interval", 5.0),
        )

    def scan(self) -> dict[str, Signature | None]:
        found: dict[str, Signature | None] = {}
        for pattern in self.patterns:
            names = self.fs.glob(pattern) if _glob.has_magic(pattern) else [pattern]
            for name in sorted(names):
                if name.endswith(_SUFFIXES) and name not in found:
                    sig = self.fs.signature(name)
                    if sig is not None:
                        found[name] = sig
        return found

    def changed(self) -> bool:
        seen = self.scan()
        return seen.keys() != self.files.keys() or any(
            self.files[name][0] != sig for name, sig in seen.items()
        )

    def refresh(self) -> Discovered:
        """Re-read every file (the safety net re-reads unchanged ones too)."""
        errors: list[str] = []
        files: dict[str, tuple[Signature | None, tuple[Target, ...]]] = {}
        for name, sig in self.scan().items():
            previous = self.files.get(name, (None, ()))[1]
            try:
                files[name] = (sig, parse_file_sd(name, self.fs.read(name)))
            except (OSError, FileSDError) as e:
                errors.append(f"{name}: {e}")
                files[name] = (sig, previous)
        self.files = files
        targets: dict[str, Target] = {}
        for _, found in files.values():
            for target in found:
                targets.setdefault(target.address, target)
        return Discovered(tuple(targets.values()), tuple(errors))
