"""One audit chain per worker process: which file each writes, and checking them all.

With ``workers: 1`` the gateway writes ``audit.path`` itself, as a single process always
has. With more workers, worker ``K`` writes its own chain to ``audit.path`` with ``.wK``
put before the last suffix (``audit.jsonl`` -> ``audit.w0.jsonl``, ``audit.w1.jsonl``;
``audit`` -> ``audit.w0``), with its own lock, head and rotated files (``audit.w0.jsonl.1``).
The worker that replaces one that died keeps its slot and continues that slot's chain from
its last intact record, as a restart does. The names never begin with ``NAME.`` or ``NAME-``
for the configured name, so they are never taken for its rotated files, and the chain files
of one gateway are ``STEM.w*SUFFIX``. ``promgate audit verify --config`` checks every chain
(:func:`promgate.audit_verify.verify_chains`): those of the configured workers must exist,
and others found beside them (from an earlier, larger ``workers``, or from a single
process) are checked and reported too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import attrs

from promgate.worker_slot import WorkerSlot

__all__ = [
    "Chain",
    "chain_path",
    "configured_chains",
    "found_chains",
    "is_chain_name",
    "worker_file",
    "worker_note",
]


def _parts(path: Path) -> tuple[str, str]:
    """The name before and the suffix after where the worker number goes."""
    suffix = path.suffix if path.stem else ""
    return path.name[: len(path.name) - len(suffix)], suffix


def worker_file(path: Path, index: int) -> Path:
    """The file worker ``index`` writes its chain to, for the configured ``path``."""
    stem, suffix = _parts(path)
    return path.with_name(f"{stem}.w{index}{suffix}")


def chain_path(path: Path, slot: WorkerSlot | None) -> Path:
    """Where the gateway running as ``slot`` writes: ``path`` itself for a single process."""
    if slot is None or slot.count == 1:
        return path
    return worker_file(path, slot.index)


def worker_note(slot: WorkerSlot | None) -> str | None:
    """What each ``start`` record of a worker's chain says first: which worker writes it."""
    if slot is None or slot.count == 1:
        return None
    return f"worker {slot.index} of {slot.count}"


def _chain_name(path: Path) -> re.Pattern[str]:
    stem, suffix = _parts(path)
    return re.compile(rf"{re.escape(stem)}\.w(0|[1-9][0-9]*){re.escape(suffix)}")


def is_chain_name(path: Path, name: str) -> bool:
    """Whether ``name`` is a worker's chain file of ``path``, or one rotated from it."""
    found = _chain_name(path).match(name)
    return found is not None and (found.end() == len(name) or name[found.end()] in ".-")


def found_chains(path: Path) -> dict[int, Path]:
    """The workers' chain files of ``path`` that exist, by worker index."""
    pattern = _chain_name(path)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return {}
    found = {}
    for name in names:
        match = pattern.fullmatch(name)
        if match is not None and (path.parent / name).is_file():
            found[int(match.group(1))] = path.parent / name
    return found


@attrs.frozen
class Chain:
    """One chain to check: its current file, and whether the configuration needs it."""

    label: str  # "chain 1 of 2", "chain 3 (not configured: workers is 2)", ...
    path: Path
    required: bool


def configured_chains(path: Path, workers: int) -> list[Chain]:
    """The chains a gateway with ``workers`` writes beside ``path``, then the others found."""
    found = found_chains(path)
    if workers == 1:
        chains = [Chain("chain", path, True)]
    else:
        chains = [
            Chain(f"chain {k} of {workers}", worker_file(path, k), True) for k in range(workers)
        ]
        if path.exists():
            chains.append(
                Chain(f"single-process chain (not configured: workers is {workers})", path, False)
            )
    chains += [
        Chain(f"chain {k} (not configured: workers is {workers})", found[k], False)
        for k in sorted(found)
        if k >= workers or workers == 1
    ]
    return chains
