"""Failures that stop the gateway from starting, stated in one line for the operator."""

from __future__ import annotations

__all__ = ["StartupError"]


class StartupError(Exception):
    """Start-up cannot go on; ``str(error)`` is the whole message an operator reads.

    It names the listener or file and the cause, for example
    ``listener scrape: 127.0.0.1:9443: address already in use``. Whoever raises it has
    written nothing yet (no audit record, no ready file), so a failed start leaves no trace
    that could later look like a crash.
    """
