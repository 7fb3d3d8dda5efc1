"""Prometheus ``http_sd`` documents: the targets one caller may scrape, via the gateway."""

from __future__ import annotations

import json
from collections.abc import Iterable

from promgate.config.model import Route


def render_http_sd(routes: Iterable[Route], advertise: str, scheme: str) -> bytes:
    """Target groups rewritten to go through the gateway at ``advertise``.

    Each target is its own group because ``__param_target`` differs per target. Labels
    apply in order: ``instance`` (the real target), the route's labels, the target's
    labels (so an operator may override ``instance``), then the gateway's own
    ``__``-prefixed labels, which nothing can override.
    """
    groups = []
    for route in sorted(routes, key=lambda r: r.name):
        for target in route.targets:
            labels = {"instance": target.address}
            labels.update(route.labels)
            labels.update(target.labels)
            labels["__scheme__"] = scheme
            labels["__metrics_path__"] = "/scrape"
            labels["__param_route"] = route.name
            labels["__param_target"] = target.address
            groups.append({"targets": [advertise], "labels": labels})
    return json.dumps(groups, sort_keys=True, separators=(",", ":")).encode("utf-8")
