"""The witness: chain heads recorded outside the log, checked against it.

An HMAC chain shows that no record was changed, removed from the middle or reordered, but
not that its tail was cut, and nothing stops the key holder from rewriting it. The gateway
publishes its chain head on the admin ``/metrics`` (``promgate_audit_last_sequence`` and
``promgate_audit_head_fingerprint``, the first 48 bits of the head MAC); the Prometheus that
scrapes it stores every pair it saw. ``promgate audit verify --witness URL`` reads those
pairs back (``--expect SEQ:FINGERPRINT`` gives them by hand) and fails when a witnessed
record is missing from the files or differs from what was witnessed.

The query is a range selector over both gauges, on Prometheus's HTTP API
(``/api/v1/query``); samples of the two series taken at the same scrape form one pair.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs

from promgate.audit_format import head_fingerprint

__all__ = [
    "FINGERPRINT_METRIC",
    "SEQUENCE_METRIC",
    "Expectation",
    "Seen",
    "WitnessError",
    "check",
    "parse_expect",
    "query_witness",
]

SEQUENCE_METRIC = "promgate_audit_last_sequence"
FINGERPRINT_METRIC = "promgate_audit_head_fingerprint"
#: Answers larger than this are refused rather than parsed.
_MAX_ANSWER = 64 * 1024 * 1024


class WitnessError(Exception):
    """The witness could not be asked, or its answer is unusable."""


@attrs.frozen
class Expectation:
    """A record some witness saw: its seq and the fingerprint of its MAC."""

    seq: int
    fingerprint: int
    source: str  # who saw it: "--expect", or the Prometheus series and time


@attrs.frozen
class Seen:
    """A record the verified chain holds: its fingerprint and where it is."""

    fingerprint: int
    path: Path
    line: int


def _integer(text: str, what: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise WitnessError(f"{what}: not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise WitnessError(f"{what}: not a non-negative integer: {text!r}")
    return int(value)


def parse_expect(text: str) -> Expectation:
    """``SEQ:FINGERPRINT`` (decimal, as Prometheus shows both) as an expectation."""
    seq, colon, fingerprint = text.partition(":")
    if not colon:
        raise WitnessError(f"--expect {text!r}: expected SEQ:FINGERPRINT")
    return Expectation(
        _integer(seq, f"--expect {text!r}"),
        _integer(fingerprint, f"--expect {text!r}"),
        "--expect",
    )


def check(
    expectations: Iterable[Expectation],
    seen: Mapping[int, Seen],
    last_seq: int,
    first_seq: int,
    broken: bool = False,
) -> list[str]:
    """One line per expectation the verified records do not meet, in seq order.

    ``seen`` maps the seq of each record verified good to its fingerprint; ``first_seq`` and
    ``last_seq`` bound them, and ``broken`` says the chain broke after ``last_seq``. A seq
    of 0 (nothing written yet) expects nothing.
    """
    failures = []
    for want in sorted(set(expectations), key=lambda e: (e.seq, e.fingerprint, e.source)):
        if want.seq == 0:
            continue
        found = seen.get(want.seq)
        what = f"seq {want.seq} fingerprint {want.fingerprint} (witnessed by {want.source})"
        if found is None:
            if want.seq > last_seq and broken:
                why = f"after seq {last_seq}, where the chain breaks"
            elif want.seq > last_seq:
                why = f"the verified chain ends at seq {last_seq}: its tail was cut"
            elif want.seq < first_seq:
                why = f"the files given begin at seq {first_seq}"
            else:
                why = "not among the records verified"
            failures.append(f"{what}: missing: {why}")
        elif found.fingerprint != want.fingerprint:
            failures.append(
                f"{what}: differs: {found.path}:{found.line} has fingerprint "
                f"{found.fingerprint}: the record was rewritten"
            )
    return failures


def seen_record(seen: dict[int, Seen]) -> Callable[[int, str, Path, int], None]:
    """An ``on_record`` for :func:`promgate.audit_verify.verify_files` that fills ``seen``."""

    def on_record(seq: int, mac: str, path: Path, line: int) -> None:
        seen[seq] = Seen(head_fingerprint(mac), path, line)

    return on_record


Fetch = Callable[[str], bytes]


def _fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=30.0) as answer:
            body: bytes = answer.read(_MAX_ANSWER + 1)
    except urllib.error.HTTPError as e:
        body = e.read(_MAX_ANSWER + 1)  # Prometheus explains errors in JSON
    except (OSError, ValueError) as e:
        raise WitnessError(f"{url}: {e}") from None
    if len(body) > _MAX_ANSWER:
        raise WitnessError(f"{url}: answer larger than {_MAX_ANSWER} bytes")
    return body


def _series(base: str, metric: str, selector: str, since: str, fetch: Fetch) -> list[Any]:
    query = f"{metric}{{{selector}}}[{since}]"
    url = f"{base.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        doc = json.loads(fetch(url))
    except ValueError:
        raise WitnessError(f"{url}: the answer is not JSON") from None
    if not isinstance(doc, dict) or doc.get("status") != "success":
        error = doc.get("error") if isinstance(doc, dict) else None
        raise WitnessError(f"{base}: query {query} failed: {error or 'unexpected answer'}")
    data = doc.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "matrix":
        raise WitnessError(f"{base}: query {query}: expected a range vector")
    result = data.get("result")
    if not isinstance(result, list):
        raise WitnessError(f"{base}: query {query}: expected a list of series")
    return result


def _labels(series: Any) -> tuple[tuple[str, str], ...]:
    metric = series.get("metric", {}) if isinstance(series, dict) else {}
    return tuple(sorted((k, str(v)) for k, v in metric.items() if k != "__name__"))


def _samples(series: Any, what: str) -> dict[float, str]:
    values = series.get("values", []) if isinstance(series, dict) else []
    try:
        return {float(t): str(v) for t, v in values}
    except (TypeError, ValueError):
        raise WitnessError(f"{what}: malformed samples") from None


def query_witness(
    base: str, since: str, selector: str = "", fetch: Fetch = _fetch
) -> list[Expectation]:
    """The (seq, fingerprint) pairs the Prometheus at ``base`` stored over the last ``since``.

    ``selector`` is label matchers (``job="promgate",instance="gate:9099"``) that pick one
    gateway's series; without them, the answer must hold the series of only one.
    """
    sequences = _series(base, SEQUENCE_METRIC, selector, since, fetch)
    fingerprints = {
        _labels(s): s for s in _series(base, FINGERPRINT_METRIC, selector, since, fetch)
    }
    if not sequences:
        raise WitnessError(
            f"{base}: no samples of {SEQUENCE_METRIC}{{{selector}}} in the last {since}"
        )
    names = sorted({"{" + ",".join(f'{k}="{v}"' for k, v in _labels(s)) + "}" for s in sequences})
    if len(names) > 1:
        raise WitnessError(
            f"{base}: {SEQUENCE_METRIC} has {len(names)} series ({', '.join(names)}); "
            "pick one gateway's with --witness-selector"
        )
    found: dict[tuple[int, int], Expectation] = {}
    for series in sequences:
        labels = _labels(series)
        name = "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"
        partner = fingerprints.get(labels)
        if partner is None:
            raise WitnessError(f"{base}: {SEQUENCE_METRIC}{name} has no {FINGERPRINT_METRIC}")
        prints = _samples(partner, f"{base}: {FINGERPRINT_METRIC}{name}")
        for at, value in sorted(_samples(series, f"{base}: {SEQUENCE_METRIC}{name}").items()):
            if at not in prints:
                continue  # not scraped together: no pair
            seq = _integer(value, f"{base}: {SEQUENCE_METRIC}{name}")
            fingerprint = _integer(prints[at], f"{base}: {FINGERPRINT_METRIC}{name}")
            when = datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            found.setdefault((seq, fingerprint), Expectation(seq, fingerprint, f"{base} at {when}"))
    return list(found.values())
