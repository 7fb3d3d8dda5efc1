"""``workers``: how many worker processes serve the listeners (one reactor per core)."""

from __future__ import annotations

from typing import Literal

from promgate.config.fields import Reader
from promgate.config.model import MAX_WORKERS
from promgate.config.sections import Sections

__all__ = ["check_workers"]


def check_workers(r: Reader, sections: Sections) -> int | Literal["auto"]:
    """``workers``: an integer from 1 to MAX_WORKERS, or ``auto`` (one per core this
    process may run on); 1 when not given."""
    item = sections.singletons.get("workers")
    if item is None:
        return 1
    value = item.value
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        r.error(item.src, item.key, f"must be an integer from 1 to {MAX_WORKERS}, or auto")
        return 1
    return value
