"""The ``listeners`` and ``admin`` sections: where the gateway listens, and how.

Each listener speaks one protocol (``http``, ``forward`` or ``tcp``), with the top-level
``tls`` unless it gives its own or says ``tls: false``. The keys only tcp listeners take
are read by ``config.tcp_listeners``.
"""

from __future__ import annotations

from promgate.addresses import split_address
from promgate.config.fields import LABEL_NAME, NAME, NAME_RULE, Reader, where
from promgate.config.files import tls_files
from promgate.config.model import (
    LISTENER_PROTOCOLS,
    Admin,
    Deadlines,
    Listener,
    ListenerProtocol,
    TLSFiles,
)
from promgate.config.sections import Sections
from promgate.config.tcp_listeners import TCP_KEYS, TCPDestinations
from promgate.config.units import parse_duration
from promgate.config.yaml_source import Item
from promgate.endpoints import parse_endpoint

__all__ = ["check_admin", "check_listeners"]

#: Protocols planned but not built: refused as "not available in this version".
_LATER_PROTOCOLS: frozenset[str] = frozenset()


def check_admin(r: Reader, sections: Sections) -> Admin:
    """The admin listener's endpoint (loopback by default)."""
    if "admin" in sections.singletons:
        f = r.fields(sections.singletons["admin"], ("endpoint",))
        if f and "endpoint" in f:
            endpoint = r.endpoint(f["endpoint"])
            if endpoint is not None:
                return Admin(endpoint=endpoint)
    return Admin()


def check_listeners(
    r: Reader, sections: Sections, tls: TLSFiles | None, tcp: TCPDestinations
) -> list[Listener]:
    """Every valid listener, with ``tls`` (the top-level files) unless it says otherwise;
    names are unique."""
    out: list[Listener] = []
    names: dict[str, Item] = {}
    sockets: dict[tuple[int | None, str | None], Item] = {}
    for item in sections.listeners:
        lst = _listener(r, tcp, item, tls, "tls" in sections.singletons)
        if lst is None:
            continue
        inherited = parse_endpoint(lst.endpoint).systemd
        if inherited is not None:
            passed = (inherited.index, inherited.name)
            if passed in sockets:
                r.error(
                    item.src,
                    f"{item.key}.endpoint",
                    f"the systemd socket with {inherited.shown} is already "
                    f"listened on at {where(sockets[passed])}",
                )
                continue
            sockets[passed] = item
        if lst.name in names:
            r.error(
                item.src,
                f"{item.key}.name",
                f"listener {lst.name!r} defined twice (first at {where(names[lst.name])})",
            )
            continue
        names[lst.name] = item
        out.append(lst)
    if not sections.listeners:
        r.error(None, "listeners", "no listeners defined")
    return out


def _listener(
    r: Reader, tcp_keys: TCPDestinations, item: Item, default_tls: TLSFiles | None, have_tls: bool
) -> Listener | None:
    f = r.fields(
        item,
        ("name", "protocol", "endpoint", "advertise", "sd", "tls", "tunnel_idle", *TCP_KEYS),
        ("name", "endpoint"),
    )
    if f is None:
        return None
    name = r.string(f["name"]) if "name" in f else None
    if name is not None and not NAME.match(name):
        r.error(item.src, f["name"].key, NAME_RULE)
    protocol: ListenerProtocol = "http"
    if "protocol" in f:
        if isinstance(f["protocol"].value, str) and f["protocol"].value in _LATER_PROTOCOLS:
            r.error(
                item.src,
                f["protocol"].key,
                f"protocol {f['protocol'].value!r} is not available in this version",
            )
            return None
        protocol = r.choice(f["protocol"], LISTENER_PROTOCOLS) or "http"
    endpoint = r.endpoint(f["endpoint"]) if "endpoint" in f else None
    advertise = None
    if "advertise" in f:
        advertise = r.string(f["advertise"])
        if advertise is not None and split_address(advertise) is None:
            r.error(item.src, f["advertise"].key, "must be host:port")
        if protocol != "http":
            r.error(item.src, f["advertise"].key, "only http listeners advertise (/sd)")
    sd_route_label: str | None = "route"
    if "sd" in f:
        if protocol != "http":
            r.error(item.src, f["sd"].key, "only http listeners serve /sd")
        sd_route_label = _sd_settings(r, f["sd"])
    deadlines = Deadlines()
    if "tunnel_idle" in f:
        if protocol not in ("forward", "tcp"):
            r.error(item.src, f["tunnel_idle"].key, "only forward and tcp listeners have tunnels")
        else:
            tunnel_idle = r.positive(f["tunnel_idle"], parse_duration)
            if tunnel_idle is not None:
                deadlines = Deadlines(tunnel_idle=tunnel_idle)
    # A passthrough tcp listener relays the client's TLS: it needs no TLS files.
    passthrough = protocol == "tcp" and "mode" in f and f["mode"].value == "passthrough"
    tls = default_tls
    if "tls" in f:
        if f["tls"].value is False:
            tls = None
            if protocol != "tcp":  # tcp listeners: see TCPDestinations.settings
                r.warn(
                    item.src,
                    f["tls"].key,
                    "plain-text listener: no client certificates, and bearer tokens and "
                    "passwords cross the network in clear text",
                )
        elif isinstance(f["tls"].value, dict):
            tls = tls_files(r, f["tls"])
        else:
            r.error(
                item.src,
                f["tls"].key,
                "must be false or a mapping with certificate, key and client_ca",
            )
    elif not have_tls and not passthrough:
        r.error(
            item.src,
            item.key,
            "no top-level 'tls' section; give this listener 'tls' or say 'tls: false'",
        )
    tcp = None
    if protocol == "tcp":
        tcp = tcp_keys.settings(item, f)
        if passthrough:
            tls = None
    else:
        for key in TCP_KEYS:
            if key in f:
                r.error(item.src, f[key].key, "only tcp listeners take this key")
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


def _sd_settings(r: Reader, item: Item) -> str | None:
    """``sd: {route_label: NAME}``: the label naming the route, or null/false for none."""
    f = r.fields(item, ("route_label",))
    if f is None or "route_label" not in f:
        return "route"
    value = f["route_label"].value
    if value is None or value is False:
        return None
    if not isinstance(value, str) or not LABEL_NAME.match(value) or value.startswith("__"):
        r.error(
            item.src,
            f["route_label"].key,
            "must be a Prometheus label name not starting with '__', or null for none",
        )
        return "route"
    if value in ("instance", "job"):
        r.error(
            item.src,
            f["route_label"].key,
            f"{value!r} names the target or the job in Prometheus; choose another label",
        )
        return "route"
    return value
