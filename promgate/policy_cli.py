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
from urllib.parse import urlencode, urlsplit

import attrs
import yaml

from promgate.config.loader import check_config
from promgate.config.model import Config, Identity, Limits, Route
from promgate.config.yaml_source import load_bounded
from promgate.identity import Recognition
from promgate.policy import (
    NOT_FOUND,
    OK,
    Check,
    Decision,
    ScrapePolicy,
    authorize,
    parse_scrape_query,
)


class UnusableInputError(Exception):
    """The question cannot be asked: say why and exit 2."""


@attrs.frozen
class Answer:
    """What the gateway would answer one request (before limits and audit health)."""

    decision: Decision
    #: For ``/sd``: the routes listed for the caller.
    sd_routes: tuple[Route, ...] | None = None


def load_config(file: Path, err: TextIO) -> Config | None:
    """Load ``file`` strictly; on errors print them as ``promgate check-config`` does."""
    config, errors, _ = check_config(file)
    if config is None:
        for error in errors:
            print(error, file=err)
        print(f"{file}: {len(errors)} error(s); configuration is NOT valid", file=err)
    return config


def split_url(url: str) -> tuple[str, str]:
    """The path and query of ``https://host/scrape?...`` or ``/scrape?...``."""
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise UnusableInputError(f"URL {url!r}: {e}") from None
    if parts.scheme not in ("", "http", "https"):
        raise UnusableInputError(f"URL {url!r}: give https://HOST/scrape?... or /scrape?...")
    if not parts.scheme and not url.startswith("/"):
        raise UnusableInputError(f"URL {url!r}: give https://HOST/scrape?... or /scrape?...")
    return parts.path, parts.query


def ask(policy: ScrapePolicy, identity: Identity, url: str) -> Answer:
    """Decide ``GET url`` for ``identity`` as the reverse gateway does."""
    path, query = split_url(url)
    if path == "/scrape":
        parsed = parse_scrape_query(query.encode("utf-8"))
        if isinstance(parsed, Decision):
            return Answer(parsed)
        return Answer(policy.decide(Recognition(identity, OK), parsed))
    if path == "/sd":
        routes = tuple(policy.visible_routes(identity))
        rule = f"/sd lists the routes whose allow admits identities.{identity.name}"
        return Answer(Decision(True, 200, OK, rule), routes)
    rule = f"listener: {path!r} is neither /scrape nor /sd"
    return Answer(
        Decision(False, 404, NOT_FOUND, rule, b"not found\n", checks=(Check("path", False, rule),))
    )


def describe_limits(limits: Limits) -> str:
    """A route's limits in one line, as configured."""
    rate = f"{limits.rate:g}/s" if limits.rate is not None else "unlimited"
    concurrent = limits.max_concurrent if limits.max_concurrent is not None else "unlimited"
    return f"rate {rate}, burst {limits.burst}, per {limits.per}, max_concurrent {concurrent}"


def verdict_line(decision: Decision) -> str:
    """``allow 200 ok`` / ``deny 403 authz_denied``."""
    return f"{'allow' if decision.allowed else 'deny'} {decision.status} {decision.reason}"


def render(answer: Answer, identity: Identity, out: TextIO) -> None:
    """Print the decision, every check made, and what would apply next."""
    decision = answer.decision
    print(verdict_line(decision), file=out)
    print(f"rule: {decision.rule}", file=out)
    for check in decision.checks:
        print(f"  {check.name:<9} {'pass' if check.passed else 'FAIL'}  {check.rule}", file=out)
    if answer.sd_routes is not None:
        if not answer.sd_routes:
            print("  no routes: /sd returns an empty list", file=out)
        for listed in sorted(answer.sd_routes, key=lambda r: r.name):
            print(
                f"  route {listed.name} ({authorize(identity, listed).rule}): "
                f"{len(listed.targets)} target(s)",
                file=out,
            )
            for member in listed.targets:
                print(f"    {member.address}", file=out)
        return
    route, target = decision.route, decision.target
    if decision.allowed and route is not None and target is not None:
        upstream = f"{route.scheme}://{target.address}{decision.path}"
        if decision.params:
            upstream += "?" + urlencode(decision.params)
        print(f"upstream: GET {upstream}", file=out)
        print(f"limits: routes.{route.name}.limits: {describe_limits(route.limits)}", file=out)
        print(
            "not evaluated here: the limiter's current state (429) and the audit log's "
            "health (503)",
            file=out,
        )


def listener_policy(config: Config, listener: str | None) -> ScrapePolicy:
    """The scrape policy of ``listener`` (default: the first ``http`` listener), over the
    routes it serves: what ``/scrape`` and ``/sd`` on that listener decide."""
    http = [li.name for li in config.listeners if li.protocol == "http"]
    if listener is None:
        if not http:
            raise UnusableInputError("the configuration has no http listener")
        listener = http[0]
    elif listener not in http:
        known = ", ".join(http) or "none"
        raise UnusableInputError(f"no http listener {listener!r} (http listeners: {known})")
    return ScrapePolicy(config.routes_of(listener), config.identities)


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
        answer = ask(listener_policy(config, listener), identity, url)
    except UnusableInputError as e:
        print(f"promgate explain: {e}", file=err)
        return 2
    render(answer, identity, out)
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
    policy: ScrapePolicy = attrs.field(eq=False, repr=False)

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

    def matches(self, decision: Decision) -> bool:
        return (
            decision.allowed == self.allow
            and (self.status is None or decision.status == self.status)
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
        url = raw.get("url")
        if "url" in raw:
            if not isinstance(url, str):
                self.problem(at("url"), f"{key}.url", "must be a string")
                ok = False
            else:
                try:
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
        policy = None
        listener = raw.get("listener")
        if listener is not None and not isinstance(listener, str):
            self.problem(at("listener"), f"{key}.listener", "must be a listener name")
            ok = False
        elif config is not None:
            try:
                policy = listener_policy(config, listener)
            except UnusableInputError as e:
                self.problem(at("listener"), f"{key}.listener", str(e))
                ok = False
        identity = None
        if "as" in raw and policy is not None:
            identity = policy.identities.get(str(raw["as"]))
            if identity is None:
                known = ", ".join(sorted(policy.identities)) or "none"
                self.problem(at("as"), f"{key}.as", f"no identity {raw['as']!r} (known: {known})")
                ok = False
        if not ok or policy is None or identity is None or not isinstance(url, str):
            return None
        return Case(
            self.file, line, index, name, identity, url, expect == "allow", status, reason, policy
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
        decision = ask(case.policy, case.identity, case.url).decision
        if not case.matches(decision):
            failed += 1
            print(
                f"{case.label}: {case.url}\n"
                f"  as {case.identity.name}: expected {case.expected()}, "
                f"got {verdict_line(decision)}\n"
                f"  rule: {decision.rule}",
                file=out,
            )
    total = len(runs)
    if failed:
        print(f"FAILED: {failed} of {total} case(s) in {len(files)} file(s)", file=out)
        return 1
    print(f"OK: {total} case(s) passed in {len(files)} file(s)", file=out)
    return 0
