"""Configuration errors carrying the file, line and key path they are about."""

from __future__ import annotations

from pathlib import Path

import attrs


@attrs.frozen
class Problem:
    """One thing wrong (or worth a warning) in a configuration file."""

    file: Path | None
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = str(self.file) if self.file is not None else "<config>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` lists every error found."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems
