"""Names that one section gives and another defines, checked once every section is read.

Routes and listeners name each other (``route_listeners``); a route's ``allow`` names
identities, roles and TLS server names; ``/sd`` label sets must stay apart per route.
"""

from __future__ import annotations

from collections.abc import Collection

from promgate.config.fields import Reader
from promgate.config.model import Identity, Listener, Route, route_listeners
from promgate.config.sections import Sections
from promgate.config.tcp_listeners import sni_pattern
from promgate.config.yaml_source import Item

__all__ = ["check_allow", "check_route_listeners"]


def check_allow(
    r: Reader,
    allow_items: dict[str, Item],
    routes: dict[str, Route],
    identities: dict[str, Identity],
    defined: Collection[str],
) -> None:
    """Every entry of every route's ``allow``: a defined identity (``defined`` names those
    written, valid or not), a role some identity carries, or ``sni:`` and a server name."""
    roles = {role for identity in identities.values() for role in identity.roles}
    for name, item in allow_items.items():
        for entry in routes[name].allow:
            if entry.startswith("role:"):
                if entry[5:] not in roles:
                    r.warn(item.src, item.key, f"no identity carries role {entry[5:]!r}")
            elif entry.startswith("sni:"):  # passthrough tcp connections, by server name
                if entry != "sni:*" and sni_pattern(entry[4:]) is None:
                    r.error(
                        item.src,
                        item.key,
                        f"{entry!r}: give sni:* or sni: and a server name or *.parent",
                    )
            elif entry not in defined and entry not in identities:
                r.error(item.src, item.key, f"undefined identity {entry!r}")


def check_route_listeners(
    r: Reader, sections: Sections, listeners: list[Listener], routes: dict[str, Route]
) -> None:
    """Which listeners serve which route (``route_listeners``), checked both ways, and
    ``/sd`` label sets that stay unique per route and target."""
    by_name = {li.name: li for li in listeners}
    items = {
        it.value["name"]: it
        for it in sections.listeners
        if isinstance(it.value, dict) and isinstance(it.value.get("name"), str)
    }
    for name, route in routes.items():
        item = sections.routes[name]
        for listener_name in route.listeners:
            listener = by_name.get(listener_name)
            if listener is None:
                r.error(item.src, f"{item.key}.listeners", f"unknown listener {listener_name!r}")
            elif listener.protocol == "tcp" and name not in listener.named_routes():
                r.error(
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
                r.error(
                    at.src if at else None,
                    at.key if at else "listeners",
                    f"route {name!r} leaves this listener out of its listeners:",
                )
    for name in sorted(routes):
        if not served[name]:
            item = sections.routes[name]
            r.warn(item.src, item.key, "no listener serves this route")
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
                        r.warn(
                            at.src if at else None,
                            f"{at.key}.sd" if at else "listeners",
                            f"routes {first!r} and {route.name!r} share target "
                            f"{target.address}: without a route label their /sd label "
                            "sets collide",
                        )
            continue
        for route in mine:
            if label in route.labels:
                item = sections.routes[route.name]
                r.error(
                    item.src,
                    f"{item.key}.labels",
                    f"label {label!r} is the route label /sd adds on listener "
                    f"{listener.name!r}; rename it or set that listener's sd.route_label",
                )
