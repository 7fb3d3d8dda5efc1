"""Read one configuration file as YAML, bounded, noting the line of every key path.

Whatever a file says, reading it is bounded in memory and time: the file's size, the nodes
the document produces (every alias expansion counts, so a few anchors nested ten deep cannot
grow into billions of nodes) and the number of files one configuration may include. A file
beyond a bound is refused with ``FILE:LINE: message``, like any other problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import yaml

from promgate.config.errors import Problem

__all__ = [
    "MAX_FILES",
    "MAX_FILE_SIZE",
    "MAX_NODES",
    "Item",
    "Source",
    "join_key",
    "load_bounded",
    "parse_file",
]

#: The largest configuration file read (a real one is a few KiB).
MAX_FILE_SIZE = 1024 * 1024
#: The most values one file may produce, counting each use of an alias anew.
MAX_NODES = 100_000
#: The most characters one file may produce in keys, values and key paths, counting each
#: use of an alias anew (a long key under an anchor would otherwise be copied per use).
MAX_CHARS = 16 * 1024 * 1024
#: The most files one configuration may read through includes (the main file and drop-ins).
MAX_FILES = 1000


@attrs.frozen
class Source:
    """One parsed YAML file and the line of every key path in it."""

    file: Path
    lines: dict[str, int]

    def line(self, key: str) -> int | None:
        while key:
            if key in self.lines:
                return self.lines[key]
            cut = max(key.rfind("."), key.rfind("["))
            key = key[:cut] if cut > 0 else ""
        return None

    def resolve(self, name: str) -> Path:
        try:
            path = Path(name).expanduser()
        except RuntimeError:  # "~user/..." naming no known user: keep it literal
            path = Path(name)
        return path if path.is_absolute() else self.file.parent / path


@attrs.frozen
class Item:
    """A value with where it came from."""

    value: Any
    src: Source
    key: str


def join_key(parent: str, key: str) -> str:
    """The key path of ``key`` inside ``parent`` (``routes.node.allow``)."""
    return f"{parent}.{key}" if parent else key


class _TooLargeError(Exception):
    """The document produces more than MAX_NODES values; ``line`` is where it went over."""

    def __init__(self, line: int) -> None:
        self.line = line


class _YAML:
    """Turns a YAML node tree into plain values while noting each key's line."""

    def __init__(
        self,
        file: Path,
        problems: list[Problem],
        budget: int = MAX_NODES,
        chars: int = MAX_CHARS,
    ) -> None:
        self.file = file
        self.problems = problems
        self.lines: dict[str, int] = {}
        self._scalars = yaml.constructor.SafeConstructor()
        self._budget = budget
        self._chars = chars
        self.limit = budget

    def _scalar(self, node: yaml.Node, path: str) -> Any:
        """A scalar's value; one that cannot be read (``2001-02-30``, an integer of
        thousands of digits) is a problem at its line, not a traceback."""
        try:
            return self._scalars.construct_object(node)
        except (ValueError, OverflowError) as e:
            self.problems.append(
                Problem(self.file, node.start_mark.line + 1, path, f"value cannot be read: {e}")
            )
            return None

    def _spend(self, node: yaml.Node, chars: int = 0) -> None:
        self._budget -= 1
        self._chars -= chars
        if self._budget < 0 or self._chars < 0:
            raise _TooLargeError(node.start_mark.line + 1)

    def convert(self, node: yaml.Node, path: str) -> Any:
        value = node.value if isinstance(node, yaml.ScalarNode) else ""
        self._spend(node, len(path) + len(value))
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for knode, vnode in node.value:
                if knode.tag == "tag:yaml.org,2002:merge":
                    self.problems.append(
                        Problem(
                            self.file,
                            knode.start_mark.line + 1,
                            path,
                            "YAML merge keys (<<) are not supported",
                        )
                    )
                    continue
                key = self._scalar(knode, path) if isinstance(knode, yaml.ScalarNode) else None
                if not isinstance(key, str):
                    self.problems.append(
                        Problem(
                            self.file,
                            knode.start_mark.line + 1,
                            path,
                            "mapping keys must be strings",
                        )
                    )
                    continue
                sub = join_key(path, key)
                if key in out:
                    self.problems.append(
                        Problem(
                            self.file,
                            knode.start_mark.line + 1,
                            sub,
                            "duplicate key in the same mapping",
                        )
                    )
                    continue
                self.lines[sub] = knode.start_mark.line + 1
                out[key] = self.convert(vnode, sub)
            return out
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, child in enumerate(node.value):
                sub = f"{path}[{i}]"
                self.lines[sub] = child.start_mark.line + 1
                items.append(self.convert(child, sub))
            return items
        return self._scalar(node, path)


def _read(file: Path, problems: list[Problem]) -> str | None:
    try:
        with file.open("rb") as f:
            data = f.read(MAX_FILE_SIZE + 1)
    except OSError as e:
        problems.append(Problem(file, None, "", f"cannot read file: {e.strerror or e}"))
        return None
    if len(data) > MAX_FILE_SIZE:
        problems.append(
            Problem(file, None, "", f"file is larger than the limit of {MAX_FILE_SIZE} bytes")
        )
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        problems.append(Problem(file, None, "", "file is not UTF-8 text"))
        return None


def parse_file(file: Path, problems: list[Problem]) -> tuple[Any, Source] | None:
    """The file's values and their lines, or None with the reasons added to ``problems``."""
    text = _read(file, problems)
    if text is None:
        return None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        problems.append(Problem(file, None, "", "YAML error: nested too deeply"))
        return None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        problems.append(Problem(file, line, "", f"YAML syntax error: {e.problem or e}"))
        return None
    except yaml.YAMLError as e:
        problems.append(Problem(file, None, "", f"YAML error: {e}"))
        return None
    conv = _YAML(file, problems)
    try:
        data = conv.convert(node, "") if node is not None else {}
    except _TooLargeError as e:
        problems.append(
            Problem(
                file,
                e.line,
                "",
                f"YAML document expands to more than {conv.limit} values or {MAX_CHARS} characters "
                "(through anchors and aliases?); refused",
            )
        )
        return None
    except yaml.YAMLError as e:
        problems.append(Problem(file, None, "", f"YAML error: {e}"))
        return None
    except RecursionError:
        problems.append(
            Problem(file, None, "", "YAML error: nested too deeply (or a recursive alias)")
        )
        return None
    return data, Source(file, conv.lines)


def load_bounded(text: str, name: str) -> Any:
    """YAML ``text`` (from ``name``) as plain values, bounded as configuration files are,
    with a budget of values no smaller than the text's length (a document without aliases
    never produces more values than it has characters). ValueError says what and where.
    """
    problems: list[Problem] = []
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise ValueError("YAML nested too deeply") from None
    if node is None:
        return None
    conv = _YAML(Path(name), problems, max(MAX_NODES, len(text)), max(MAX_CHARS, 4 * len(text)))
    try:
        data = conv.convert(node, "")
    except _TooLargeError as e:
        raise ValueError(
            f"line {e.line}: YAML document expands to more than {conv.limit} values or "
            "characters (through anchors and aliases?)"
        ) from None
    except RecursionError:
        raise ValueError("YAML nested too deeply (or a recursive alias)") from None
    if problems:
        first = problems[0]
        raise ValueError(
            f"line {first.line}: {first.key + ': ' if first.key else ''}{first.message}"
        )
    return data
