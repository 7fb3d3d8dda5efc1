"""The keys of ``protocol: tcp`` listeners: where each connection goes.

A tcp listener forwards to one route (``route``, with ``target`` when the route has more
than one), or picks the route by TLS server name (``sni``, with ``sni_default``). The
listeners are read before the routes, so the route and target names are noted here when
read and checked by :meth:`TCPDestinations.resolve` once every route is known.
"""

from __future__ import annotations

from collections.abc import Collection

import attrs

from promgate.addresses import HOSTNAME, split_address
from promgate.config.fields import Reader
from promgate.config.model import (
    PROXY_PROTOCOLS,
    TCP_MODES,
    Destination,
    Listener,
    ProxyProtocol,
    Route,
    TCPForwarding,
    TCPMode,
)
from promgate.config.yaml_source import Item, join_key

__all__ = ["TCP_KEYS", "TCPDestinations", "sni_pattern"]

#: Listener keys only ``protocol: tcp`` listeners take.
TCP_KEYS = ("mode", "route", "target", "sni", "sni_default", "proxy_protocol")


@attrs.frozen
class _Named:
    """A destination's route (and target) names as written, to check once routes are known."""

    route: str
    route_item: Item
    target_item: Item | None
    #: Written in ``sni`` or ``sni_default`` (where a target is given as {route, target}).
    nested: bool


class TCPDestinations:
    """Reads the tcp keys of listeners, then checks the routes and targets they name."""

    def __init__(self, r: Reader) -> None:
        self.r = r
        self._named: list[tuple[TCPForwarding, list[_Named]]] = []

    def settings(self, item: Item, f: dict[str, Item]) -> TCPForwarding | None:
        """The tcp keys among a listener's fields ``f``. Route and target names are
        checked later, in resolve, once the routes are known."""
        mode: TCPMode | None = self.r.choice(f["mode"], TCP_MODES) if "mode" in f else "terminate"
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
        proxy_protocol: ProxyProtocol | None = None
        if "proxy_protocol" in f:
            proxy_protocol = self.r.choice(f["proxy_protocol"], PROXY_PROTOCOLS)
            ok = ok and proxy_protocol is not None
        pending: list[_Named] = []
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
            destination = self._destination(f["route"], f.get("target"), pending, False)
        else:
            checked = self._sni(f["sni"], pending)
            if checked is None:
                return None
            sni, all_valid = checked
            ok = ok and all_valid
            if "sni_default" in f:
                sni_default = self._destination(f["sni_default"], None, pending, True)
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
        self._named.append((settings, pending))
        return settings

    def _sni(
        self, entries: Item, pending: list[_Named]
    ) -> tuple[dict[str, Destination], bool] | None:
        """``sni``: server names (or ``*.parent``) to destinations, and whether every
        entry was valid; None if it is not a mapping."""
        if not isinstance(entries.value, dict) or not entries.value:
            self.r.error(
                entries.src,
                entries.key,
                "must map server names (or *.parent) to a route or {route, target}",
            )
            return None
        sni: dict[str, Destination] = {}
        ok = True
        for server_name, value in entries.value.items():
            key = join_key(entries.key, server_name)
            pattern = sni_pattern(server_name)
            if pattern is None:
                self.r.error(entries.src, key, "not a server name (a DNS name, or *.parent.name)")
                ok = False
                continue
            if pattern in sni:
                self.r.error(entries.src, key, f"server name {pattern!r} given twice")
                ok = False
                continue
            dest = self._destination(Item(value, entries.src, key), None, pending, True)
            if dest is not None:
                sni[pattern] = dest
        return sni, ok

    def _destination(
        self,
        item: Item,
        target_item: Item | None,
        pending: list[_Named],
        nested: bool,
    ) -> Destination | None:
        """A route name, or (in ``sni``) a route name or {route, target}; the target is
        filled in by resolve when the route has exactly one."""
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
        pending.append(_Named(route, item, target_item, nested))
        return Destination(route, target)

    def resolve(
        self, listeners: list[Listener], routes: dict[str, Route], defined: Collection[str]
    ) -> list[Listener]:
        """Check every tcp listener's routes and targets, and fill in single targets.

        ``routes`` are the valid routes; ``defined`` names every route written, valid or
        not (an invalid route has its own errors already)."""
        out = []
        for lst in listeners:
            if lst.tcp is None:
                out.append(lst)
                continue
            pending = next((p for s, p in self._named if s is lst.tcp), [])
            resolved: dict[tuple[str, str], Destination] = {}
            passthrough = lst.tcp.mode == "passthrough"
            for named in pending:
                dest = self._resolve(named, routes, defined, passthrough)
                if dest is not None:
                    given = named.target_item.value if named.target_item is not None else ""
                    resolved[(named.route, given)] = dest
            tcp = attrs.evolve(
                lst.tcp,
                destination=_filled(resolved, lst.tcp.destination),
                sni={k: _filled(resolved, v) or v for k, v in lst.tcp.sni.items()},
                sni_default=_filled(resolved, lst.tcp.sni_default),
            )
            out.append(attrs.evolve(lst, tcp=tcp))
        return out

    def _resolve(
        self,
        named: _Named,
        routes: dict[str, Route],
        defined: Collection[str],
        passthrough: bool,
    ) -> Destination | None:
        name, route_item, target_item = named.route, named.route_item, named.target_item
        route = routes.get(name)
        if route is None:
            if name not in defined:  # else the route's own errors say why
                self.r.error(route_item.src, route_item.key, f"undefined route {name!r}")
            return None
        if target_item is None:
            if len(route.targets) != 1:
                how = "{route: ..., target: HOST:PORT}" if named.nested else "'target: HOST:PORT'"
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


def _filled(
    resolved: dict[tuple[str, str], Destination], dest: Destination | None
) -> Destination | None:
    """``dest`` with the target the route check found for it."""
    if dest is None:
        return None
    return resolved.get((dest.route, dest.target), dest)


def sni_pattern(text: str) -> str | None:
    """A server name or ``*.parent`` as tcp listeners compare them (lower case, no final
    dot), or None if it is neither."""
    name = text.lower().rstrip(".")
    rest = name[2:] if name.startswith("*.") else name
    if not rest or "*" in rest or not HOSTNAME.match(rest):
        return None
    return name
