"""Load a configuration: YAML with drop-in includes, templates, and strict validation.

Every problem found is collected (not just the first), each with the file, line and key
path it concerns, so that ``promgate check-config`` and ``twistd promgate`` can print the
same complete list.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import attrs
from service_identity.hazmat import DNS_ID

from promgate.addresses import HOSTNAME as _HOSTNAME
from promgate.addresses import split_address
from promgate.config import files
from promgate.config.errors import ConfigError, Problem
from promgate.config.fields import LABEL_NAME, NAME, Reader
from promgate.config.host_checks import audit_path_findings
from promgate.config.identities import identities as check_identities
from promgate.config.model import (
    DEFAULT_MAX_RESPONSE,
    DEFAULT_TIMEOUT,
    MAX_RESPONSE_LIMIT,
    Admin,
    Audit,
    Config,
    Deadlines,
    Destination,
    Limits,
    Listener,
    Route,
    Target,
    TCPForwarding,
    TLSFiles,
    UpstreamAuth,
    UpstreamIdentity,
    UpstreamTLS,
    route_listeners,
)
from promgate.config.sections import Sections, read_sections
from promgate.config.targets import targets as check_targets
from promgate.config.units import parse_duration, parse_rate, parse_size
from promgate.config.yaml_source import Item, join_key
from promgate.paths import PathRefused, normalize_path
from promgate.spiffe import is_spiffe, spiffe_id_error

_RESERVED_PARAMS = frozenset({"route", "target", "path"})

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
#: An HTTP token (RFC 9110), for an ``authorization.type``.
_AUTH_SCHEME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: A bearer credential: one line of visible ASCII, no spaces.
_AUTH_CREDENTIALS = re.compile(r"^[\x21-\x7e]+$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[\x21-\x7e]+$")
_LIMIT_PER = ("identity", "target", "identity_target")
_LATER_PROTOCOLS: set[str] = set()
#: Listener keys only ``protocol: tcp`` listeners take.
_TCP_KEYS = ("mode", "route", "target", "sni", "sni_default", "proxy_protocol")
_TCP_MODES = ("terminate", "passthrough")


class _Loader:
    """Collects sections from the main file and its drop-ins, then validates them."""

    def __init__(self, r: Reader, sections: Sections) -> None:
        self.r = r
        self.sections = sections

    # -- sections ----------------------------------------------------------------------

    def listener(self, item: Item, default_tls: TLSFiles | None, have_tls: bool) -> Listener | None:
        f = self.r.fields(
            item,
            ("name", "protocol", "endpoint", "advertise", "sd", "tls", "tunnel_idle", *_TCP_KEYS),
            ("name", "endpoint"),
        )
        if f is None:
            return None
        name = self.r.string(f["name"]) if "name" in f else None
        if name is not None and not NAME.match(name):
            self.r.error(
                item.src, f["name"].key, "names use letters, digits, '_', '.', '-' (at most 63)"
            )
        protocol = "http"
        if "protocol" in f:
            if isinstance(f["protocol"].value, str) and f["protocol"].value in _LATER_PROTOCOLS:
                self.r.error(
                    item.src,
                    f["protocol"].key,
                    f"protocol {f['protocol'].value!r} is not available in this version",
                )
                return None
            protocol = self.r.choice(f["protocol"], ("http", "forward", "tcp")) or "http"
        endpoint = self.r.endpoint(f["endpoint"]) if "endpoint" in f else None
        advertise = None
        if "advertise" in f:
            advertise = self.r.string(f["advertise"])
            if advertise is not None and split_address(advertise) is None:
                self.r.error(item.src, f["advertise"].key, "must be host:port")
            if protocol != "http":
                self.r.error(item.src, f["advertise"].key, "only http listeners advertise (/sd)")
        sd_route_label: str | None = "route"
        if "sd" in f:
            if protocol != "http":
                self.r.error(item.src, f["sd"].key, "only http listeners serve /sd")
            sd_route_label = self.sd_settings(f["sd"])
        deadlines = Deadlines()
        if "tunnel_idle" in f:
            if protocol not in ("forward", "tcp"):
                self.r.error(
                    item.src, f["tunnel_idle"].key, "only forward and tcp listeners have tunnels"
                )
            else:
                tunnel_idle = self.r.positive(f["tunnel_idle"], parse_duration)
                if tunnel_idle is not None:
                    deadlines = Deadlines(tunnel_idle=tunnel_idle)
        # A passthrough tcp listener relays the client's TLS: it needs no TLS files.
        passthrough = protocol == "tcp" and "mode" in f and f["mode"].value == "passthrough"
        tls = default_tls
        if "tls" in f:
            if f["tls"].value is False:
                tls = None
                if protocol != "tcp":  # tcp listeners: see tcp_settings
                    self.r.warn(
                        item.src,
                        f["tls"].key,
                        "plain-text listener: no client certificates, and bearer tokens and "
                        "passwords cross the network in clear text",
                    )
            elif isinstance(f["tls"].value, dict):
                tls = files.tls_files(self.r, f["tls"])
            else:
                self.r.error(
                    item.src,
                    f["tls"].key,
                    "must be false or a mapping with certificate, key and client_ca",
                )
        elif not have_tls and not passthrough:
            self.r.error(
                item.src,
                item.key,
                "no top-level 'tls' section; give this listener 'tls' or say 'tls: false'",
            )
        tcp = None
        if protocol == "tcp":
            tcp = self.tcp_settings(item, f, tls)
            if passthrough:
                tls = None
        else:
            for key in _TCP_KEYS:
                if key in f:
                    self.r.error(item.src, f[key].key, "only tcp listeners take this key")
        if name is None or endpoint is None or (protocol == "tcp" and tcp is None):
            return None
        return Listener(
            name=name,
            protocol=protocol,
            endpoint=endpoint,
            tls=tls,
            advertise=advertise,
            deadlines=deadlines,
            tcp=tcp,
            sd_route_label=sd_route_label,
        )

    def check_route_listeners(self, listeners: list[Listener], routes: dict[str, Route]) -> None:
        """Which listeners serve which route (``route_listeners``), checked both ways, and
        ``/sd`` label sets that stay unique per route and target."""
        by_name = {li.name: li for li in listeners}
        items = {
            it.value["name"]: it
            for it in self.sections.listeners
            if isinstance(it.value, dict) and isinstance(it.value.get("name"), str)
        }
        for name, route in routes.items():
            item = self.sections.routes[name]
            for listener_name in route.listeners:
                listener = by_name.get(listener_name)
                if listener is None:
                    self.r.error(
                        item.src, f"{item.key}.listeners", f"unknown listener {listener_name!r}"
                    )
                elif listener.protocol == "tcp" and name not in listener.named_routes():
                    self.r.error(
                        item.src,
                        f"{item.key}.listeners",
                        f"tcp listener {listener_name!r} does not forward to this route "
                        "(name it in the listener's route: or sni:)",
                    )
        served = route_listeners(tuple(listeners), routes)
        for listener in listeners:
            for name in sorted(listener.named_routes()):
                if name in routes and listener.name not in served[name]:
                    at = items.get(listener.name)
                    self.r.error(
                        at.src if at else None,
                        at.key if at else "listeners",
                        f"route {name!r} leaves this listener out of its listeners:",
                    )
        for name in sorted(routes):
            if not served[name]:
                item = self.sections.routes[name]
                self.r.warn(item.src, item.key, "no listener serves this route")
        for listener in listeners:
            if listener.protocol != "http":
                continue
            mine = [routes[n] for n in sorted(routes) if listener.name in served[n]]
            label = listener.sd_route_label
            if label is None:
                seen: dict[str, str] = {}
                for route in mine:
                    for target in route.targets:
                        first = seen.setdefault(target.address, route.name)
                        if first != route.name:
                            at = items.get(listener.name)
                            self.r.warn(
                                at.src if at else None,
                                f"{at.key}.sd" if at else "listeners",
                                f"routes {first!r} and {route.name!r} share target "
                                f"{target.address}: without a route label their /sd label "
                                "sets collide",
                            )
                continue
            for route in mine:
                if label in route.labels:
                    item = self.sections.routes[route.name]
                    self.r.error(
                        item.src,
                        f"{item.key}.labels",
                        f"label {label!r} is the route label /sd adds on listener "
                        f"{listener.name!r}; rename it or set that listener's sd.route_label",
                    )

    def sd_settings(self, item: Item) -> str | None:
        """``sd: {route_label: NAME}``: the label naming the route, or null/false for none."""
        f = self.r.fields(item, ("route_label",))
        if f is None or "route_label" not in f:
            return "route"
        value = f["route_label"].value
        if value is None or value is False:
            return None
        if not isinstance(value, str) or not LABEL_NAME.match(value) or value.startswith("__"):
            self.r.error(
                item.src,
                f["route_label"].key,
                "must be a Prometheus label name not starting with '__', or null for none",
            )
            return "route"
        if value in ("instance", "job"):
            self.r.error(
                item.src,
                f["route_label"].key,
                f"{value!r} names the target or the job in Prometheus; choose another label",
            )
            return "route"
        return value

    def tcp_settings(
        self, item: Item, f: dict[str, Item], tls: TLSFiles | None
    ) -> TCPForwarding | None:
        """The tcp keys of one listener. Route and target names are checked later, in
        tcp_destinations, once the routes are known."""
        mode = self.r.choice(f["mode"], _TCP_MODES) if "mode" in f else "terminate"
        if mode is None:
            return None
        ok = True
        if mode == "passthrough" and "tls" in f and f["tls"].value is not False:
            self.r.error(
                item.src,
                f["tls"].key,
                "a passthrough listener relays the client's TLS untouched: it has no TLS "
                "files of its own (remove 'tls')",
            )
            ok = False
        if mode == "terminate" and "tls" in f and f["tls"].value is False:
            self.r.error(
                item.src,
                f["tls"].key,
                "a terminate-mode tcp listener needs mutual TLS; "
                "use 'mode: passthrough' to relay TLS untouched",
            )
            ok = False
        proxy_protocol = None
        if "proxy_protocol" in f:
            proxy_protocol = self.r.choice(f["proxy_protocol"], ("v2",))
            ok = ok and proxy_protocol is not None
        pending: list[tuple[str, Item, Item | None, bool]] = []
        destination = None
        sni: dict[str, Destination] = {}
        sni_default = None
        if "route" in f and "sni" in f:
            self.r.error(item.src, f["sni"].key, "give either 'route' or 'sni', not both")
            return None
        if "route" not in f and "sni" not in f:
            self.r.error(item.src, item.key, "a tcp listener needs 'route' or 'sni'")
            return None
        if "target" in f and "route" not in f:
            self.r.error(
                item.src,
                f["target"].key,
                "'target' goes with 'route' (in 'sni', give {route: ..., target: ...})",
            )
            ok = False
        if "sni_default" in f and "sni" not in f:
            self.r.error(item.src, f["sni_default"].key, "'sni_default' goes with 'sni'")
            ok = False
        if "route" in f:
            destination = self.tcp_destination(f["route"], f.get("target"), pending, False)
        else:
            entries = f["sni"]
            if not isinstance(entries.value, dict) or not entries.value:
                self.r.error(
                    entries.src,
                    entries.key,
                    "must map server names (or *.parent) to a route or {route, target}",
                )
                return None
            for server_name, value in entries.value.items():
                key = join_key(entries.key, server_name)
                pattern = _sni_pattern(server_name)
                if pattern is None:
                    self.r.error(
                        entries.src, key, "not a server name (a DNS name, or *.parent.name)"
                    )
                    ok = False
                    continue
                if pattern in sni:
                    self.r.error(entries.src, key, f"server name {pattern!r} given twice")
                    ok = False
                    continue
                dest = self.tcp_destination(Item(value, entries.src, key), None, pending, True)
                if dest is not None:
                    sni[pattern] = dest
            if "sni_default" in f:
                sni_default = self.tcp_destination(f["sni_default"], None, pending, True)
                ok = ok and sni_default is not None
        if not ok or (destination is None and not sni):
            return None
        settings = TCPForwarding(
            mode=mode,
            destination=destination,
            sni=sni,
            sni_default=sni_default,
            proxy_protocol=proxy_protocol,
        )
        self._tcp_pending.append((settings, pending))
        return settings

    def tcp_destination(
        self,
        item: Item,
        target_item: Item | None,
        pending: list[tuple[str, Item, Item | None, bool]],
        nested: bool,
    ) -> Destination | None:
        """A route name, or (in ``sni``) a route name or {route, target}; the target is
        filled in by tcp_destinations when the route has exactly one."""
        if nested and isinstance(item.value, dict):
            g = self.r.fields(item, ("route", "target"), ("route",))
            if g is None or "route" not in g:
                return None
            item, target_item = g["route"], g.get("target")
        route = self.r.string(item)
        if route is None:
            return None
        target = ""
        if target_item is not None:
            text = self.r.string(target_item)
            if text is None:
                return None
            if split_address(text) is None:
                self.r.error(
                    target_item.src,
                    target_item.key,
                    f"target {text!r} must be host:port ([v6]:port for IPv6)",
                )
                return None
            target = text
        pending.append((route, item, target_item, nested))
        return Destination(route, target)

    def tcp_destinations(
        self, listeners: list[Listener], routes: dict[str, Route]
    ) -> list[Listener]:
        """Check every tcp listener's routes and targets, and fill in single targets."""
        out = []
        for lst in listeners:
            if lst.tcp is None:
                out.append(lst)
                continue
            pending = next((p for s, p in self._tcp_pending if s is lst.tcp), [])
            resolved: dict[tuple[str, str], Destination] = {}
            passthrough = lst.tcp.mode == "passthrough"
            for name, route_item, target_item, nested in pending:
                dest = self._resolve_destination(
                    name, route_item, target_item, nested, routes, passthrough
                )
                if dest is not None:
                    given = target_item.value if target_item is not None else ""
                    resolved[(name, given)] = dest
            tcp = attrs.evolve(
                lst.tcp,
                destination=_filled(resolved, lst.tcp.destination),
                sni={k: _filled(resolved, v) or v for k, v in lst.tcp.sni.items()},
                sni_default=_filled(resolved, lst.tcp.sni_default),
            )
            out.append(attrs.evolve(lst, tcp=tcp))
        return out

    def _resolve_destination(
        self,
        name: str,
        route_item: Item,
        target_item: Item | None,
        nested: bool,
        routes: dict[str, Route],
        passthrough: bool,
    ) -> Destination | None:
        route = routes.get(name)
        if route is None:
            if name not in self.sections.routes:  # else the route's own errors say why
                self.r.error(route_item.src, route_item.key, f"undefined route {name!r}")
            return None
        if target_item is None:
            if len(route.targets) != 1:
                how = "{route: ..., target: HOST:PORT}" if nested else "'target: HOST:PORT'"
                self.r.error(
                    route_item.src,
                    route_item.key,
                    f"route {name!r} has {len(route.targets)} targets; name one with {how}",
                )
                return None
            address = route.targets[0].address
        else:
            address = str(target_item.value)
            if not route.has_target(address):
                self.r.error(
                    target_item.src,
                    target_item.key,
                    f"{address!r} is not a target of route {name!r}",
                )
                return None
        if passthrough and not any(e.startswith("sni:") for e in route.allow):
            self.r.warn(
                route_item.src,
                route_item.key,
                f"passthrough connections carry no identity and route {name!r} has no "
                "'sni:' allow entry: every connection will be refused",
            )
        return Destination(name, address)

    def route(self, name: str, item: Item, templates: dict[str, Item]) -> Route | None:
        allowed = _ROUTE_KEYS | {"template", "targets"}
        own = self.r.fields(item, allowed, ("targets",))
        if own is None:
            return None
        merged: dict[str, Item] = {}
        if "template" in own:
            tname = self.r.string(own["template"])
            if tname is not None:
                if tname not in templates:
                    self.r.error(item.src, own["template"].key, f"undefined template {tname!r}")
                else:
                    tfields = self.r.fields(templates[tname], _ROUTE_KEYS) or {}
                    if any(k in own for k in _UPSTREAM_AUTH_KEYS):
                        # The route's own credentials replace the template's, whatever kind.
                        tfields = {k: v for k, v in tfields.items() if k not in _UPSTREAM_AUTH_KEYS}
                    merged.update(tfields)
        merged.update({k: v for k, v in own.items() if k != "template"})

        kw: dict[str, Any] = {}
        if "scheme" in merged:
            kw["scheme"] = self.r.choice(merged["scheme"], ("http", "https")) or "http"
        if "metrics_path" in merged:
            kw["metrics_path"] = self.upstream_path(merged["metrics_path"])
        metrics_path = kw.get("metrics_path") or "/metrics"
        paths = [metrics_path]
        if "paths" in merged:
            for i, p in enumerate(
                merged["paths"].value if isinstance(merged["paths"].value, list) else []
            ):
                checked = self.upstream_path(
                    Item(p, merged["paths"].src, f"{merged['paths'].key}[{i}]")
                )
                if checked and checked not in paths:
                    paths.append(checked)
            if not isinstance(merged["paths"].value, list):
                self.r.error(merged["paths"].src, merged["paths"].key, "must be a list of paths")
        kw["paths"] = tuple(paths)
        kw["metrics_path"] = metrics_path
        if "params" in merged:
            params = self.r.strings(merged["params"]) or []
            for p in params:
                if p in _RESERVED_PARAMS:
                    self.r.error(
                        merged["params"].src,
                        merged["params"].key,
                        f"parameter {p!r} is the gateway's own",
                    )
            kw["params"] = tuple(p for p in params if p not in _RESERVED_PARAMS)
        if "allow" in merged:
            kw["allow"] = tuple(self.r.strings(merged["allow"]) or ())
            self._allow_refs.append((merged["allow"], kw["allow"]))
        else:
            self.r.warn(
                item.src, item.key, "route has no 'allow' list; nobody may use it (deny by default)"
            )
        if "limits" in merged:
            lim = self.limits(merged["limits"])
            if lim is not None:
                kw["limits"] = lim
        if "timeout" in merged:
            kw["timeout"] = self.r.positive(merged["timeout"], parse_duration) or DEFAULT_TIMEOUT
        if "max_response_size" in merged:
            kw["max_response_size"] = (
                self.r.positive(
                    merged["max_response_size"], lambda v: parse_size(v, MAX_RESPONSE_LIMIT)
                )
                or DEFAULT_MAX_RESPONSE
            )
        if "tls" in merged:
            upstream_tls = self.upstream_tls(merged["tls"])
            if upstream_tls is not None:
                kw["upstream_tls"] = upstream_tls
                if kw.get("scheme") != "https":
                    self.r.warn(
                        merged["tls"].src,
                        merged["tls"].key,
                        "tls settings are ignored unless scheme is https",
                    )
        given = [(k, merged[k]) for k in _UPSTREAM_AUTH_KEYS if k in merged]
        if len(given) > 1:
            second = given[1][1]
            self.r.error(second.src, second.key, "give at most one of authorization and basic_auth")
        elif given:
            kind, auth_item = given[0]
            auth = (
                self.authorization(auth_item)
                if kind == "authorization"
                else self.basic_auth(auth_item)
            )
            kw["upstream_auth"] = auth
            if auth is not None and kw.get("scheme") != "https":
                self.r.warn(
                    auth_item.src,
                    auth_item.key,
                    "upstream credentials are sent in clear text unless scheme is https",
                )
        if "labels" in merged:
            kw["labels"] = self.r.labels(merged["labels"])
        if "keep_meta_labels" in merged:
            if isinstance(merged["keep_meta_labels"].value, bool):
                kw["keep_meta_labels"] = merged["keep_meta_labels"].value
            else:
                item_k = merged["keep_meta_labels"]
                self.r.error(item_k.src, item_k.key, "must be true or false")
        if "listeners" in merged:
            names = self.r.strings(merged["listeners"])
            if names is not None and not names:
                item_l = merged["listeners"]
                self.r.error(item_l.src, item_l.key, "name at least one listener, or leave it out")
            kw["listeners"] = tuple(names or ())
        targets: list[Target] = []
        if "targets" in merged:
            targets, kw["providers"], kw["selector"] = check_targets(self.r, merged["targets"])
        return Route(name=name, targets=tuple(targets), **kw)

    # -- upstream TLS and credentials (per route) ---------------------------------------

    def upstream_tls(self, item: Item) -> UpstreamTLS | None:
        """A route's ``tls``: how the upstream is verified, and the client certificate shown."""
        t = self.r.fields(item, ("ca", "server_name", "cert", "key", "identity"))
        if t is None:
            return None
        ca = self.r.existing_file(t["ca"]) if "ca" in t else None
        if ca is not None:
            files.certificates(self.r, t["ca"], ca)
        server_name = self.r.string(t["server_name"]) if "server_name" in t else None
        cert = key = None
        if "cert" in t and "key" not in t:
            self.r.error(item.src, t["cert"].key, "a client certificate needs its 'key'")
        elif "key" in t and "cert" not in t:
            self.r.error(item.src, t["key"].key, "a client key needs its 'cert'")
        elif "cert" in t:
            cert, key = files.client_certificate(self.r, t["cert"], t["key"])
        identity = self.upstream_identity(t["identity"]) if "identity" in t else None
        return UpstreamTLS(ca=ca, server_name=server_name, cert=cert, key=key, identity=identity)

    def upstream_identity(self, item: Item) -> UpstreamIdentity | None:
        """``{dns: NAME}`` or ``{uri: URI}``: what the upstream's certificate must name."""
        f = self.r.fields(item, ("dns", "uri"))
        if f is None:
            return None
        if len(f) != 1:
            self.r.error(item.src, item.key, "give exactly one of dns, uri")
            return None
        ((kind, value),) = f.items()
        text = self.r.string(value)
        if text is None:
            return None
        if kind == "dns":
            try:
                DNS_ID(text)
            except ValueError:
                self.r.error(
                    value.src, value.key, "must be a DNS name (no wildcard, not an IP address)"
                )
                return None
            return UpstreamIdentity(dns=text)
        if not _URI.fullmatch(text):
            self.r.error(
                value.src,
                value.key,
                "must be an absolute URI such as spiffe://example.org/ns/prod/sa/exporter",
            )
            return None
        if is_spiffe(text) and (why := spiffe_id_error(text)) is not None:
            self.r.error(value.src, value.key, f"not a valid SPIFFE ID: {why}")
            return None
        return UpstreamIdentity(uri=text)

    def authorization(self, item: Item) -> UpstreamAuth | None:
        """``authorization: {type, credentials_file}``, as in a Prometheus scrape config."""
        f = self.r.fields(item, ("type", "credentials_file", "credentials"))
        if f is None:
            return None
        scheme = "Bearer"
        if "type" in f:
            text = self.r.string(f["type"])
            if text is None:
                return None
            if not _AUTH_SCHEME.fullmatch(text):
                self.r.error(
                    f["type"].src, f["type"].key, "must be an HTTP auth scheme such as Bearer"
                )
                return None
            if text.lower() == "basic":
                self.r.error(
                    f["type"].src,
                    f["type"].key,
                    "Basic credentials are written as basic_auth (username, password_file)",
                )
                return None
            scheme = text
        if "credentials" in f:
            self.r.error(
                f["credentials"].src,
                f["credentials"].key,
                "secrets are not written into the configuration; "
                "put the token in a file and name it with credentials_file",
            )
            return None
        if "credentials_file" not in f:
            self.r.error(item.src, item.key, "missing required key 'credentials_file'")
            return None
        secret = files.secret_file(self.r, f["credentials_file"])
        if secret is None:
            return None
        path, token = secret
        if not _AUTH_CREDENTIALS.fullmatch(token):
            self.r.error(
                f["credentials_file"].src,
                f["credentials_file"].key,
                f"{path}: the credentials must be one line of printable ASCII without spaces",
            )
            return None
        header = b"Authorization: %s %s\r\n" % (scheme.encode("ascii"), token.encode("ascii"))
        return UpstreamAuth(scheme=scheme, source=path, header=header)

    def basic_auth(self, item: Item) -> UpstreamAuth | None:
        """``basic_auth: {username, password_file}``, as in a Prometheus scrape config."""
        f = self.r.fields(item, ("username", "password_file", "password"), ("username",))
        if f is None:
            return None
        username = self.r.string(f["username"]) if "username" in f else None
        if username is not None and (
            ":" in username or any(ord(c) < 0x20 or ord(c) == 0x7F for c in username)
        ):
            self.r.error(
                f["username"].src,
                f["username"].key,
                "must not contain ':' or control characters",
            )
            username = None
        secret = None
        if "password" in f:
            self.r.error(
                f["password"].src,
                f["password"].key,
                "secrets are not written into the configuration; "
                "put the password in a file and name it with password_file",
            )
        elif "password_file" not in f:
            self.r.error(item.src, item.key, "missing required key 'password_file'")
        else:
            secret = files.secret_file(self.r, f["password_file"])
        if username is None or secret is None:
            return None
        path, password = secret
        token = base64.b64encode(f"{username}:{password}".encode())
        return UpstreamAuth(
            scheme="Basic", source=path, header=b"Authorization: Basic " + token + b"\r\n"
        )

    def upstream_path(self, item: Item) -> str | None:
        """A configured path must already be what ``normalize_path`` makes of it: the
        form a request's ``path=`` is compared in (see docs/policy.md)."""
        path = self.r.string(item)
        if path is None:
            return None
        try:
            canonical = normalize_path(path)
        except PathRefused as e:
            self.r.error(item.src, item.key, f"must be an absolute path in canonical form: {e}")
            return None
        if canonical != path:
            self.r.error(
                item.src,
                item.key,
                f"must be an absolute path in canonical form: write {canonical!r}",
            )
            return None
        return path

    def limits(self, item: Item) -> Limits | None:
        f = self.r.fields(item, ("rate", "burst", "per", "max_concurrent"))
        if f is None:
            return None
        rate = self.r.typed(f["rate"], parse_rate) if "rate" in f else None
        burst = self.r.integer(f["burst"], 1) if "burst" in f else None
        per = self.r.choice(f["per"], _LIMIT_PER) if "per" in f else None
        conc = self.r.integer(f["max_concurrent"], 1) if "max_concurrent" in f else None
        return Limits(
            rate=rate,
            burst=burst if burst is not None else (max(1, int(rate)) if rate else 1),
            per=per or "identity_target",
            max_concurrent=conc,
        )

    def audit(self, item: Item) -> Audit | None:
        f = self.r.fields(
            item,
            (
                "path",
                "key_file",
                "fsync",
                "fsync_interval",
                "on_failure",
                "max_field_length",
                "aggregate_interval",
            ),
            ("path", "key_file"),
        )
        if f is None or "path" not in f or "key_file" not in f:
            return None
        name = self.r.string(f["path"])
        path = f["path"].src.resolve(name) if name else None
        if path is not None and not path.parent.is_dir():
            self.r.error(f["path"].src, f["path"].key, f"directory {path.parent} does not exist")
        elif path is not None and self.r.host_checks:
            self.r.report(f["path"], audit_path_findings(path))
        key_file = files.audit_key_file(self.r, f["key_file"])
        kw: dict[str, Any] = {}
        if "fsync" in f:
            kw["fsync"] = self.r.choice(f["fsync"], ("always", "interval", "never")) or "interval"
        if "fsync_interval" in f:
            kw["fsync_interval"] = self.r.positive(f["fsync_interval"], parse_duration) or 1.0
        if "on_failure" in f:
            kw["on_failure"] = self.r.choice(f["on_failure"], ("deny", "allow")) or "deny"
        if "max_field_length" in f:
            kw["max_field_length"] = self.r.integer(f["max_field_length"], 16) or 1024
        if "aggregate_interval" in f:
            kw["aggregate_interval"] = (
                self.r.positive(f["aggregate_interval"], parse_duration) or 10.0
            )
        if path is None or key_file is None:
            return None
        return Audit(path=path, key_file=key_file, **kw)

    # -- whole configuration -------------------------------------------------------------

    def build(self) -> Config | None:
        self._allow_refs: list[tuple[Item, tuple[str, ...]]] = []
        self._tcp_pending: list[
            tuple[TCPForwarding, list[tuple[str, Item, Item | None, bool]]]
        ] = []
        tls = (
            files.tls_files(self.r, self.sections.singletons["tls"])
            if "tls" in self.sections.singletons
            else None
        )
        admin = Admin()
        if "admin" in self.sections.singletons:
            f = self.r.fields(self.sections.singletons["admin"], ("endpoint",))
            if f and "endpoint" in f:
                endpoint = self.r.endpoint(f["endpoint"])
                if endpoint is not None:
                    admin = Admin(endpoint=endpoint)
        listeners: list[Listener] = []
        names: dict[str, Item] = {}
        for item in self.sections.listeners:
            lst = self.listener(item, tls, "tls" in self.sections.singletons)
            if lst is None:
                continue
            if lst.name in names:
                first = names[lst.name]
                self.r.error(
                    item.src,
                    f"{item.key}.name",
                    f"listener {lst.name!r} defined twice "
                    f"(first at {first.src.file}:{first.src.line(first.key)})",
                )
                continue
            names[lst.name] = item
            listeners.append(lst)
        if not self.sections.listeners:
            self.r.error(None, "listeners", "no listeners defined")
        identities = check_identities(self.r, self.sections)
        for item in self.sections.templates.values():
            self.r.fields(item, _ROUTE_KEYS)
        routes = {}
        for name, item in self.sections.routes.items():
            route = self.route(name, item, self.sections.templates)
            if route is not None:
                routes[name] = route
        listeners = self.tcp_destinations(listeners, routes)
        self.check_route_listeners(listeners, routes)
        roles = {r for i in identities.values() for r in i.roles}
        for item, allow in self._allow_refs:
            for entry in allow:
                if entry.startswith("role:"):
                    if entry[5:] not in roles:
                        self.r.warn(item.src, item.key, f"no identity carries role {entry[5:]!r}")
                elif entry.startswith("sni:"):  # passthrough tcp connections, by server name
                    if entry != "sni:*" and _sni_pattern(entry[4:]) is None:
                        self.r.error(
                            item.src,
                            item.key,
                            f"{entry!r}: give sni:* or sni: and a server name or *.parent",
                        )
                elif entry not in self.sections.identities and entry not in identities:
                    self.r.error(item.src, item.key, f"undefined identity {entry!r}")
        audit = None
        if "audit" in self.sections.singletons:
            audit = self.audit(self.sections.singletons["audit"])
        else:
            self.r.error(
                None, "audit", "missing: every gateway keeps an audit log (give path and key_file)"
            )
        if self.r.errors or audit is None:
            return None
        return Config(
            source=self.r.main,
            listeners=tuple(listeners),
            identities=identities,
            routes=routes,
            admin=admin,
            audit=audit,
            files=tuple(self.r.files),
            warnings=tuple(str(w) for w in self.r.warnings),
        )


def _filled(
    resolved: dict[tuple[str, str], Destination], dest: Destination | None
) -> Destination | None:
    """``dest`` with the target the route check found for it."""
    if dest is None:
        return None
    return resolved.get((dest.route, dest.target), dest)


def _sni_pattern(text: str) -> str | None:
    """A server name or ``*.parent`` as tcp listeners compare them (lower case, no final
    dot), or None if it is neither."""
    name = text.lower().rstrip(".")
    rest = name[2:] if name.startswith("*.") else name
    if not rest or "*" in rest or not _HOSTNAME.match(rest):
        return None
    return name


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
    config = _Loader(r, sections).build() if r.files else None
    return config, r.errors, r.warnings


def load_config(path: str | Path) -> Config:
    """Load and validate ``path`` or raise ConfigError listing every problem."""
    config, errors, _ = check_config(path)
    if config is None:
        raise ConfigError(errors or [Problem(Path(path), None, "", "configuration is invalid")])
    return config
