"""Load a configuration: YAML with drop-in includes, templates, and strict validation.

Every problem found is collected (not just the first), each with the file, line and key
path it concerns, so that ``promgate check-config`` and ``twistd promgate`` can print the
same complete list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    Listener,
    Route,
    TLSFiles,
    route_listeners,
)
from promgate.config.routes import routes as check_routes
from promgate.config.sections import Sections, read_sections
from promgate.config.tcp_listeners import TCP_KEYS, TCPDestinations, sni_pattern
from promgate.config.units import parse_duration
from promgate.config.yaml_source import Item

_LATER_PROTOCOLS: set[str] = set()


class _Loader:
    """Collects sections from the main file and its drop-ins, then validates them."""

    def __init__(self, r: Reader, sections: Sections) -> None:
        self.r = r
        self.sections = sections
        self.tcp = TCPDestinations(r)

    # -- sections ----------------------------------------------------------------------

    def listener(self, item: Item, default_tls: TLSFiles | None, have_tls: bool) -> Listener | None:
        f = self.r.fields(
            item,
            ("name", "protocol", "endpoint", "advertise", "sd", "tls", "tunnel_idle", *TCP_KEYS),
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
            tcp = self.tcp.settings(item, f)
            if passthrough:
                tls = None
        else:
            for key in TCP_KEYS:
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
        listeners = self.tcp.resolve(listeners, routes, self.sections.routes)
        self.check_route_listeners(listeners, routes)
        roles = {r for i in identities.values() for r in i.roles}
        for name, item in allow_items.items():
            for entry in routes[name].allow:
                if entry.startswith("role:"):
                    if entry[5:] not in roles:
                        self.r.warn(item.src, item.key, f"no identity carries role {entry[5:]!r}")
                elif entry.startswith("sni:"):  # passthrough tcp connections, by server name
                    if entry != "sni:*" and sni_pattern(entry[4:]) is None:
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
