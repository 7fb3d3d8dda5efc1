"""``promgate explain`` and ``promgate test-policy``: ask the gateway's own policy offline.

Both load the configuration exactly as ``twistd promgate`` does and put each question to
the same ``ScrapePolicy`` the reverse gateway asks for every request, so the answer is the
gateway's answer, without starting anything. Exit codes: 0 allow / all cases pass, 1 deny /
a case failed, 2 the input cannot be used (an invalid configuration, an unknown identity,
a malformed test file).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import yaml

from promgate.config.loader import check_config
from promgate.config.model import Config, Identity
from promgate.config.yaml_source import load_bounded
from promgate.policy import Decision
from promgate.policy_questions import (
    Answer,
    Question,
    UnusableInputError,
    question,
    render,
    split_url,
    verdict_line,
)


def load_config(file: Path, err: TextIO) -> Config | None:
    """Load ``file`` strictly; on errors print them as ``promgate check-config`` does."""
    config, errors, _ = check_config(file)
    if config is None:
        for error in errors:
            print(error, file=err)
        print(f"{file}: {len(errors)} error(s); configuration is NOT valid", file=err)
    return config


def explain(
    config_file: str,
    identity_name: str,
    url: str,
    out: TextIO,
    err: TextIO,
    listener: str | None = None,
) -> int:
    """``promgate explain``: 0 allow, 1 deny, 2 unusable input."""
    config = load_config(Path(config_file), err)
    if config is None:
        return 2
    identity = config.identities.get(identity_name)
    if identity is None:
        known = ", ".join(sorted(config.identities)) or "none"
        print(
            f"promgate explain: no identity {identity_name!r} in {config_file} (known: {known})",
            file=err,
        )
        return 2
    try:
        asked = question(config, listener)
        asked.check(url)
        answer = asked.ask(identity, url)
    except UnusableInputError as e:
        print(f"promgate explain: {e}", file=err)
        return 2
    tcp = asked.listener.tcp
    render(answer, identity, out, passthrough=tcp is not None and tcp.mode == "passthrough")
    return 0 if answer.decision.allowed else 1


# -- test-policy ----------------------------------------------------------------------------

_TOP_KEYS = ("config", "tests")
_CASE_KEYS = ("name", "as", "listener", "url", "expect", "status", "reason")


@attrs.frozen
class Case:
    """One expectation from a policy test file."""

    file: Path
    line: int
    index: int
    name: str | None
    identity: Identity
    url: str
    allow: bool
    status: int | None
    reason: str | None
    asked: Question = attrs.field(eq=False, repr=False)

    @property
    def label(self) -> str:
        title = f" {self.name!r}" if self.name else ""
        return f"{self.file}:{self.line}: tests[{self.index}]{title}"

    def expected(self) -> str:
        parts = ["allow" if self.allow else "deny"]
        if self.status is not None:
            parts.append(str(self.status))
        if self.reason is not None:
            parts.append(self.reason)
        return " ".join(parts)

    def matches(self, answer: Answer) -> bool:
        decision: Decision = answer.decision
        return (
            decision.allowed == self.allow
            and (self.status is None or answer.status == self.status)
            and (self.reason is None or decision.reason == self.reason)
        )


class _TestFile:
    """Reads one test file, collecting every problem with its line."""

    def __init__(self, file: Path, configs: dict[Path, Config | None], err: TextIO) -> None:
        self.file = file
        self.configs = configs
        self.err = err
        self.problems: list[str] = []

    def problem(self, line: int | None, key: str, message: str) -> None:
        where = f"{self.file}:{line}" if line is not None else str(self.file)
        self.problems.append(f"{where}: {key}: {message}" if key else f"{where}: {message}")

    def read(self) -> list[Case]:
        try:
            text = self.file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            self.problem(None, "", f"cannot read file: {e}")
            return []
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = load_bounded(text, str(self.file))
        except ValueError as e:
            self.problem(None, "", f"YAML error: {e}")
            return []
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            self.problem(line, "", f"YAML error: {getattr(e, 'problem', None) or e}")
            return []
        if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
            self.problem(None, "", "the top level must be a mapping with config and tests")
            return []
        lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
        for key in data:
            if key not in _TOP_KEYS:
                self.problem(lines.get(key), str(key), "unknown key (expected config, tests)")
        config = self.config(data.get("config"), lines.get("config"))
        tests = data.get("tests")
        if not isinstance(tests, list) or not tests:
            self.problem(lines.get("tests"), "tests", "must be a non-empty list of cases")
            return []
        items = next(v for k, v in node.value if k.value == "tests")
        assert isinstance(items, yaml.SequenceNode)
        cases = []
        for index, (raw, item) in enumerate(zip(tests, items.value, strict=True)):
            case = self.case(index, raw, item, config)
            if case is not None:
                cases.append(case)
        return cases

    def config(self, value: Any, line: int | None) -> Config | None:
        if not isinstance(value, str) or not value:
            self.problem(line, "config", "give the configuration file (relative to this file)")
            return None
        path = Path(value)
        if not path.is_absolute():
            path = self.file.parent / path
        key = path.resolve()
        if key not in self.configs:
            self.configs[key] = load_config(path, self.err)
        config = self.configs[key]
        if config is None:
            self.problem(line, "config", f"{path} is not a valid configuration")
        return config

    def case(self, index: int, raw: Any, node: yaml.Node, config: Config | None) -> Case | None:
        line = node.start_mark.line + 1
        key = f"tests[{index}]"
        lines: dict[Any, int] = {}
        if isinstance(node, yaml.MappingNode):
            lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}

        def at(name: str) -> int:
            return lines.get(name, line)

        if not isinstance(raw, dict):
            self.problem(line, key, "must be a mapping with as, url and expect")
            return None
        ok = True
        for name in raw:
            if name not in _CASE_KEYS:
                self.problem(
                    at(name), f"{key}.{name}", f"unknown key (expected {', '.join(_CASE_KEYS)})"
                )
                ok = False
        for name in ("as", "url", "expect"):
            if name not in raw:
                self.problem(line, key, f"missing required key {name!r}")
                ok = False
        name = raw.get("name")
        if name is not None and not isinstance(name, str):
            self.problem(at("name"), f"{key}.name", "must be a string")
            ok = False
        # The listener decides what a request is; its own problem is reported below.
        asked: Question | None = None
        listener_problem = None
        listener = raw.get("listener")
        if listener is not None and not isinstance(listener, str):
            listener_problem = "must be a listener name"
        elif config is not None:
            try:
                asked = question(config, listener)
            except UnusableInputError as e:
                listener_problem = str(e)
        url = raw.get("url")
        if "url" in raw and not isinstance(url, str):
            self.problem(at("url"), f"{key}.url", "must be a string")
            ok = False
        elif isinstance(url, str) and (asked is not None or listener is None):
            try:
                if asked is not None:
                    asked.check(url)
                else:
                    split_url(url)
            except UnusableInputError as e:
                self.problem(at("url"), f"{key}.url", str(e))
                ok = False
        expect = raw.get("expect")
        if "expect" in raw and expect not in ("allow", "deny"):
            self.problem(at("expect"), f"{key}.expect", "must be allow or deny")
            ok = False
        status = raw.get("status")
        if status is not None and (
            isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599
        ):
            self.problem(at("status"), f"{key}.status", "must be an HTTP status code")
            ok = False
        reason = raw.get("reason")
        if reason is not None and not isinstance(reason, str):
            self.problem(at("reason"), f"{key}.reason", "must be a string")
            ok = False
        if listener_problem is not None:
            self.problem(at("listener"), f"{key}.listener", listener_problem)
            ok = False
        if asked is not None and status is not None and asked.listener.protocol == "tcp":
            self.problem(at("status"), f"{key}.status", "a tcp listener answers no HTTP status")
            ok = False
        identity: Identity | None = None
        if "as" in raw and config is not None:
            identity = config.identities.get(str(raw["as"]))
            if identity is None:
                known = ", ".join(sorted(config.identities)) or "none"
                self.problem(at("as"), f"{key}.as", f"no identity {raw['as']!r} (known: {known})")
                ok = False
        if not ok or asked is None or identity is None or not isinstance(url, str):
            return None
        return Case(
            self.file, line, index, name, identity, url, expect == "allow", status, reason, asked
        )


def run_policy_tests(files: Sequence[str], out: TextIO, err: TextIO) -> int:
    """``promgate test-policy``: 0 all cases pass, 1 any mismatch, 2 unusable input."""
    configs: dict[Path, Config | None] = {}
    runs: list[Case] = []
    problems: list[str] = []
    for name in files:
        reader = _TestFile(Path(name), configs, err)
        runs.extend(reader.read())
        problems.extend(reader.problems)
    if problems:
        for problem in problems:
            print(problem, file=err)
        print(f"promgate test-policy: {len(problems)} problem(s) in the test files", file=err)
        return 2
    failed = 0
    for case in runs:
        answer = case.asked.ask(case.identity, case.url)
        decision = answer.decision
        if not case.matches(answer):
            failed += 1
            print(
                f"{case.label}: {case.url}\n"
                f"  as {case.identity.name}: expected {case.expected()}, "
                f"got {verdict_line(answer)}\n"
                f"  rule: {decision.rule}",
                file=out,
            )
    total = len(runs)
    if failed:
        print(f"FAILED: {failed} of {total} case(s) in {len(files)} file(s)", file=out)
        return 1
    print(f"OK: {total} case(s) passed in {len(files)} file(s)", file=out)
    return 0
