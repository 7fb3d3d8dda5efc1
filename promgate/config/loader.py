"""Load a configuration: YAML with drop-in includes, templates, and strict validation.

Every problem found is collected (not just the first), each with the file, line and key
path it concerns, so that ``promgate check-config`` and ``twistd promgate`` can print the
same complete list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from promgate.addresses import HOSTNAME as _HOSTNAME
from promgate.addresses import split_address
from promgate.config import files
from promgate.config.errors import ConfigError, Problem
from promgate.config.fields import LABEL_NAME, NAME, Reader
from promgate.config.host_checks import audit_path_findings
from promgate.config.identities import identities as check_identities
from promgate.config.model import (
    Admin,
    Audit,
    Config,
    Deadlines,
    Destination,
    Listener,
    Route,
    TCPForwarding,
    TLSFiles,
    route_listeners,
)
from promgate.config.routes import routes as check_routes
from promgate.config.sections import Sections, read_sections
from promgate.config.units import parse_duration
from promgate.config.yaml_source import Item, join_key

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
        routes, allow_items = check_routes(self.r, self.sections)
        listeners = self.tcp_destinations(listeners, routes)
        self.check_route_listeners(listeners, routes)
        roles = {r for i in identities.values() for r in i.roles}
        for name, item in allow_items.items():
            for entry in routes[name].allow:
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
