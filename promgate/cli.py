"""The ``promgate`` command: check-config, explain, test-policy, diff, audit verify, pki init."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from promgate import __version__


def _check_config(args: argparse.Namespace) -> int:
    from promgate.config.loader import check_config

    config, errors, warnings = check_config(Path(args.file), host_checks=True)
    for warning in warnings:
        print(f"{warning} (warning)", file=sys.stderr)
    if config is None:
        for error in errors:
            print(error, file=sys.stderr)
        print(f"{args.file}: {len(errors)} error(s); configuration is NOT valid", file=sys.stderr)
        return 1
    targets = sum(len(r.targets) for r in config.routes.values())
    discovered = sum(len(r.providers) for r in config.routes.values())
    print(
        f"{args.file}: OK: {len(config.files)} file(s), {len(config.listeners)} listener(s), "
        f"{len(config.identities)} identit{'y' if len(config.identities) == 1 else 'ies'}, "
        f"{len(config.routes)} route(s), {targets} target(s)"
        + (f", {discovered} discovery provider(s)" if discovered else "")
        + f", {len(warnings)} warning(s)"
    )
    if args.resolve:
        return _resolve(config)
    return 0


def _resolve(config: Any) -> int:
    """Run discovery once and print every route's resulting targets.

    On a reactor of its own: the global one cannot run again once stopped, and ``main``
    is called in-process too (tests), where it must leave the global reactor untouched.
    """
    from twisted.internet.selectreactor import SelectReactor

    from promgate.discovery import Discovery, resolve_once

    reactor = SelectReactor()

    results: list[Any] = []

    def finish(result: object) -> None:
        results.append(result)
        reactor.stop()

    reactor.callWhenRunning(lambda: resolve_once(config.routes, reactor).addBoth(finish))
    reactor.run(installSignalHandlers=False)
    if reactor.waker is not None:  # its pipe, the one thing a stopped reactor keeps open
        reactor.removeReader(reactor.waker)
        reactor.waker.connectionLost(None)
    discovery = results[0] if results else None
    if not isinstance(discovery, Discovery):
        print(f"discovery failed: {discovery}", file=sys.stderr)
        return 1
    failed = 0
    for name in sorted(config.routes):
        members = discovery.membership.current.get(name, {})
        print(f"route {name}: {len(members)} target(s)")
        for target in members.values():
            labels = ", ".join(f"{k}={v!r}" for k, v in sorted(target.labels.items()))
            print(f"  {target.address}" + (f"  {{{labels}}}" if labels else ""))
        for runner in discovery.runners.get(name, []):
            if runner.last_error is not None:
                failed += 1
                print(f"  provider {runner.name} FAILED: {runner.last_error}", file=sys.stderr)
    return 1 if failed else 0


def _audit_verify(args: argparse.Namespace) -> int:
    from promgate.audit import load_key, verify_files
    from promgate.audit_chains import configured_chains, worker_file
    from promgate.audit_rotate import rotated_series
    from promgate.audit_verify import result_ending, verify_chains
    from promgate.audit_witness import (
        Expectation,
        Seen,
        WitnessError,
        check,
        parse_expect,
        query_witness,
        seen_record,
    )
    from promgate.config.model import worker_count
    from promgate.config.units import parse_duration

    files = [Path(f) for f in args.files]
    discovered = False
    chains = []
    if args.chain is not None and (files or not args.config or args.chain < 0):
        print(
            "promgate audit verify: --chain takes a worker number K >= 0, "
            "with --config and no FILEs",
            file=sys.stderr,
        )
        return 2
    if args.config:
        from promgate.config.errors import ConfigError
        from promgate.config.loader import load_config

        try:
            config = load_config(Path(args.config))
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 2
        key_file = config.audit.key_file
        if not files and args.chain is None:
            chains = configured_chains(config.audit.path, worker_count(config.workers))
        if len(chains) > 1:
            if args.expect or args.witness:
                print(
                    "promgate audit verify: witnessed heads belong to one chain: "
                    "pick it with --chain K",
                    file=sys.stderr,
                )
                return 2
        elif not files:
            path = (
                config.audit.path
                if args.chain is None
                else worker_file(config.audit.path, args.chain)
            )
            files, notes, problems = rotated_series(path)
            for note in notes:
                print(f"NOTE: {note}")
            if problems:
                for problem in problems:
                    print(f"promgate audit verify: {problem}", file=sys.stderr)
                print("promgate audit verify: give the files to check explicitly", file=sys.stderr)
                return 2
            discovered = len(files) > 1
    elif args.key_file:
        key_file = Path(args.key_file)
    else:
        print("promgate audit verify: give --key-file KEY or --config FILE", file=sys.stderr)
        return 2
    if not files and len(chains) < 2:
        print("promgate audit verify: no audit files given", file=sys.stderr)
        return 2
    expected: list[Expectation] = []
    try:
        expected += [parse_expect(text) for text in args.expect]
        if args.witness:
            parse_duration(args.since)
            expected += query_witness(args.witness, args.since, args.witness_selector)
    except ValueError as e:
        print(f"promgate audit verify: --since: {e}", file=sys.stderr)
        return 2
    except WitnessError as e:
        print(f"promgate audit verify: witness: {e}", file=sys.stderr)
        return 2
    try:
        key = load_key(key_file)
    except (OSError, ValueError) as e:
        print(f"{key_file}: cannot use key: {e}", file=sys.stderr)
        return 2
    if len(chains) > 1:
        return verify_chains(key, chains, sys.stdout, sys.stderr, rotated_start=args.rotated_start)
    if discovered:
        print(f"FILES: {', '.join(str(f) for f in files)}")
    seen: dict[int, Seen] = {}
    result = verify_files(key, files, rotated_start=args.rotated_start, on_record=seen_record(seen))
    for gap in result.gaps:
        print(f"GAP: {gap.describe()}")
    witnessed = check(expected, seen, result.last_seq, result.first_seq, broken=not result.ok)
    for failure in witnessed:
        print(f"WITNESS: {failure}", file=sys.stderr)
    if not result.ok:
        print(f"FAIL: {result.message}", file=sys.stderr)
        return 1
    if witnessed:
        print(
            f"FAIL: the chain verifies ({result.count} record(s)), but "
            f"{len(witnessed)} witnessed record(s) are missing or differ (above)",
            file=sys.stderr,
        )
        return 1
    ending = result_ending(result)
    if expected:
        pairs = len({(e.seq, e.fingerprint) for e in expected if e.seq})
        ending += f"; {pairs} witnessed record(s) match"
    print(f"OK: {result.count} record(s) verified; {ending}")
    return 0


def _pki_init(args: argparse.Namespace) -> int:
    from promgate.pki import init_dev_pki

    try:
        created = init_dev_pki(Path(args.directory), args.identity)
    except ValueError as e:
        print(f"promgate pki init: {e}", file=sys.stderr)
        return 2
    print("DEVELOPMENT PKI: for trying promgate out and for tests, never for production.")
    for path in created:
        print(f"  wrote {path}")
    if not created:
        print(f"  {args.directory}: everything already present, nothing written")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from promgate.policy_cli import explain

    return explain(
        args.config, args.identity, args.url, sys.stdout, sys.stderr, listener=args.listener
    )


def _test_policy(args: argparse.Namespace) -> int:
    from promgate.policy_cli import run_policy_tests

    return run_policy_tests(args.files, sys.stdout, sys.stderr)


def _diff(args: argparse.Namespace) -> int:
    from promgate.diff_cli import diff

    return diff(args.old, args.new, sys.stdout, sys.stderr, as_json=args.json)


DESCRIPTION = (
    "Tools for promgate, the gateway between Prometheus and the endpoints it scrapes: "
    "check a configuration, ask its policy, verify the audit log, make a development PKI. "
    "The gateway itself runs as: twistd -n promgate --config FILE"
)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="promgate", description=DESCRIPTION)
    top.add_argument("--version", action="version", version=f"promgate {__version__}")
    sub = top.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check-config", help="validate a configuration and its drop-ins")
    check.add_argument("file")
    check.add_argument(
        "--resolve",
        action="store_true",
        help="also run service discovery once and print every route's targets",
    )
    check.set_defaults(run=_check_config)

    audit = sub.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify",
        help="verify the HMAC chain of audit log files",
        description="Exit status: 0 verified, 1 the chain or a witnessed record fails, "
        "2 unusable input. See docs/audit.md.",
    )
    verify.add_argument("--key-file", help="the audit HMAC key file")
    verify.add_argument(
        "--config",
        help="take the key from this configuration; without FILEs, check its audit.path "
        "and the rotated files beside it (NAME.*, NAME-*), ordered by their first seq; "
        "with workers, every worker's chain",
    )
    verify.add_argument(
        "--chain",
        type=int,
        metavar="K",
        help="with --config: check only worker K's chain (STEM.wK.SUFFIX and its rotated files)",
    )
    verify.add_argument(
        "--rotated-start",
        action="store_true",
        help="the first file may begin with a rotate record whose earlier files were removed",
    )
    verify.add_argument(
        "--expect",
        action="append",
        default=[],
        metavar="SEQ:FINGERPRINT",
        help="a witnessed chain head (promgate_audit_last_sequence and "
        "promgate_audit_head_fingerprint); fail if that record is missing or differs (repeat)",
    )
    verify.add_argument(
        "--witness",
        metavar="PROMETHEUS_URL",
        help="read the witnessed chain heads from this Prometheus's HTTP API",
    )
    verify.add_argument(
        "--since",
        default="1d",
        metavar="DURATION",
        help="with --witness: how far back to read (default 1d)",
    )
    verify.add_argument(
        "--witness-selector",
        default="",
        metavar="MATCHERS",
        help='with --witness: label matchers picking one gateway, e.g. instance="gate:9099"',
    )
    verify.add_argument("files", nargs="*", help="audit log files, oldest first")
    verify.set_defaults(run=_audit_verify)

    pki = sub.add_parser("pki", help="development PKI")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True)
    init = pki_sub.add_parser("init", help="write a development CA, gate and client certificates")
    init.add_argument("directory")
    init.add_argument("--identity", action="append", default=[], help="a client identity (repeat)")
    init.set_defaults(run=_pki_init)

    explain = sub.add_parser(
        "explain",
        help="what the gateway would answer a request, and the rule that decides it",
        description="Exit status: 0 allow, 1 deny, 2 unusable input. See docs/policy.md.",
    )
    explain.add_argument("--config", required=True, help="the configuration file")
    explain.add_argument(
        "--listener",
        metavar="NAME",
        help="the listener asked (default: the first http one); it sees only the routes it serves",
    )
    explain.add_argument(
        "--as", dest="identity", required=True, help="the identity asking (its name)"
    )
    explain.add_argument(
        "url",
        metavar="REQUEST",
        help="what the listener receives: /scrape?route=R&target=T[&path=P] or /sd (http), "
        "http://HOST:PORT/PATH or 'CONNECT HOST:PORT' (forward), a server name or '' (tcp)",
    )
    explain.set_defaults(run=_explain)

    test_policy = sub.add_parser(
        "test-policy",
        help="check policy test cases against a configuration",
        description="Exit status: 0 all cases pass, 1 a case failed, 2 unusable input. "
        "See docs/policy.md.",
    )
    test_policy.add_argument("files", nargs="+", help="policy test files (YAML)")
    test_policy.set_defaults(run=_test_policy)

    access = sub.add_parser(
        "diff",
        help="which accesses a configuration change grants or revokes",
        description="Exit status: 0 access unchanged, 1 access changes, 2 unusable input. "
        "See docs/policy.md.",
    )
    access.add_argument("old", metavar="OLD", help="the configuration now in use")
    access.add_argument("new", metavar="NEW", help="the configuration to compare with it")
    access.add_argument("--json", action="store_true", help="print one JSON document")
    access.set_defaults(run=_diff)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
