"""``promgate diff OLD NEW``: what a configuration change does to access, before it ships.

Both files are loaded strictly, as ``twistd promgate`` loads them (errors are printed as
``promgate check-config`` prints them), and every request whose decision differs is
printed with the rule deciding it on each side. Exit codes: 0 access unchanged, 1 access
changes, 2 unusable input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from promgate.access_diff import AccessDiff, Change, access_diff
from promgate.policy_cli import load_config


def render(diff: AccessDiff, out: TextIO) -> None:
    """Every change (newly allowed, newly denied) with both sides' rules, then the counts."""
    for change in diff.changes:
        print(_headline(change), file=out)
        print(f"  old: {change.old.verdict()}: {change.why(change.old)}", file=out)
        print(f"  new: {change.new.verdict()}: {change.why(change.new)}", file=out)
    where = f"{diff.compared} request(s) compared on {len(diff.listeners)} listener(s)"
    if not diff.changed:
        print(f"access unchanged: {where}", file=out)
        return
    print(
        f"access changes: {diff.granted} newly allowed, {diff.revoked} newly denied; {where}",
        file=out,
    )


def _headline(change: Change) -> str:
    what = "newly allowed" if change.granted else "newly denied"
    caller = f"as {change.identity}" if change.identity is not None else "(no identity)"
    return f"{what}: {change.listener} {caller}: {change.request.describe()}"


def diff(old_file: str, new_file: str, out: TextIO, err: TextIO, as_json: bool = False) -> int:
    """``promgate diff``: 0 access unchanged, 1 access changes, 2 unusable input."""
    old = load_config(Path(old_file), err)
    new = load_config(Path(new_file), err)
    if old is None or new is None:
        return 2
    result = access_diff(old, new)
    if as_json:
        document = {"old_config": old_file, "new_config": new_file, **result.to_json()}
        json.dump(document, out, indent=2)
        out.write("\n")
    else:
        render(result, out)
    return 1 if result.changed else 0


__all__ = ["diff", "render"]
