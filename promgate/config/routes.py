"""The ``templates`` and ``routes`` sections: what each route reaches, and how.

A route takes its template's keys, then its own on top (its own upstream credentials
replace the template's, whichever kind). Paths must already be in the canonical form
requests are compared in; the route's targets are checked in ``config.targets`` and its
upstream TLS and credentials in ``config.upstream``.
"""

from __future__ import annotations

from typing import Any

from promgate.config import upstream
from promgate.config.fields import Reader
from promgate.config.model import (
    DEFAULT_MAX_RESPONSE,
    DEFAULT_TIMEOUT,
    LIMIT_KEYS,
    MAX_RESPONSE_LIMIT,
    SCHEMES,
    Limits,
    Route,
    Target,
)
from promgate.config.sections import Sections
from promgate.config.targets import check_targets
from promgate.config.units import parse_duration, parse_rate, parse_size
from promgate.config.yaml_source import Item
from promgate.paths import PathRefused, normalize_path

__all__ = ["check_routes"]

_ROUTE_KEYS = {
    "scheme",
    "metrics_path",
    "paths",
    "params",
    "allow",
    "limits",
    "timeout",
    "max_response_size",
    "tls",
    "labels",
    "authorization",
    "basic_auth",
    "keep_meta_labels",
    "listeners",
}
#: Route keys giving the gateway's own credentials for the upstream; at most one applies.
_UPSTREAM_AUTH_KEYS = ("authorization", "basic_auth")
#: Query parameters of ``/scrape`` itself, never passed upstream.
_RESERVED_PARAMS = frozenset({"route", "target", "path"})


def check_routes(r: Reader, sections: Sections) -> tuple[dict[str, Route], dict[str, Item]]:
    """Every route, merged over its template; and, by route, the ``allow`` list as
    written (the route's or its template's), for checking the names in it once every
    identity is known."""
    for item in sections.templates.values():
        r.fields(item, _ROUTE_KEYS)
    out = {}
    allow: dict[str, Item] = {}
    for name, item in sections.routes.items():
        route = _route(r, name, item, sections.templates, allow)
        if route is not None:
            out[name] = route
    return out, allow


def _route(
    r: Reader, name: str, item: Item, templates: dict[str, Item], allow: dict[str, Item]
) -> Route | None:
    merged = _merged(r, item, templates)
    if merged is None:
        return None
    kw: dict[str, Any] = {}
    if "scheme" in merged:
        kw["scheme"] = r.choice(merged["scheme"], SCHEMES) or "http"
    _paths(r, merged, kw)
    if "params" in merged:
        params = r.strings(merged["params"]) or []
        for p in params:
            if p in _RESERVED_PARAMS:
                r.error(
                    merged["params"].src,
                    merged["params"].key,
                    f"parameter {p!r} is the gateway's own",
                )
        kw["params"] = tuple(p for p in params if p not in _RESERVED_PARAMS)
    if "allow" in merged:
        kw["allow"] = tuple(r.strings(merged["allow"]) or ())
        allow[name] = merged["allow"]
    else:
        r.warn(item.src, item.key, "route has no 'allow' list; nobody may use it (deny by default)")
    if "limits" in merged:
        lim = _limits(r, merged["limits"])
        if lim is not None:
            kw["limits"] = lim
    if "timeout" in merged:
        kw["timeout"] = r.positive(merged["timeout"], parse_duration) or DEFAULT_TIMEOUT
    if "max_response_size" in merged:
        kw["max_response_size"] = (
            r.positive(merged["max_response_size"], lambda v: parse_size(v, MAX_RESPONSE_LIMIT))
            or DEFAULT_MAX_RESPONSE
        )
    _upstream(r, merged, kw)
    if "labels" in merged:
        kw["labels"] = r.labels(merged["labels"])
    if "keep_meta_labels" in merged:
        if isinstance(merged["keep_meta_labels"].value, bool):
            kw["keep_meta_labels"] = merged["keep_meta_labels"].value
        else:
            item_k = merged["keep_meta_labels"]
            r.error(item_k.src, item_k.key, "must be true or false")
    if "listeners" in merged:
        names = r.strings(merged["listeners"])
        if names is not None and not names:
            item_l = merged["listeners"]
            r.error(item_l.src, item_l.key, "name at least one listener, or leave it out")
        kw["listeners"] = tuple(names or ())
    targets: list[Target] = []
    if "targets" in merged:
        targets, kw["providers"], kw["selector"] = check_targets(r, merged["targets"])
    return Route(name=name, targets=tuple(targets), **kw)


def _merged(r: Reader, item: Item, templates: dict[str, Item]) -> dict[str, Item] | None:
    """A route's own keys over its template's (``template`` and ``targets`` are a route's
    own); the route's own credentials replace the template's, whatever kind."""
    own = r.fields(item, _ROUTE_KEYS | {"template", "targets"}, ("targets",))
    if own is None:
        return None
    merged: dict[str, Item] = {}
    if "template" in own:
        tname = r.string(own["template"])
        if tname is not None:
            if tname not in templates:
                r.error(item.src, own["template"].key, f"undefined template {tname!r}")
            else:
                tfields = r.fields(templates[tname], _ROUTE_KEYS) or {}
                if any(k in own for k in _UPSTREAM_AUTH_KEYS):
                    tfields = {k: v for k, v in tfields.items() if k not in _UPSTREAM_AUTH_KEYS}
                merged.update(tfields)
    merged.update({k: v for k, v in own.items() if k != "template"})
    return merged


def _paths(r: Reader, merged: dict[str, Item], kw: dict[str, Any]) -> None:
    """``metrics_path`` and the further ``paths`` a route allows, into ``kw``."""
    if "metrics_path" in merged:
        kw["metrics_path"] = _upstream_path(r, merged["metrics_path"])
    metrics_path = kw.get("metrics_path") or "/metrics"
    paths = [metrics_path]
    if "paths" in merged:
        for i, p in enumerate(
            merged["paths"].value if isinstance(merged["paths"].value, list) else []
        ):
            checked = _upstream_path(r, Item(p, merged["paths"].src, f"{merged['paths'].key}[{i}]"))
            if checked and checked not in paths:
                paths.append(checked)
        if not isinstance(merged["paths"].value, list):
            r.error(merged["paths"].src, merged["paths"].key, "must be a list of paths")
    kw["paths"] = tuple(paths)
    kw["metrics_path"] = metrics_path


def _upstream(r: Reader, merged: dict[str, Item], kw: dict[str, Any]) -> None:
    """How the upstream's TLS is verified, and the credentials the gateway presents to it
    (at most one kind), into ``kw``; both are for ``https`` upstreams."""
    if "tls" in merged:
        upstream_tls = upstream.upstream_tls(r, merged["tls"])
        if upstream_tls is not None:
            kw["upstream_tls"] = upstream_tls
            if kw.get("scheme") != "https":
                r.warn(
                    merged["tls"].src,
                    merged["tls"].key,
                    "tls settings are ignored unless scheme is https",
                )
    given = [(k, merged[k]) for k in _UPSTREAM_AUTH_KEYS if k in merged]
    if len(given) > 1:
        second = given[1][1]
        r.error(second.src, second.key, "give at most one of authorization and basic_auth")
    elif given:
        kind, auth_item = given[0]
        auth = (
            upstream.authorization(r, auth_item)
            if kind == "authorization"
            else upstream.basic_auth(r, auth_item)
        )
        kw["upstream_auth"] = auth
        if auth is not None and kw.get("scheme") != "https":
            r.warn(
                auth_item.src,
                auth_item.key,
                "upstream credentials are sent in clear text unless scheme is https",
            )


def _upstream_path(r: Reader, item: Item) -> str | None:
    """A configured path must already be what ``normalize_path`` makes of it: the
    form a request's ``path=`` is compared in (see docs/policy.md)."""
    path = r.string(item)
    if path is None:
        return None
    try:
        canonical = normalize_path(path)
    except PathRefused as e:
        r.error(item.src, item.key, f"must be an absolute path in canonical form: {e}")
        return None
    if canonical != path:
        r.error(
            item.src,
            item.key,
            f"must be an absolute path in canonical form: write {canonical!r}",
        )
        return None
    return path


def _limits(r: Reader, item: Item) -> Limits | None:
    f = r.fields(item, ("rate", "burst", "per", "max_concurrent"))
    if f is None:
        return None
    rate = r.typed(f["rate"], parse_rate) if "rate" in f else None
    burst = r.integer(f["burst"], 1) if "burst" in f else None
    per = r.choice(f["per"], LIMIT_KEYS) if "per" in f else None
    conc = r.integer(f["max_concurrent"], 1) if "max_concurrent" in f else None
    return Limits(
        rate=rate,
        burst=burst if burst is not None else (max(1, int(rate)) if rate else 1),
        per=per or "identity_target",
        max_concurrent=conc,
    )
