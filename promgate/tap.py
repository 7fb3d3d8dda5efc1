"""``twistd promgate``: command-line options and service assembly, nothing more."""

from __future__ import annotations

from pathlib import Path

from twisted.application.service import IService
from twisted.python import usage

from promgate.config.errors import ConfigError
from promgate.config.loader import load_config


class Options(usage.Options):
    """Options for ``twistd promgate``."""

    synopsis = "--config FILE [--ready-file FILE]"
    optParameters = [
        ["config", "c", None, "The promgate configuration file (YAML)."],
        ["ready-file", None, None, "Write listener addresses as JSON here once listening."],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config is required")
        try:
            self["loaded"] = load_config(Path(self["config"]))
        except ConfigError as e:
            raise usage.UsageError("invalid configuration:\n" + str(e)) from None


def makeService(options: Options) -> IService:
    """Build the gateway service; the only place that touches the global reactor."""
    from twisted.internet import reactor

    from promgate.service import GatewayService

    ready = Path(options["ready-file"]) if options["ready-file"] else None
    return GatewayService(options["loaded"], reactor, ready_file=ready)
