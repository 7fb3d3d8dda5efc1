"""Load a configuration: YAML with drop-in includes, templates, and strict validation.

Every problem found is collected (not just the first), each with the file, line and key
path it concerns, so that ``promgate check-config`` and ``twistd promgate`` can print the
same complete list. Each section is checked by its own module, in the order below; the
order is the order problems are reported in.
"""

from __future__ import annotations

from pathlib import Path

from promgate.config.audit_section import check_audit
from promgate.config.errors import ConfigError, Problem
from promgate.config.fields import Reader
from promgate.config.files import tls_files
from promgate.config.identities import check_identities
from promgate.config.identity_providers import check_identity_providers
from promgate.config.listeners import check_admin, check_listeners
from promgate.config.model import Config
from promgate.config.references import check_allow, check_route_listeners
from promgate.config.routes import check_routes
from promgate.config.sections import Sections, read_sections
from promgate.config.shared_limits import check_shared_limits
from promgate.config.tcp_listeners import TCPDestinations
from promgate.config.workers import check_workers

__all__ = ["check_config", "load_config"]


def check_config(
    path: str | Path, *, host_checks: bool = False
) -> tuple[Config | None, list[Problem], list[Problem]]:
    """Load and validate ``path``; return the config (None if invalid), errors, warnings.

    With ``host_checks``, also check listener endpoints and the audit path against this
    host (``promgate check-config`` does; start-up finds the same by binding, and says so
    in one line).
    """
    main = Path(path)
    r = Reader(main, host_checks=host_checks)
    sections = read_sections(r, main)
    config = _build(r, sections) if r.files else None
    return config, r.errors, r.warnings


def load_config(path: str | Path) -> Config:
    """Load and validate ``path`` or raise ConfigError listing every problem."""
    config, errors, _ = check_config(path)
    if config is None:
        raise ConfigError(errors or [Problem(Path(path), None, "", "configuration is invalid")])
    return config


def _build(r: Reader, sections: Sections) -> Config | None:
    """Check every section, then the names they give each other; None if anything is wrong."""
    tls = tls_files(r, sections.singletons["tls"]) if "tls" in sections.singletons else None
    admin = check_admin(r, sections)
    tcp = TCPDestinations(r)
    listeners = check_listeners(r, sections, tls, tcp)
    providers = check_identity_providers(r, sections)
    identities = check_identities(r, sections, providers)
    routes, allow_items = check_routes(r, sections)
    listeners = tcp.resolve(listeners, routes, sections.routes)
    check_route_listeners(r, sections, listeners, routes)
    check_allow(r, allow_items, routes, identities, sections.identities)
    audit = check_audit(r, sections)
    workers = check_workers(r, sections)
    shared_limits = check_shared_limits(r, sections)
    if r.errors or audit is None:
        return None
    return Config(
        source=r.main,
        listeners=tuple(listeners),
        identities=identities,
        identity_providers=providers,
        routes=routes,
        admin=admin,
        audit=audit,
        workers=workers,
        shared_limits=shared_limits,
        files=tuple(r.files),
        warnings=tuple(str(w) for w in r.warnings),
    )
