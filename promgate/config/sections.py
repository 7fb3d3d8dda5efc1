"""Gather the top-level sections of a configuration from its main file and its drop-ins.

``include`` names further files (or globs) whose sections join the main file's: lists are
appended, names (identities, identity providers, templates, routes) must be unique across
all files, and ``tls``, ``admin``, ``audit``, ``workers`` and ``shared_limits`` may be
given once. Nothing is checked beyond that shape here; each section has its own module for
that.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from promgate.config.fields import NAME, NAME_RULE, Reader, where
from promgate.config.yaml_source import MAX_FILES, Item, Source

__all__ = ["Sections", "read_sections"]

_TOP_KEYS = {
    "include",
    "tls",
    "admin",
    "listeners",
    "identities",
    "identity_providers",
    "web_configs",
    "templates",
    "routes",
    "audit",
    "workers",
    "shared_limits",
}
#: The sections given at most once in the whole configuration.
_SINGLETONS = ("tls", "admin", "audit", "workers", "shared_limits")


class Sections:
    """The sections as read, each value with where it came from, still unchecked."""

    def __init__(self) -> None:
        #: ``tls``, ``admin``, ``audit``, ``workers`` and ``shared_limits``, where given.
        self.singletons: dict[str, Item] = {}
        self.listeners: list[Item] = []
        self.web_configs: list[Item] = []
        self.identities: dict[str, Item] = {}
        self.identity_providers: dict[str, Item] = {}
        self.templates: dict[str, Item] = {}
        self.routes: dict[str, Item] = {}

    def named(self) -> dict[str, dict[str, Item]]:
        """The sections of named entries, by section name."""
        return {
            "identities": self.identities,
            "identity_providers": self.identity_providers,
            "templates": self.templates,
            "routes": self.routes,
        }


def read_sections(r: Reader, main: Path) -> Sections:
    """The sections of ``main`` and of every file it includes, in the order read."""
    sections = Sections()
    _read(r, sections, main, set())
    return sections


def _read(r: Reader, sections: Sections, file: Path, seen: set[Path]) -> None:
    real = file.resolve()
    if real in seen:
        return
    if len(seen) >= MAX_FILES:
        r.error(None, "include", f"more than {MAX_FILES} files to read; the rest are not read")
        return
    seen.add(real)
    parsed = r.parse(file)
    if parsed is None:
        return
    data, src = parsed
    if not isinstance(data, dict):
        r.error(src, "", "the top level must be a mapping")
        return
    for key in data:
        if key not in _TOP_KEYS:
            r.error(src, key, f"unknown key (expected one of: {', '.join(sorted(_TOP_KEYS))})")
    for key in _SINGLETONS:
        if key in data:
            if key in sections.singletons:
                first = sections.singletons[key]
                r.error(src, key, f"defined twice (first at {where(first)})")
            else:
                sections.singletons[key] = Item(data[key], src, key)
    if "listeners" in data:
        listeners = data["listeners"]
        if not isinstance(listeners, list):
            r.error(src, "listeners", "must be a list")
        else:
            sections.listeners.extend(
                Item(v, src, f"listeners[{i}]") for i, v in enumerate(listeners)
            )
    if "web_configs" in data:
        web_configs = data["web_configs"]
        if not isinstance(web_configs, list):
            r.error(src, "web_configs", "must be a list of {path, roles} mappings")
        else:
            sections.web_configs.extend(
                Item(v, src, f"web_configs[{i}]") for i, v in enumerate(web_configs)
            )
    for section, table in sections.named().items():
        entries = data.get(section)
        if entries is None:
            continue
        if not isinstance(entries, dict):
            r.error(src, section, "must be a mapping of names")
            continue
        for name, value in entries.items():
            key = f"{section}.{name}"
            if not NAME.match(name):
                r.error(src, key, NAME_RULE)
            if name in table:
                first = table[name]
                r.error(src, key, f"defined twice (first at {where(first)})")
                continue
            table[name] = Item(value, src, key)
    for included in _includes(r, data, src):
        _read(r, sections, included, seen)


def _includes(r: Reader, data: dict[str, Any], src: Source) -> Iterable[Path]:
    includes = data.get("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list):
        r.error(src, "include", "must be a list of file names or globs")
        return
    for i, pattern in enumerate(includes):
        key = f"include[{i}]"
        if not isinstance(pattern, str) or not pattern:
            r.error(src, key, "must be a file name or glob")
            continue
        full = src.resolve(pattern)
        if glob.has_magic(pattern):
            yield from (Path(p) for p in sorted(glob.glob(str(full))))
        elif not full.is_file():
            r.error(src, key, f"included file {full} does not exist")
        else:
            yield full
