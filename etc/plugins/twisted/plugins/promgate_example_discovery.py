"""An example promgate discovery plugin: targets listed in its own settings.

Put ``etc/plugins`` (the directory holding ``twisted/plugins/``) on ``PYTHONPATH`` and
name the provider in a route:
``targets: {plugin: {name: example-list, hosts: [a, b], port: 9100}}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import provider

from promgate.config.model import Target
from promgate.discovery import BaseProvider, IDiscoveryProviderFactory
from promgate.reactors import IDiscoveryReactor


class ListedHosts(BaseProvider):
    """Each host in the list, on one port, labelled ``source=example``."""

    refresh_interval = 60.0

    def __init__(self, hosts: Sequence[str], port: int) -> None:
        self.hosts = tuple(hosts)
        self.port = port

    def refresh(self) -> list[Target]:
        return [Target(f"{host}:{self.port}", {"source": "example"}) for host in self.hosts]


@provider(IPlugin, IDiscoveryProviderFactory)
class ExampleListFactory:
    """The factory promgate finds with ``twisted.plugin.getPlugins``."""

    name = "example-list"

    @staticmethod
    def check(settings: Mapping[str, Any]) -> list[tuple[str, str]]:
        problems = []
        hosts = settings.get("hosts")
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            problems.append(("hosts", "must be a list of host names"))
        port = settings.get("port", 9100)
        if not isinstance(port, int) or not 0 < port < 65536:
            problems.append(("port", "must be a port number"))
        unknown = set(settings) - {"hosts", "port"}
        problems += [(key, "unknown key") for key in sorted(unknown)]
        return problems

    @staticmethod
    def build(settings: Mapping[str, Any], reactor: IDiscoveryReactor, base: Path) -> ListedHosts:
        return ListedHosts(settings["hosts"], settings.get("port", 9100))
