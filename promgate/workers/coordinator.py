"""A reload across every worker, all or none.

Every worker is asked to :class:`Prepare` the configuration (load it, check it, build its
snapshot, apply nothing). Only when every one of them prepared it are they all told to
:class:`Commit`; otherwise every one is told to :class:`Abort`, and the reload is refused
with the problems the workers found. A worker that cannot be asked (its process ended
meanwhile) counts as one that could not prepare.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.protocols import amp

from promgate.workers.control import Abort, Commit, Prepare

__all__ = ["ReloadOutcome", "coordinate_reload"]

log = Logger()


@attrs.frozen
class ReloadOutcome:
    """What a reload across the workers did."""

    applied: bool
    #: Why it was refused (each once, in the order the workers gave them).
    problems: tuple[str, ...] = ()
    #: What changed, in one line (the first worker's account).
    summary: str = ""


async def coordinate_reload(
    workers: Sequence[tuple[int, amp.AMP]], generation: int, trigger: str
) -> ReloadOutcome:
    """Reload ``workers`` (each a worker index and its control channel) as one."""
    prepared = await _each(
        workers, lambda control: control.callRemote(Prepare, generation=generation, trigger=trigger)
    )
    problems: list[str] = []
    for (index, _), (ok, result) in zip(workers, prepared, strict=True):
        found = list(result["problems"]) if ok else [f"worker {index}: {_failure_text(result)}"]
        for problem in found:
            log.error(
                "reload ({trigger}): worker {worker} could not prepare it: {problem}",
                trigger=trigger,
                worker=index,
                problem=problem,
            )
            if problem not in problems:
                problems.append(problem)
    if problems:
        why = "not applied: another worker could not apply it"
        await _each(
            workers,
            lambda control: control.callRemote(Abort, generation=generation, why=why),
        )
        return ReloadOutcome(False, tuple(problems))
    committed = await _each(
        workers, lambda control: control.callRemote(Commit, generation=generation)
    )
    summaries = [result["summary"] for ok, result in committed if ok and result["applied"]]
    failed = [
        index
        for (index, _), (ok, r) in zip(workers, committed, strict=True)
        if not ok or not r["applied"]
    ]
    for index in failed:
        log.error(
            "reload ({trigger}): worker {worker} did not apply it", trigger=trigger, worker=index
        )
    summary = summaries[0] if summaries else ""
    if failed:
        summary += f"; not applied by worker(s) {', '.join(map(str, failed))}"
    return ReloadOutcome(True, summary=summary)


async def _each(workers: Sequence[tuple[int, amp.AMP]], call: Any) -> list[tuple[bool, Any]]:
    """``call`` on every worker's control channel at once; (ok, result or Failure) each."""
    calls: list[Deferred[Any]] = []
    for _, control in workers:
        try:
            calls.append(call(control))
        except Exception as e:  # the connection is already gone
            d: Deferred[Any] = Deferred()
            d.errback(e)
            calls.append(d)
    if not calls:
        return []
    results: list[tuple[bool, Any]] = await DeferredList(calls, consumeErrors=True)
    return results


def _failure_text(failure: Any) -> str:
    message = failure.getErrorMessage() if hasattr(failure, "getErrorMessage") else str(failure)
    return f"could not be asked ({message})"
