"""The exclusive lock on an audit file: one writer at a time, and who holds it.

A gateway, or a ``promgate audit`` command that writes, opens the audit file with
:func:`lock_audit_file`, which takes a POSIX record lock (``fcntl(F_SETLK)``, write lock on the
whole file) before anything is written. Another process asking for it is refused with the
holder's pid, read with ``F_GETLK``. Readers (``promgate audit verify``) take no lock.

POSIX locks belong to the process, not to the file descriptor: a second open by the same
process would get the lock again, and closing *any* descriptor of the file releases it. So
this module remembers which files this process holds, refuses a second writer within the
process as well, and never closes a descriptor of a held file behind the holder's back: such
a descriptor (a refused second open, or a reader's) is kept until the holder closes.
Devices and pipes (``/dev/full``, a FIFO) are not locked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import sys
from pathlib import Path

from promgate.errors import StartupError

__all__ = ["LockedFile", "close_reader", "lock_audit_file"]

# struct flock: Linux orders it type, whence, start, len, pid; the BSDs and macOS start,
# len, pid, type, whence.
if sys.platform.startswith("linux"):
    _FLOCK = struct.Struct("hhqqi")
    _PID, _TYPE = 4, 0
else:  # pragma: no cover (not run on this platform)
    _FLOCK = struct.Struct("qqihh")
    _PID, _TYPE = 2, 3

#: The files this process holds, by (st_dev, st_ino).
_held: dict[tuple[int, int], LockedFile] = {}


def describe(error: OSError) -> str:
    """An OSError's text as a message continues it: ``is a directory``."""
    text = error.strerror or str(error)
    return text[:1].lower() + text[1:]


def in_use(path: Path, pid: int) -> str:
    """The refusal when another writer holds the audit file."""
    return f"audit log {path} is in use by another promgate (pid {pid})"


class LockedFile:
    """An audit file open for reading and appending, under this process's exclusive lock."""

    def __init__(self, path: Path, fd: int, key: tuple[int, int] | None) -> None:
        self.path = path
        self.fd = fd
        self._key = key  # None: a device or pipe, not locked
        self._strays: list[int] = []

    @property
    def regular(self) -> bool:
        """A regular file (locked), rather than a device or a pipe (not locked)."""
        return self._key is not None

    def keep(self, fd: int) -> None:
        """Close ``fd``, another descriptor of this file, only when this one closes."""
        self._strays.append(fd)

    def close(self) -> None:
        """Release the lock and close the file."""
        if self._key is not None and _held.get(self._key) is self:
            del _held[self._key]
        for fd in (*self._strays, self.fd):
            os.close(fd)
        self._strays.clear()


def lock_audit_file(path: Path) -> LockedFile:
    """Open (create, mode 0600) ``path`` for appending and take its exclusive lock.

    Raises :class:`~promgate.errors.StartupError` before writing anything if the file cannot
    be opened (``audit log /x/y: is a directory``) or another promgate holds it
    (``audit log /x/y is in use by another promgate (pid N)``).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StartupError(f"audit log {path}: {describe(e)}") from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise StartupError(f"audit log {path}: {describe(e)}") from None
    if not stat.S_ISREG(st.st_mode):
        return LockedFile(path, fd, None)
    key = (st.st_dev, st.st_ino)
    holder = _held.get(key)
    if holder is not None:
        holder.keep(fd)  # closing it would release the holder's lock
        raise StartupError(in_use(path, os.getpid()))
    for _ in range(3):  # the holder may let go between the two calls
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise StartupError(f"audit log {path}: cannot lock: {describe(e)}") from None
        else:
            locked = _held[key] = LockedFile(path, fd, key)
            return locked
        pid = _holder(fd)
        if pid is not None:
            os.close(fd)
            raise StartupError(in_use(path, pid))
    os.close(fd)
    raise StartupError(f"audit log {path}: cannot lock: it is locked and unlocked repeatedly")


def _holder(fd: int) -> int | None:
    """The pid holding a lock that conflicts with a write lock on the whole file, if any."""
    fields = [0] * 5
    fields[_TYPE] = fcntl.F_WRLCK
    answer = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, _FLOCK.pack(*fields)))
    if answer[_TYPE] == fcntl.F_UNLCK:
        return None
    pid: int = answer[_PID]
    return pid


def close_reader(fd: int) -> None:
    """Close a descriptor opened only to read, without releasing this process's lock on it."""
    try:
        st = os.fstat(fd)
    except OSError:
        holder = None
    else:
        holder = _held.get((st.st_dev, st.st_ino))
    if holder is None:
        os.close(fd)
    else:
        holder.keep(fd)
