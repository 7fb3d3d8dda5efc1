"""Failures that stop the gateway from starting, stated in one line for the operator."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from types import TracebackType

__all__ = ["StartupError", "one_line_startup_errors", "os_error_text"]

ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], object]


class StartupError(Exception):
    """Start-up cannot go on; ``str(error)`` is the whole message an operator reads.

    It names the listener or file and the cause, for example
    ``listener scrape: 127.0.0.1:9443: address already in use``. Whoever raises it has
    written nothing yet (no audit record, no ready file), so a failed start leaves no trace
    that could later look like a crash.
    """


def one_line_startup_errors(previous: ExceptHook) -> ExceptHook:
    """A ``sys.excepthook`` for ``twistd promgate``: a StartupError that ends the process
    is its one line on standard error (the exit status is 1), not a traceback; anything
    else goes to ``previous``.

    twistd lets an exception from start-up leave the process (after removing its pid
    file); by then its log has taken over ``sys.stderr``, so the line goes to the
    process's own standard error, where the operator's terminal or journal shows it.
    """

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if isinstance(value, StartupError):
            stream = sys.__stderr__
            if stream is not None:
                stream.write(f"{value}\n")
                stream.flush()
            return
        previous(kind, value, tb)

    return hook


def os_error_text(error: object) -> str:
    """An OSError's cause as a message part: ``[Errno 98] Address already in use`` ->
    ``address already in use``."""
    code = getattr(error, "errno", None)
    text = os.strerror(code) if isinstance(code, int) and code in errno.errorcode else str(error)
    return text[:1].lower() + text[1:] if text[1:2].islower() else text
