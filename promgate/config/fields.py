"""The reader every section of a configuration is checked with.

A :class:`Reader` collects the problems found (errors and warnings, each with its file,
line and key path), the files read, and offers the typed field checks that every section
shares. A check that fails reports why and returns None (or an empty value), so that one
pass over a configuration finds every problem, not just the first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from promgate.config.errors import Problem
from promgate.config.host_checks import Finding, endpoint_findings
from promgate.config.yaml_source import Item, Source, join_key, parse_file
from promgate.endpoints import parse_endpoint

__all__ = ["LABEL_NAME", "NAME", "NAME_RULE", "Reader", "where"]

T = TypeVar("T")
C = TypeVar("C", bound=str)

#: A name of a listener, identity, template or route.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
#: What a name that does not match NAME is told.
NAME_RULE = "names use letters, digits, '_', '.', '-' (at most 63)"
#: A Prometheus label name.
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def where(item: Item) -> str:
    """``FILE:LINE`` of an item, for a message that points at an earlier definition."""
    return f"{item.src.file}:{item.src.line(item.key)}"


class Reader:
    """The problems found so far, the files read, and the typed checks of single fields."""

    def __init__(self, main: Path, *, host_checks: bool = False) -> None:
        self.main = main
        self.host_checks = host_checks
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        self.files: list[Path] = []

    # -- reporting -------------------------------------------------------------------

    def error(self, src: Source | None, key: str, message: str) -> None:
        problem = self._problem(src, key, message)
        # A template is checked once per route using it: report each problem once.
        if problem not in self.errors:
            self.errors.append(problem)

    def warn(self, src: Source | None, key: str, message: str) -> None:
        problem = self._problem(src, key, message)
        if problem not in self.warnings:
            self.warnings.append(problem)

    def _problem(self, src: Source | None, key: str, message: str) -> Problem:
        file = src.file if src else self.main
        return Problem(file, src.line(key) if src else None, key, message)

    def report(self, item: Item, findings: Iterable[Finding]) -> None:
        """Host check findings about ``item``, as errors or warnings."""
        for finding in findings:
            (self.error if finding.error else self.warn)(item.src, item.key, finding.message)

    def parse(self, file: Path) -> tuple[Any, Source] | None:
        """Parse one YAML file (bounded), noting it among the files read."""
        parsed = parse_file(file, self.errors)
        if parsed is not None:
            self.files.append(file)
        return parsed

    # -- typed field helpers -----------------------------------------------------------

    def fields(
        self, item: Item, allowed: Iterable[str], required: Iterable[str] = ()
    ) -> dict[str, Item] | None:
        """The keys of a mapping, each as an Item; unknown keys and missing ones are errors."""
        if not isinstance(item.value, dict):
            self.error(item.src, item.key, "must be a mapping")
            return None
        allowed = set(allowed)
        out = {}
        for key, value in item.value.items():
            sub = join_key(item.key, key)
            if key not in allowed:
                self.error(
                    item.src, sub, f"unknown key (expected one of: {', '.join(sorted(allowed))})"
                )
            else:
                out[key] = Item(value, item.src, sub)
        for key in required:
            if key not in item.value:
                self.error(item.src, item.key, f"missing required key {key!r}")
        return out

    def typed(self, item: Item, convert: Callable[[Any], T]) -> T | None:
        try:
            return convert(item.value)
        except (ValueError, TypeError) as e:
            self.error(item.src, item.key, str(e))
            return None

    def string(self, item: Item) -> str | None:
        if not isinstance(item.value, str) or not item.value:
            self.error(item.src, item.key, "must be a non-empty string")
            return None
        return item.value

    def strings(self, item: Item) -> list[str] | None:
        if not isinstance(item.value, list):
            self.error(item.src, item.key, "must be a list of strings")
            return None
        out = []
        for i, v in enumerate(item.value):
            s = self.string(Item(v, item.src, f"{item.key}[{i}]"))
            if s is not None:
                out.append(s)
        return out

    def one_or_many(self, item: Item) -> list[Item]:
        """A value that may be given once, or as a list: its items, each with its key."""
        if isinstance(item.value, list):
            if not item.value:
                self.error(item.src, item.key, "must not be an empty list")
            return [Item(v, item.src, f"{item.key}[{i}]") for i, v in enumerate(item.value)]
        return [item]

    def integer(self, item: Item, minimum: int) -> int | None:
        value = item.value
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.error(item.src, item.key, f"must be an integer >= {minimum}")
            return None
        return value

    def choice(self, item: Item, choices: tuple[C, ...]) -> C | None:
        """One of a closed vocabulary, returned as the vocabulary's own value."""
        for choice in choices:
            if item.value == choice:
                return choice
        self.error(item.src, item.key, f"must be one of: {', '.join(choices)}")
        return None

    def positive(self, item: Item, convert: Callable[[Any], T]) -> T | None:
        """Convert, then refuse zero: a zero timeout, size or interval is never meant."""
        value = self.typed(item, convert)
        if value is not None and not value:
            self.error(item.src, item.key, "must be greater than zero")
            return None
        return value

    def existing_file(self, item: Item) -> Path | None:
        """A file name, resolved against the file that gives it; the file must exist."""
        name = self.string(item)
        if name is None:
            return None
        path = item.src.resolve(name)
        if not path.is_file():
            self.error(item.src, item.key, f"file {path} does not exist")
            return None
        return path

    def labels(self, item: Item) -> dict[str, str]:
        if not isinstance(item.value, dict):
            self.error(item.src, item.key, "must be a mapping of label names to values")
            return {}
        out = {}
        for name, value in item.value.items():
            sub = join_key(item.key, name)
            if not LABEL_NAME.match(name) or name.startswith("__"):
                self.error(
                    item.src, sub, "not a valid label name (and names starting __ are reserved)"
                )
            elif not isinstance(value, (str, int, float)) or isinstance(value, bool):
                self.error(item.src, sub, "label values must be strings")
            else:
                out[name] = str(value)
        return out

    def endpoint(self, item: Item) -> str | None:
        """A server endpoint string (tcp:, tcp6:, unix: or systemd:, optionally behind
        haproxy:), parsed as the listeners will. A systemd: socket is only passed when
        systemd starts the gateway, so it is checked for its form only."""
        text = self.string(item)
        if text is None:
            return None
        try:
            parsed = parse_endpoint(text)
        except ValueError as e:
            self.error(item.src, item.key, str(e))
            return None
        if parsed.systemd is not None:
            return text
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.testing import MemoryReactor

        try:
            serverFromString(MemoryReactor(), parsed.inner)
        except (ValueError, TypeError, KeyError, RuntimeError) as e:  # "tcp:1\\": RuntimeError
            self.error(item.src, item.key, f"invalid endpoint {text!r}: {e}")
            return None
        if self.host_checks:
            self.report(item, endpoint_findings(parsed.inner))
        return text
