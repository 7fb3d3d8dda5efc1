"""Which of a gateway's worker processes this one is, when ``workers`` is above 1."""

from __future__ import annotations

import attrs

__all__ = ["WorkerSlot"]


@attrs.frozen
class WorkerSlot:
    """A worker's place among its supervisor's workers: ``index`` counts from 0 to
    ``count - 1`` and is kept by the worker that replaces one that died."""

    index: int
    count: int

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"worker {self.index} is not one of {self.count}")
