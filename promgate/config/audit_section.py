"""The ``audit`` section: where the HMAC-chained audit log is written, and how.

Every gateway keeps one; the section is required, with the log's ``path`` and the
``key_file`` holding the chain's key.
"""

from __future__ import annotations

from typing import Any

from promgate.config.fields import Reader
from promgate.config.files import audit_key_file
from promgate.config.host_checks import audit_path_findings
from promgate.config.model import FSYNC_POLICIES, ON_AUDIT_FAILURE, Audit
from promgate.config.sections import Sections
from promgate.config.units import parse_duration

__all__ = ["check_audit"]

_AUDIT_KEYS = (
    "path",
    "key_file",
    "fsync",
    "fsync_interval",
    "on_failure",
    "max_field_length",
    "aggregate_interval",
)


def check_audit(r: Reader, sections: Sections) -> Audit | None:
    """The audit settings, or None (with the reasons reported) if unusable or missing."""
    if "audit" not in sections.singletons:
        r.error(
            None,
            "audit",
            "missing: every gateway keeps an audit log (give path and key_file)",
        )
        return None
    f = r.fields(sections.singletons["audit"], _AUDIT_KEYS, ("path", "key_file"))
    if f is None or "path" not in f or "key_file" not in f:
        return None
    name = r.string(f["path"])
    path = f["path"].src.resolve(name) if name else None
    if path is not None and not path.parent.is_dir():
        r.error(f["path"].src, f["path"].key, f"directory {path.parent} does not exist")
    elif path is not None and r.host_checks:
        r.report(f["path"], audit_path_findings(path))
    key_file = audit_key_file(r, f["key_file"])
    kw: dict[str, Any] = {}
    if "fsync" in f:
        kw["fsync"] = r.choice(f["fsync"], FSYNC_POLICIES) or "interval"
    if "fsync_interval" in f:
        kw["fsync_interval"] = r.positive(f["fsync_interval"], parse_duration) or 1.0
    if "on_failure" in f:
        kw["on_failure"] = r.choice(f["on_failure"], ON_AUDIT_FAILURE) or "deny"
    if "max_field_length" in f:
        kw["max_field_length"] = r.integer(f["max_field_length"], 16) or 1024
    if "aggregate_interval" in f:
        kw["aggregate_interval"] = r.positive(f["aggregate_interval"], parse_duration) or 10.0
    if path is None or key_file is None:
        return None
    return Audit(path=path, key_file=key_file, **kw)
