"""Prometheus ``http_sd`` documents: the targets one caller may scrape, via the gateway."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from promgate.config.model import Route, Target


def render_http_sd(
    routes: Iterable[Route],
    advertise: str,
    scheme: str,
    members: Mapping[str, Mapping[str, Target]] | None = None,
    *,
    route_label: str | None = "route",
) -> bytes:
    """Target groups rewritten to go through the gateway at ``advertise``.

    ``members`` are the routes' current targets by address (discovery's view); without
    it, each route's static targets. Each target is its own group because
    ``__param_target`` differs per target. Labels apply in order: ``instance`` (the real
    target), the route's labels, the target's labels (so an operator may override
    ``instance``; discovered ``__meta_*`` labels only if the route keeps them), then the
    gateway's own ``__``-prefixed labels, which nothing can override.

    ``route_label`` (unless None) names the route, so that two routes sharing a target
    stay two series in Prometheus; like the gateway's own labels, it is set last.
    """
    groups = []
    for route in sorted(routes, key=lambda r: r.name):
        targets: Iterable[Target] = (
            route.targets if members is None else members.get(route.name, {}).values()
        )
        for target in targets:
            labels = {"instance": target.address}
            labels.update(route.labels)
            for name, value in target.labels.items():
                if not name.startswith("__") or (
                    route.keep_meta_labels and name.startswith("__meta_")
                ):
                    labels[name] = value
            if route_label is not None:
                labels[route_label] = route.name
            labels["__scheme__"] = scheme
            labels["__metrics_path__"] = "/scrape"
            labels["__param_route"] = route.name
            labels["__param_target"] = target.address
            groups.append({"targets": [advertise], "labels": labels})
    return json.dumps(groups, sort_keys=True, separators=(",", ":")).encode("utf-8")
