"""How ``twistd promgate`` logs: text (twistd's own format) or one JSON object per line, at
a chosen level.

twistd builds its log observer after the plugin has made its service, and uses the
application's ``ILogObserver`` component when one is set instead of its own. The service
``makeService`` returns sets that component when it is given its parent (the application),
so the choice is made before the first line is written.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
from collections.abc import Mapping
from typing import IO, Any, Literal

import attrs
from twisted.application.service import IServiceCollection, MultiService
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile

__all__ = [
    "LEVELS",
    "LogChoice",
    "LoggingService",
    "json_line",
    "observer_for",
]

LogFormat = Literal["text", "json"]
#: ``--log-level`` values, as Twisted's levels.
LEVELS: Mapping[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}
#: Keys of an event that are the logging system's, not the event's own fields.
_LEGACY_KEYS = frozenset(
    {"format", "message", "system", "isError", "time", "why", "failure", "printed"}
)
#: Longest value written for one field (an event's own field could carry anything).
_MAX_FIELD = 4096


def _json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` as something ``json.dumps`` writes faithfully: strings, finite numbers,
    booleans, null, lists and objects of those; anything else as its ``repr``."""
    if value is None or isinstance(value, bool | int | str):
        return value if not isinstance(value, str) else value[:_MAX_FIELD]
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, bytes):
        return value[:_MAX_FIELD].decode("utf-8", "backslashreplace")
    if depth < 4 and isinstance(value, list | tuple | set | frozenset):
        return [_json_safe(v, depth + 1) for v in list(value)[:100]]
    if depth < 4 and isinstance(value, Mapping):
        return {str(k): _json_safe(v, depth + 1) for k, v in list(value.items())[:100]}
    return repr(value)[:_MAX_FIELD]


def json_line(event: LogEvent) -> str:
    """One event as one line of JSON: ``time`` (RFC 3339, UTC), ``level``, ``namespace``,
    ``message`` (the formatted text), then the event's own named fields; a failure's
    traceback as ``traceback``."""
    when = datetime.datetime.fromtimestamp(event.get("log_time", 0.0), datetime.timezone.utc)
    level = event.get("log_level", LogLevel.info)
    record: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(level, "name", "info"),
        "namespace": str(event.get("log_namespace", "")),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY_KEYS or key in record:
            continue
        record[key] = _json_safe(value)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = repr(failure)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


@attrs.frozen
class LogChoice:
    """What ``--log-format`` and ``--log-level`` asked for, and where twistd would log
    (its ``--logfile`` and ``--nodaemon``)."""

    log_format: LogFormat
    level: LogLevel
    logfile: str | None
    nodaemon: bool

    def stream(self) -> IO[str]:
        """The destination twistd would use: standard output when not daemonised without
        ``--logfile`` (or with ``--logfile -``), else the file (default ``twistd.log``),
        rotated by size as twistd rotates it."""
        if self.logfile == "-" or (self.nodaemon and not self.logfile):
            return sys.stdout
        return LogFile.fromFullPath(self.logfile or "twistd.log")  # type: ignore[no-any-return]


def observer_for(choice: LogChoice) -> ILogObserver:
    """The observer for ``choice``: its format, on its stream, dropping events below its
    level."""
    stream = choice.stream()
    if choice.log_format == "json":
        writer: ILogObserver = FileLogObserver(stream, json_line)
    else:
        writer = textFileLogObserver(stream)
    predicate = LogLevelFilterPredicate(defaultLogLevel=choice.level)
    filtered: ILogObserver = FilteringLogObserver(writer, [predicate])
    return filtered


class LoggingService(MultiService):
    """Holds the gateway; given the application as its parent, sets the application's log
    observer (which twistd then uses instead of its own)."""

    def __init__(self, observer: ILogObserver | None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._observer = observer

    def setServiceParent(self, parent: IServiceCollection | Componentized) -> None:
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]
        if self._observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self._observer)
